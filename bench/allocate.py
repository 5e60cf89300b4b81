"""Per-layer allocation against uniform quantization on SmolLM2, all measured in one run.

One sensitivity table (KL on WikiText-2 valid windows when only one sublayer is quantized, for
each of int2..int8 with groups of 64, and a few other group sizes) feeds every allocator; each
plan is judged by perplexity and KL to the base model on two kinds of text never used for
calibration: WikiText-2 test (prose) and the Python standard library's sources (code). Every KL
and perplexity carries a 95% bootstrap interval over evaluation windows, and every ratio against
uniform is paired (same windows) with its interval. Budgets are average bits per weight of the
block linears with every scale counted: 3.25 and 4.25 are exactly the sizes of uniform int3 and
int4 with groups of 64.

"CLI default" is `layerwise plan` itself (`run_plan` with every default: hybrid allocator, its
search on 2048 calibration tokens, checked against every uniform plan that fits on 2048 other
calibration tokens), given this table and WikiText-2 valid as calibration text.

    python bench/allocate.py --table bench/results/allocate_sensitivity.json   # reuse (or save) the table
"""
from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import (CALIBRATION_TEXT, RESULTS, SMOLLM2, evaluation_domains, paired_ratio,  # noqa: E402
                     quality_row, write_results)

from layerwise import load_model, token_windows  # noqa: E402
from layerwise.evaluate import base_outputs, evaluate  # noqa: E402
from layerwise.measure.fitness import KLFitness  # noqa: E402
from layerwise.measure.run import run_plan  # noqa: E402
from layerwise.measure.sensitivity import measure_sensitivity  # noqa: E402
from layerwise.plan.allocate import allocate  # noqa: E402
from layerwise.plan.problem import Allocation  # noqa: E402
from layerwise.plan.options import option_name, parse_options  # noqa: E402
from layerwise.plan.table import SensitivityTable  # noqa: E402
from layerwise.profile import profile_model  # noqa: E402
from layerwise.report.plots import pareto_plot  # noqa: E402

# Symmetric round-to-nearest integers throughout, as the uniform baselines: the plans differ from
# them only in where the bits go. Groups of 128 and 32 give steps between the widths (576-wide
# rows end in a 64-column group with 128: "t").
OPTIONS = "int2g64,int3g128t,int3g64,int3g32,int4g128t,int4g64,int5g64,int6g64,int8g64"
CLI_DEFAULT = "CLI default (layerwise plan)"


def lwq_pair(table: SensitivityTable, bits: float) -> tuple[str, str]:
    """The two options Layer-Wise Quantization mixes at this budget: the closest below and above
    (at a budget equal to one option's size, its two neighbours, as the paper mixes 2 and 4 bits)."""
    sizes = sorted((b, name) for name, b in table.option_bits().items())
    below = [name for b, name in sizes if b < bits - 1e-9]
    above = [name for b, name in sizes if b > bits + 1e-9]
    return above[0], below[-1]


def unit_scores(table: SensitivityTable, profile) -> dict[str, dict[str, float]]:
    lim = profile.column("lim")
    zd_of = {row["name"]: (row["zd"], row["rows"] * row["columns"]) for row in profile.linears}
    scores = {"lim": {}, "zd": {}}
    for unit in table.units:
        scores["lim"][unit.name] = lim[unit.block]
        parts = [zd_of[name] for name in unit.modules]
        scores["zd"][unit.name] = sum(z * n for z, n in parts) / sum(n for _, n in parts)
    return scores


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--options", default=OPTIONS, help="the choices per unit (default: %(default)s)")
    parser.add_argument("--budgets", default="3.25,4.25")
    parser.add_argument("--table", default=None, help="reuse this sensitivity table, or save the new one here")
    parser.add_argument("--sensitivity-tokens", type=int, default=2048)
    parser.add_argument("--eval-tokens", type=int, default=10240)
    parser.add_argument("--name", default="allocate")
    args = parser.parse_args()
    budgets = [float(b) for b in args.budgets.split(",")]

    loaded = load_model(SMOLLM2)
    calibration = token_windows(loaded.tokenizer, CALIBRATION_TEXT, tokens=args.sensitivity_tokens, seed=0)
    table_path = Path(args.table) if args.table else Path(tempfile.mkdtemp()) / "sensitivity.json"
    if table_path.exists():
        table = SensitivityTable.load(table_path)
        table.check_model(loaded)
        if table.options != [option_name(c) for c in parse_options(args.options)]:
            raise SystemExit(f"{table_path} holds options {table.options}, not {args.options}")
    else:
        table = measure_sensitivity(loaded, calibration, args.options, "sublayer")
        table.save(table_path)
    print(f"sensitivity table: {len(table.units)} units x {len(table.options)} options, "
          f"{table.cost['seconds']:.0f} s, {table.cost['forward_equivalents']:.1f} forward passes", flush=True)
    profile = profile_model(loaded, calibration, lens_positions_per_window=1, progress=False)
    scores = unit_scores(table, profile)

    domains = evaluation_domains(loaded.tokenizer, args.eval_tokens)
    bases = {name: base_outputs(loaded, windows, progress=False) for name, windows in domains.items()}
    rows: list[dict] = []
    # A bank of quantized weights per (unit, option) to switch plans cheaply; its own windows are
    # not used for judging anything.
    bank_windows = token_windows(loaded.tokenizer, CALIBRATION_TEXT, tokens=512, seed=99)
    with KLFitness(loaded, table, bank_windows, batch_size=1) as bank:
        def judge(bits: float, name: str, allocation: Allocation, extra: dict) -> None:
            bank.apply(allocation.choice)
            labels = allocation.labels(problem)
            for domain, base in bases.items():
                quality = evaluate(loaded, base, progress=False)
                row = {"budget": bits, "allocator": name, "domain": domain,
                       "bits_per_weight": allocation.total_cost / table.total_weights} | quality_row(quality) | {
                       "predicted_kl": allocation.total_loss,
                       "options_used": {o: labels.count(o) for o in table.options if o in labels},
                       "choice": list(labels)} | extra
                rows.append(row)
                print(f"{bits:5.2f} {name:30s} {domain:15s} {row['bits_per_weight']:.4f} bpw  "
                      f"ppl {quality.perplexity:8.2f}  KL {quality.kl:.4f} [{row['kl_ci'][0]:.4f}, "
                      f"{row['kl_ci'][1]:.4f}]", flush=True)
            write_results(args.name, _payload(args, table, rows, domains))

        for bits in budgets:
            problem = table.problem(table.budget_bits(bits))
            high, low = lwq_pair(table, bits)
            table_only = {"uniform": lambda: allocate(problem, "uniform")}
            for score in ("lim", "zd"):
                table_only[f"lwq-{score}"] = lambda s=score: allocate(problem, "ordering", scores=scores[s],
                                                                      high=high, low=low)
            table_only["lwq-random"] = lambda: allocate(problem, "ordering", scores="random", high=high, low=low)
            table_only["exact"] = lambda: allocate(problem, "exact")
            table_only["greedy"] = lambda: allocate(problem, "greedy")
            for name, run in table_only.items():
                start = time.perf_counter()
                allocation = run()
                judge(bits, name, allocation, {"seconds": time.perf_counter() - start})

            bank.restore()
            start = time.perf_counter()
            outcome = run_plan(loaded, bits_per_weight=bits, table=table_path, options=args.options,
                               calib=CALIBRATION_TEXT, progress=False)
            report = outcome.report
            judge(bits, CLI_DEFAULT, outcome.allocation, {
                "seconds": time.perf_counter() - start, "returned": report["returned"],
                "calibration_kl": report["calibration_kl"], "check": report["check"],
                "search_forward_equivalents": report["search"]["forward_equivalents"],
                "search_seconds": report["search"]["seconds"]})

    _add_ratios(rows)
    summary = _summary(rows)
    write_results(args.name, _payload(args, table, rows, domains) | {"summary": summary})
    measured = {}
    for row in rows:
        if row["domain"] == "wikitext2-test" and row["allocator"] in ("uniform", "lwq-lim", "exact", CLI_DEFAULT):
            measured.setdefault(f"{row['allocator']}, measured on wiki.test", []).append(
                (row["bits_per_weight"], row["kl"]))
    pareto_rows = [{"bits_per_weight": r["bits_per_weight"], "predicted_kl": r["predicted_kl"]}
                   for r in rows if r["allocator"] == "exact" and r["domain"] == "wikitext2-test"]
    pareto_plot(pareto_rows, table, RESULTS / f"{args.name}.png", measured=measured)
    _print_table(rows)


def _add_ratios(rows: list[dict]) -> None:
    """Each row's KL over uniform's at the same budget, on the same windows, with the interval."""
    uniform = {(r["budget"], r["domain"]): r for r in rows if r["allocator"] == "uniform"}
    for row in rows:
        ratio, interval = paired_ratio(row, uniform[row["budget"], row["domain"]])
        row["kl_over_uniform"], row["kl_over_uniform_ci"] = ratio, interval


def _summary(rows: list[dict]) -> dict:
    summary = {}
    for row in rows:
        if row["allocator"] != CLI_DEFAULT:
            continue
        same = [r for r in rows if r["budget"] == row["budget"] and r["domain"] == row["domain"]]
        uniform = next(r for r in same if r["allocator"] == "uniform")
        best = min(same, key=lambda r: r["kl"])
        summary[f"{row['budget']} {row['domain']}"] = {
            "uniform_option": uniform["choice"][0], "uniform_kl": uniform["kl"], "uniform_kl_ci": uniform["kl_ci"],
            "cli_default_kl": row["kl"], "cli_default_kl_ci": row["kl_ci"],
            "cli_default_over_uniform": row["kl_over_uniform"],
            "cli_default_over_uniform_ci": row["kl_over_uniform_ci"],
            "lowest_kl_allocator": best["allocator"], "lowest_kl": best["kl"]}
    return summary


def _payload(args, table, rows, domains) -> dict:
    return {"model": str(SMOLLM2), "options": table.options, "granularity": table.granularity,
            "sensitivity": {"calibration": table.calibration, "cost": table.cost},
            "evaluation": {name: windows.describe() for name, windows in domains.items()},
            "settings": vars(args), "rows": rows}


def _print_table(rows: list[dict]) -> None:
    print("\n| budget | allocator | text | bits/weight | perplexity | KL [95% interval] | KL / uniform [95% interval] |")
    print("| ---: | --- | --- | ---: | ---: | ---: | ---: |")
    for r in rows:
        print(f"| {r['budget']:.2f} | {r['allocator']} | {r['domain']} | {r['bits_per_weight']:.4f} | "
              f"{r['perplexity']:.2f} | {r['kl']:.4f} [{r['kl_ci'][0]:.4f}, {r['kl_ci'][1]:.4f}] | "
              f"{r['kl_over_uniform']:.3f} [{r['kl_over_uniform_ci'][0]:.3f}, {r['kl_over_uniform_ci'][1]:.3f}] |")


if __name__ == "__main__":
    main()
