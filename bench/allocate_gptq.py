"""Per-layer plans whose options are GPTQ widths, against uniform GPTQ and uniform round-to-nearest
at the same sizes, on SmolLM2, all measured in one run.

`bench/allocate.py` compares allocators with round-to-nearest options only, so that plans and
uniform baselines differ only in where the bits go. A user who wants the best model at a size
would also use a better quantizer; this script measures what layerwise then gives: one
sensitivity table of GPTQ options (Hessians from the unquantized model, 2048 tokens of
WikiText-2 valid), the exact and the CLI's default (hybrid, checked against every uniform plan)
allocations, and each plan applied the way `layerwise quantize` applies it (sequential GPTQ,
16384 calibration tokens, the same as `bench/uniform.py`), judged by KL and perplexity on the
first 20 x 512 tokens of wiki.test.raw. Uniform RTN rows of the same sizes are measured in the
same run, so every ratio below compares rows of this run.

    python bench/allocate_gptq.py                                   # bench/results/allocate_gptq.json
    python bench/allocate_gptq.py --table bench/results/allocate_gptq_sensitivity.json  # reuse / resume
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import CALIBRATION_TEXT, EVALUATION_TEXT, SMOLLM2, write_results  # noqa: E402

from layerwise import load_model, token_windows  # noqa: E402
from layerwise.evaluate import base_outputs, evaluate  # noqa: E402
from layerwise.models.layout import block_linears, linear_weight, set_linear_weight  # noqa: E402
from layerwise.plan import Plan  # noqa: E402
from layerwise.plan.allocate import allocate, never_worse_than_uniform  # noqa: E402
from layerwise.plan.fitness import KLFitness  # noqa: E402
from layerwise.plan.options import parse_option  # noqa: E402
from layerwise.plan.run import plan_from_choice, sensitivity_for  # noqa: E402
from layerwise.quant import quantize_  # noqa: E402
from layerwise.quant.size import size_report  # noqa: E402

# The widths of bench/allocate.py with GPTQ instead of round to nearest (int8 is never chosen
# below 5 bits there, so it is left out to save a ninth of the table).
OPTIONS = ("gptq:int2g64,gptq:int3g128t,gptq:int3g64,gptq:int3g32,gptq:int4g128t,gptq:int4g64,"
           "gptq:int5g64,gptq:int6g64")
# The uniform round-to-nearest configuration whose size each budget is, where there is one.
RTN_AT = {3.25: "int3g64", 3.75: "int3g32", 4.25: "int4g64"}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=str(SMOLLM2))
    parser.add_argument("--options", default=OPTIONS)
    parser.add_argument("--budgets", default="3.25,3.75,4.25")
    parser.add_argument("--table", default=None, help="reuse this sensitivity table, or save the new one here "
                        "(an interrupted measurement resumes from TABLE.progress)")
    parser.add_argument("--sensitivity-tokens", type=int, default=2048)
    parser.add_argument("--fitness-tokens", type=int, default=1024)
    parser.add_argument("--calib-tokens", type=int, default=32 * 512, help="GPTQ calibration when a plan is applied")
    parser.add_argument("--eval-tokens", type=int, default=20 * 512)
    parser.add_argument("--generations", type=int, default=10, help="hybrid's search length")
    parser.add_argument("--name", default="allocate_gptq")
    args = parser.parse_args()
    budgets = [float(b) for b in args.budgets.split(",")]

    loaded = load_model(args.model)
    table = sensitivity_for(loaded, table=args.table, options=args.options, granularity="sublayer",
                            calib=CALIBRATION_TEXT, tokens=args.sensitivity_tokens, seed=0)
    print(f"sensitivity table: {len(table.units)} units x {len(table.options)} options, "
          f"{table.cost['seconds']:.0f} s, {table.cost['forward_equivalents']:.1f} forward passes", flush=True)
    evaluation = token_windows(loaded.tokenizer, EVALUATION_TEXT, tokens=args.eval_tokens, seed=None)
    calibration = token_windows(loaded.tokenizer, CALIBRATION_TEXT, tokens=args.calib_tokens, seed=0)
    fitness_windows = token_windows(loaded.tokenizer, CALIBRATION_TEXT, tokens=args.fitness_tokens, seed=1)
    base = base_outputs(loaded, evaluation, progress=False)
    linears = {name: module for _, name, module in block_linears(loaded.model, loaded.adapter)}
    original = {name: linear_weight(module).detach().clone() for name, module in linears.items()}
    rows: list[dict] = []

    def judge(budget: float, name: str, plan: Plan, search: dict) -> dict:
        """Apply `plan` as `layerwise quantize` does, evaluate, put the weights back."""
        start = time.perf_counter()
        needs_data = any(config.algorithm != "rtn" for _, config in plan.rules) or (
            plan.default is not None and plan.default.algorithm != "rtn")
        stored = quantize_(loaded, plan, calibration if needs_data else None, progress=False)
        seconds = time.perf_counter() - start
        sizes = size_report(loaded, stored)
        quality = evaluate(loaded, base, progress=False)
        for module_name, module in linears.items():
            set_linear_weight(module, original[module_name])
        row = {"budget": budget, "allocator": name, "bits_per_weight": sizes["linear_bits_per_weight"],
               "total_bytes": sizes["total_bytes"], "perplexity": quality.perplexity, "kl": quality.kl,
               "top1": quality.top1, "quantize_seconds": seconds} | search
        rows.append(row)
        print(f"{budget:5.2f} {name:34s} {row['bits_per_weight']:.4f} bpw  ppl {quality.perplexity:8.2f}  "
              f"KL {quality.kl:.4f}", flush=True)
        write_results(args.name, {"model": loaded.describe(), "options": table.options,
                                  "sensitivity": {"calibration": table.calibration, "cost": table.cost},
                                  "evaluation": evaluation.describe(), "calibration": calibration.describe(),
                                  "settings": vars(args), "rows": rows})
        return row

    with KLFitness(loaded, table, fitness_windows, batch_size=1, batches_per_stage=(1, None)) as fitness:
        for budget in budgets:
            problem = table.problem(table.budget_bits(budget))
            if budget in RTN_AT:
                judge(budget, f"uniform rtn {RTN_AT[budget]}", Plan(parse_option(RTN_AT[budget])), {})
            plans = {"uniform gptq": allocate(problem, "uniform"), "exact": allocate(problem, "exact")}
            before = (fitness.calls, fitness.forward_equivalents(), fitness.seconds)
            hybrid = allocate(problem, "hybrid", fidelities=fitness, survivors=[4, 1],
                              generations=args.generations, offspring=16, seed=0)
            recommended = never_worse_than_uniform(problem, hybrid, fitness.full)
            search = {"search_seconds": fitness.seconds - before[2],
                      "search_forward_equivalents": fitness.forward_equivalents() - before[1]}
            plans[f"CLI default (hybrid, checked: {recommended.allocator})"] = recommended
            fitness.restore()  # quantize_ starts from the original weights
            for name, allocation in plans.items():
                labels = allocation.labels(problem)
                judge(budget, name, plan_from_choice(table, allocation.choice),
                      {"predicted_kl": allocation.total_loss,
                       "options_used": {o: labels.count(o) for o in table.options if o in labels},
                       "choice": list(labels)} | (search if name.startswith("CLI") else {}))

    print("\n| budget | plan | bits/weight | perplexity | KL | top-1 | KL / uniform RTN | KL / uniform GPTQ |")
    print("| ---: | --- | ---: | ---: | ---: | ---: | ---: | ---: |")
    for row in rows:
        same = {r["allocator"]: r["kl"] for r in rows if r["budget"] == row["budget"]}
        rtn = next((v for k, v in same.items() if k.startswith("uniform rtn")), None)
        gptq = same.get("uniform gptq")
        print(f"| {row['budget']:.2f} | {row['allocator']} | {row['bits_per_weight']:.4f} | {row['perplexity']:.2f} | "
              f"{row['kl']:.4f} | {row['top1']:.3f} | {row['kl'] / rtn if rtn else float('nan'):.3f} | "
              f"{row['kl'] / gptq if gptq else float('nan'):.3f} |")


if __name__ == "__main__":
    main()
