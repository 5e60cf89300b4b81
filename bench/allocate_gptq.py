"""Per-layer plans whose options are GPTQ widths, against uniform GPTQ and uniform round-to-nearest
at the same sizes, on SmolLM2, all measured in one run.

`bench/allocate.py` compares allocators with round-to-nearest options only, so that plans and
uniform baselines differ only in where the bits go. A user who wants the best model at a size
would also use a better quantizer; this script measures what layerwise then gives: one
sensitivity table of GPTQ options (Hessians from the unquantized model, 2048 tokens of
WikiText-2 valid), the exact and the CLI's default (hybrid, checked against every uniform plan)
allocations, and each plan applied the way `layerwise quantize` applies it (sequential GPTQ,
16384 calibration tokens, the same as `bench/uniform.py`), judged by KL and perplexity on the
first 20 x 512 tokens of wiki.test.raw and on 20 x 512 tokens of the Python standard library's
sources (a second kind of text). Uniform RTN rows of the same sizes are measured in the same run,
so every ratio below compares rows of this run; ratios are paired (same windows) with 95%
bootstrap intervals. "CLI default" is `layerwise plan` itself (`run_plan` with every default).

    python bench/allocate_gptq.py                                   # bench/results/allocate_gptq.json
    python bench/allocate_gptq.py --table bench/results/allocate_gptq_sensitivity.json  # reuse / resume
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import (CALIBRATION_TEXT, SMOLLM2, evaluation_domains, paired_ratio, quality_row,  # noqa: E402
                     write_results)

from layerwise import load_model, token_windows  # noqa: E402
from layerwise.evaluate import base_outputs, evaluate  # noqa: E402
from layerwise.measure.run import plan_from_choice, run_plan, sensitivity_for  # noqa: E402
from layerwise.models.layout import block_linears, linear_weight, set_linear_weight  # noqa: E402
from layerwise.plan import Plan  # noqa: E402
from layerwise.plan.allocate import allocate  # noqa: E402
from layerwise.plan.options import parse_option  # noqa: E402
from layerwise.apply import quantize_  # noqa: E402
from layerwise.quant.size import size_report  # noqa: E402

# The widths of bench/allocate.py with GPTQ instead of round to nearest (int8 is never chosen
# below 5 bits there, so it is left out to save a ninth of the table).
OPTIONS = ("gptq:int2g64,gptq:int3g128t,gptq:int3g64,gptq:int3g32,gptq:int4g128t,gptq:int4g64,"
           "gptq:int5g64,gptq:int6g64")
# The uniform round-to-nearest configuration whose size each budget is, where there is one.
RTN_AT = {3.25: "int3g64", 3.75: "int3g32", 4.25: "int4g64"}
# What can be measured at each budget: uniform RTN, uniform GPTQ, the exact allocation, `layerwise plan`.
PLANS = ("rtn", "gptq", "exact", "default")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=str(SMOLLM2))
    parser.add_argument("--options", default=OPTIONS)
    parser.add_argument("--budgets", default="3.25,4.25")
    parser.add_argument("--table", default=None, help="reuse this sensitivity table, or save the new one here "
                        "(an interrupted measurement resumes from TABLE.progress)")
    parser.add_argument("--sensitivity-tokens", type=int, default=2048)
    parser.add_argument("--calib-tokens", type=int, default=32 * 512, help="GPTQ calibration when a plan is applied")
    parser.add_argument("--eval-tokens", type=int, default=20 * 512)
    parser.add_argument("--name", default="allocate_gptq")
    parser.add_argument("--plans", default=",".join(PLANS),
                        help="which plans to measure at each budget (default: %(default)s; empty: only merge)")
    parser.add_argument("--merge", nargs="*", default=[],
                        help="result files of other runs of this script on the same windows (e.g. one budget's "
                             "default plan measured in parallel) whose rows join this run's before the ratios")
    args = parser.parse_args()
    budgets = [float(b) for b in args.budgets.split(",")]
    wanted = {name for name in args.plans.split(",") if name}
    if wanted - set(PLANS):
        raise SystemExit(f"--plans takes {','.join(PLANS)}, not {args.plans}")
    merged = [json.loads(Path(path).read_text()) for path in args.merge]
    if not wanted:
        if not merged:
            raise SystemExit("nothing to do: give --plans or --merge")
        _finish(args, merged[0], [row for document in merged for row in document["rows"]], merged)
        return

    if not args.table:
        raise SystemExit("give --table: `layerwise plan` (the CLI default rows) reads the table from a file")
    loaded = load_model(args.model)
    table = sensitivity_for(loaded, table=args.table, options=args.options, granularity="sublayer",
                            calib=CALIBRATION_TEXT, tokens=args.sensitivity_tokens, seed=0)
    print(f"sensitivity table: {len(table.units)} units x {len(table.options)} options, "
          f"{table.cost['seconds']:.0f} s, {table.cost['forward_equivalents']:.1f} forward passes", flush=True)
    domains = evaluation_domains(loaded.tokenizer, args.eval_tokens)
    calibration = token_windows(loaded.tokenizer, CALIBRATION_TEXT, tokens=args.calib_tokens, seed=0)
    bases = {name: base_outputs(loaded, windows, progress=False) for name, windows in domains.items()}
    linears = {name: module for _, name, module in block_linears(loaded.model, loaded.adapter)}
    original = {name: linear_weight(module).detach().clone() for name, module in linears.items()}
    rows: list[dict] = []

    def judge(budget: float, name: str, plan: Plan, extra: dict) -> None:
        """Apply `plan` as `layerwise quantize` does, evaluate on every domain, put the weights back."""
        start = time.perf_counter()
        needs_data = any(config.algorithm != "rtn" for _, config in plan.rules) or (
            plan.default is not None and plan.default.algorithm != "rtn")
        stored = quantize_(loaded, plan, calibration if needs_data else None, progress=False)
        seconds = time.perf_counter() - start
        sizes = size_report(loaded, stored)
        for domain, base in bases.items():
            quality = evaluate(loaded, base, progress=False)
            row = {"budget": budget, "allocator": name, "domain": domain,
                   "bits_per_weight": sizes["linear_bits_per_weight"], "total_bytes": sizes["total_bytes"]
                   } | quality_row(quality) | {"quantize_seconds": seconds} | extra
            rows.append(row)
            print(f"{budget:5.2f} {name:34s} {domain:15s} {row['bits_per_weight']:.4f} bpw  "
                  f"ppl {quality.perplexity:8.2f}  KL {quality.kl:.4f} [{row['kl_ci'][0]:.4f}, {row['kl_ci'][1]:.4f}]",
                  flush=True)
        for module_name, module in linears.items():
            set_linear_weight(module, original[module_name])
        write_results(args.name, {"model": loaded.describe(), "options": table.options,
                                  "sensitivity": {"calibration": table.calibration, "cost": table.cost},
                                  "evaluation": {name: w.describe() for name, w in domains.items()},
                                  "calibration": calibration.describe(), "settings": vars(args), "rows": rows})

    for budget in budgets:
        problem = table.problem(table.budget_bits(budget))
        if budget in RTN_AT and "rtn" in wanted:
            judge(budget, f"uniform rtn {RTN_AT[budget]}", Plan(parse_option(RTN_AT[budget])), {})
        plans = {"uniform gptq": allocate(problem, "uniform")} if "gptq" in wanted else {}
        if "exact" in wanted:
            plans["exact"] = allocate(problem, "exact")
        for name, allocation in plans.items():
            labels = allocation.labels(problem)
            judge(budget, name, plan_from_choice(table, allocation.choice),
                  {"predicted_kl": allocation.total_loss,
                   "options_used": {o: labels.count(o) for o in table.options if o in labels}, "choice": list(labels)})
        if "default" not in wanted:
            continue
        start = time.perf_counter()
        outcome = run_plan(loaded, bits_per_weight=budget, table=args.table, options=args.options,
                           calib=CALIBRATION_TEXT, progress=False)
        report, labels = outcome.report, outcome.allocation.labels(problem)
        judge(budget, "CLI default (layerwise plan)", outcome.plan, {
            "predicted_kl": outcome.allocation.total_loss, "plan_seconds": time.perf_counter() - start,
            "options_used": {o: labels.count(o) for o in table.options if o in labels}, "choice": list(labels),
            "returned": report["returned"], "calibration_kl": report["calibration_kl"], "check": report["check"],
            "search_forward_equivalents": report["search"]["forward_equivalents"],
            "search_seconds": report["search"]["seconds"]})

    document = {"model": loaded.describe(), "options": table.options,
                "sensitivity": {"calibration": table.calibration, "cost": table.cost},
                "evaluation": {name: w.describe() for name, w in domains.items()},
                "calibration": calibration.describe(), "settings": vars(args)}
    _finish(args, document, rows + [row for other in merged for row in other["rows"]], merged)


def _finish(args, document: dict, rows: list[dict], merged: list[dict]) -> None:
    """Paired ratios against the uniform rows of the same budget and text, then the JSON and table."""
    for other in merged:
        if other["evaluation"] != document["evaluation"]:
            raise SystemExit("a merged result file was evaluated on other windows; its rows cannot be paired")
    rows.sort(key=lambda row: (row["budget"], _plan_order(row["allocator"]), row["domain"] != "wikitext2-test"))
    for row in rows:
        same = {r["allocator"]: r for r in rows if r["budget"] == row["budget"] and r["domain"] == row["domain"]}
        rtn = next((r for k, r in same.items() if k.startswith("uniform rtn")), None)
        for key, baseline in (("uniform_rtn", rtn), ("uniform_gptq", same.get("uniform gptq"))):
            if baseline is not None:
                row[f"kl_over_{key}"], row[f"kl_over_{key}_ci"] = paired_ratio(row, baseline)
    write_results(args.name, {key: value for key, value in document.items() if key not in ("rows", "command",
                                                                                            "machine")}
                  | {"merged": list(args.merge), "rows": rows})
    print("\n| budget | plan | text | bits/weight | perplexity | KL [95% interval] | KL / uniform RTN | KL / uniform GPTQ |")
    print("| ---: | --- | --- | ---: | ---: | ---: | ---: | ---: |")
    for row in rows:
        def ratio(key: str) -> str:
            if f"kl_over_{key}" not in row:
                return ""
            low, high = row[f"kl_over_{key}_ci"]
            return f"{row[f'kl_over_{key}']:.3f} [{low:.3f}, {high:.3f}]"
        print(f"| {row['budget']:.2f} | {row['allocator']} | {row['domain']} | {row['bits_per_weight']:.4f} | "
              f"{row['perplexity']:.2f} | {row['kl']:.4f} [{row['kl_ci'][0]:.4f}, {row['kl_ci'][1]:.4f}] | "
              f"{ratio('uniform_rtn')} | {ratio('uniform_gptq')} |")


def _plan_order(allocator: str) -> int:
    return next((i for i, prefix in enumerate(("uniform rtn", "uniform gptq", "exact", "CLI")) if
                 allocator.startswith(prefix)), 9)


if __name__ == "__main__":
    main()
