"""Per-layer allocation against uniform quantization on SmolLM2, all measured in one run.

One sensitivity table (KL on WikiText-2 valid windows when only one sublayer is quantized, for
each of int2..int8 with groups of 64) feeds every allocator; each allocator's plan is judged by
perplexity and KL to the base model on wiki.test.raw, text never used for calibration. Budgets
are average bits per weight of the block linears with every scale counted: 3.25 and 4.25 are
exactly the sizes of uniform int3 and int4 with groups of 64, 3.75 and 4.75 lie between.

Searches (hybrid, evolutionary) judge whole plans by KL on other calibration windows. The
evolutionary search (EvoPress-style, starting from the best uniform plan, screening with the
cheaper fidelity) gets about `--evo-factor` times the compute the hybrid used.

    python bench/allocate.py                      # writes bench/results/allocate.json and .png
    python bench/allocate.py --table t.json       # reuse (or save) the sensitivity table
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import CALIBRATION_TEXT, EVALUATION_TEXT, RESULTS, SMOLLM2, write_results  # noqa: E402

from layerwise import load_model, token_windows  # noqa: E402
from layerwise.evaluate import base_outputs, evaluate  # noqa: E402
from layerwise.plan.allocate import Allocation, allocate, never_worse_than_uniform  # noqa: E402
from layerwise.plan.fitness import KLFitness  # noqa: E402
from layerwise.plan.options import option_name, parse_options  # noqa: E402
from layerwise.plan.sensitivity import SensitivityTable, measure_sensitivity  # noqa: E402
from layerwise.profile import profile_model  # noqa: E402
from layerwise.report.plots import pareto_plot  # noqa: E402

# Symmetric round-to-nearest integers throughout, as the uniform baselines: the plans differ from
# them only in where the bits go. Groups of 128 and 32 give steps between the widths (576-wide
# rows end in a 64-column group with 128: "t").
OPTIONS = "int2g64,int3g128t,int3g64,int3g32,int4g128t,int4g64,int5g64,int6g64,int8g64"


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
    parser.add_argument("--budgets", default="3.25,3.75,4.25,4.75")
    parser.add_argument("--search-budgets", default="3.25,4.25", help="budgets at which evolutionary also runs")
    parser.add_argument("--table", default=None, help="reuse this sensitivity table, or save the new one here")
    parser.add_argument("--sensitivity-tokens", type=int, default=2048)
    parser.add_argument("--fitness-tokens", type=int, default=1024)
    parser.add_argument("--eval-tokens", type=int, default=10240)
    parser.add_argument("--generations", type=int, default=10, help="hybrid's search length")
    parser.add_argument("--evo-factor", type=float, default=10.0)
    args = parser.parse_args()
    budgets = [float(b) for b in args.budgets.split(",")]
    search_budgets = {float(b) for b in args.search_budgets.split(",")} if args.search_budgets else set()

    loaded = load_model(SMOLLM2)
    calibration = token_windows(loaded.tokenizer, CALIBRATION_TEXT, tokens=args.sensitivity_tokens, seed=0)
    forward_seconds = _time_forward(loaded, calibration)
    if args.table and Path(args.table).exists():
        table = SensitivityTable.load(args.table)
        table.check_model(loaded)
        if table.options != [option_name(c) for c in parse_options(args.options)]:
            raise SystemExit(f"{args.table} holds options {table.options}, not {args.options}")
    else:
        table = measure_sensitivity(loaded, calibration, args.options, "sublayer")
        if args.table:
            table.save(args.table)
    print(f"sensitivity table: {len(table.units)} units x {len(table.options)} options, "
          f"{table.cost['seconds']:.0f} s, {table.cost['forward_equivalents']:.1f} forward passes")
    started = time.perf_counter()
    profile = profile_model(loaded, calibration, lens_positions_per_window=1)
    profile_seconds = time.perf_counter() - started
    scores = unit_scores(table, profile)

    evaluation = token_windows(loaded.tokenizer, EVALUATION_TEXT, tokens=args.eval_tokens, seed=None)
    base = base_outputs(loaded, evaluation)
    fitness_windows = token_windows(loaded.tokenizer, CALIBRATION_TEXT, tokens=args.fitness_tokens, seed=1)
    rows, curves = [], {}
    with KLFitness(loaded, table, fitness_windows, batch_size=1, batches_per_stage=(1, None)) as fitness:
        def judge(bits: float, name: str, allocation: Allocation, search: dict) -> None:
            counters = (fitness.calls, fitness.block_runs, fitness.seconds)  # judging is not search
            calibration_kl = fitness.full(allocation.choice)
            fitness.calls, fitness.block_runs, fitness.seconds = counters
            fitness.apply(allocation.choice)
            quality = evaluate(loaded, base, progress=False)
            labels = allocation.labels(problem)
            row = {"budget": bits, "allocator": name, "bits_per_weight": allocation.total_cost / table.total_weights,
                   "perplexity": quality.perplexity, "kl": quality.kl, "top1": quality.top1,
                   "predicted_kl": allocation.total_loss, "calibration_kl": calibration_kl,
                   "options_used": {o: labels.count(o) for o in table.options if o in labels},
                   "choice": list(labels)} | search
            rows.append(row)
            curves.setdefault(name, []).append((row["bits_per_weight"], row["kl"]))
            print(f"{bits:5.2f} {name:22s} {row['bits_per_weight']:.4f} bpw  ppl {quality.perplexity:8.2f}  "
                  f"KL {quality.kl:.4f}  search {search.get('seconds', 0):.0f} s "
                  f"{search.get('forward_equivalents', 0):.1f} fwd", flush=True)
            write_results("allocate", _payload(args, table, rows, forward_seconds, profile_seconds))

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
                judge(bits, name, allocation, {"seconds": time.perf_counter() - start, "forward_equivalents": 0.0})

            before = (fitness.calls, fitness.forward_equivalents(), fitness.seconds)
            hybrid = allocate(problem, "hybrid", fidelities=fitness, survivors=[4, 1],
                              generations=args.generations, offspring=16, seed=0)
            hybrid_cost = _spent(fitness, before)
            # What the CLI recommends: the hybrid plan unless a uniform plan that fits scores better.
            recommended = never_worse_than_uniform(problem, hybrid, fitness.full)
            recommended_cost = _spent(fitness, before)
            judge(bits, "hybrid", hybrid, hybrid_cost)
            judge(bits, "recommended (hybrid, checked)", recommended, recommended_cost)

            if bits in search_budgets:
                before = (fitness.calls, fitness.forward_equivalents(), fitness.seconds)
                target = args.evo_factor * hybrid_cost["forward_equivalents"]
                # EvoPress screens every offspring on the cheap fidelity (one window), then the
                # best 2 on all windows: about (16 * 1 + 2 * windows) / windows forward passes each.
                per_generation = (16 + 2 * len(fitness.base.calls)) / len(fitness.base.calls)
                evolution = allocate(problem, "evolutionary",
                                     fidelities=lambda choice, stage: fitness(choice, stage + 1),
                                     survivors=[2], generations=max(1, round(target / per_generation)),
                                     offspring=16, seed=0)
                judge(bits, "evolutionary", evolution, _spent(fitness, before))

    rows_by_budget = {}
    for row in rows:
        rows_by_budget.setdefault(row["budget"], []).append(row)
    summary = _summary(rows_by_budget)
    write_results("allocate", _payload(args, table, rows, forward_seconds, profile_seconds) | {"summary": summary})
    pareto_rows = [{"bits_per_weight": r["bits_per_weight"], "predicted_kl": r["predicted_kl"]}
                   for r in rows if r["allocator"] == "exact"]
    measured = {name: points for name, points in curves.items()
                if name in ("uniform", "lwq-lim", "exact", "hybrid", "evolutionary")}
    pareto_plot(pareto_rows, table, RESULTS / "allocate.png", measured={f"{k}, measured on wiki.test": v
                                                                        for k, v in measured.items()})
    _print_table(rows, summary)


def _spent(fitness: KLFitness, before: tuple[int, float, float]) -> dict:
    return {"fitness_calls": fitness.calls - before[0],
            "forward_equivalents": fitness.forward_equivalents() - before[1],
            "seconds": fitness.seconds - before[2]}


def _time_forward(loaded, windows) -> float:
    """Seconds of one bare forward pass over the fitness-sized windows, to express costs."""
    batch = windows.input_ids[:2]
    with torch.no_grad():
        loaded.model(input_ids=batch, use_cache=False)
        start = time.perf_counter()
        loaded.model(input_ids=batch, use_cache=False)
    return time.perf_counter() - start


def _summary(rows_by_budget: dict[float, list[dict]]) -> dict:
    summary = {}
    for bits, rows in rows_by_budget.items():
        by_name = {row["allocator"]: row for row in rows}
        uniform = by_name["uniform"]
        best = min(rows, key=lambda row: row["kl"])
        entry = {"uniform_option": uniform["choice"][0], "uniform_kl": uniform["kl"],
                 "best": best["allocator"], "best_kl": best["kl"], "best_over_uniform": best["kl"] / uniform["kl"],
                 "recommended_over_uniform": by_name["recommended (hybrid, checked)"]["kl"] / uniform["kl"]}
        if "evolutionary" in by_name:
            entry["hybrid_over_evolutionary_calibration_kl"] = (by_name["hybrid"]["calibration_kl"]
                                                                / by_name["evolutionary"]["calibration_kl"])
            entry["hybrid_over_evolutionary_test_kl"] = by_name["hybrid"]["kl"] / by_name["evolutionary"]["kl"]
            entry["evolutionary_compute_over_hybrid"] = (by_name["evolutionary"]["forward_equivalents"]
                                                         / by_name["hybrid"]["forward_equivalents"])
        summary[str(bits)] = entry
    return summary


def _payload(args, table, rows, forward_seconds, profile_seconds) -> dict:
    return {"model": str(SMOLLM2), "options": table.options, "granularity": table.granularity,
            "sensitivity": {"calibration": table.calibration, "cost": table.cost},
            "profile_seconds": profile_seconds, "forward_seconds_1024_tokens": forward_seconds,
            "settings": vars(args), "rows": rows}


def _print_table(rows: list[dict], summary: dict) -> None:
    print("\n| budget | allocator | bits/weight | perplexity | KL | top-1 | KL (calib) | search s | search fwd |")
    print("| ---: | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
    for r in rows:
        print(f"| {r['budget']:.2f} | {r['allocator']} | {r['bits_per_weight']:.4f} | {r['perplexity']:.2f} | "
              f"{r['kl']:.4f} | {r['top1']:.3f} | {r['calibration_kl']:.4f} | {r.get('seconds', 0):.0f} | "
              f"{r.get('forward_equivalents', 0):.1f} |")
    for bits, entry in summary.items():
        print(bits, {k: (round(v, 4) if isinstance(v, float) else v) for k, v in entry.items()})


if __name__ == "__main__":
    main()
