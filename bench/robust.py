"""Do plans hold on a kind of text they were not fitted on? Leave-one-domain-out on SmolLM2.

The default calibration is a mix of four domains (prose, code, verse, tables). For every domain in
turn, `layerwise plan` (run_plan, every default but the objective) is calibrated on the other
three and judged on held-out text of the one left out, against the uniform plan of the same size
on the same windows (paired ratio with a 95% bootstrap interval). Held-out text per domain, never
in any calibration file: WikiText-2 test (prose), the Python standard library's modules other
than the five in the code excerpt (code), the last 70 kB of tinyshakespeare (verse), and
population and Mauna Loa CO2 tables (tables) -- see bench/data/README.md.

The model is the off-grid ("dithered") SmolLM2 of ../shared/README.md, since int4 is one of the
options: on the shared GGUF every 4-bit option would be judged on weights already on a 4-bit grid.
One sensitivity table is measured on all four domains (the default 4096 tokens, 1024 per domain)
and each leave-one-out plan uses only its three domains' columns of it, exactly as `layerwise plan
--table` does when given three of the four calibration files. Rows with `left_out` false are plans
calibrated on all four domains (the default), judged on every domain's held-out text.

`--sensitivity` and `--granularity` fill the table another way (e.g. `--sensitivity fisher`, what
`layerwise compress` uses by default); such tables are kept in bench/out/robust/.

    python bench/robust.py    # about 40 minutes after the table (about 55 minutes) on 2 cores
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import EVALUATION_TEXT, RESULTS, ROOT, dithered_smollm2, paired_ratio, quality_row, write_results  # noqa: E402

from layerwise import load_model, token_windows  # noqa: E402
from layerwise.data.domains import DEFAULT_DOMAINS, domain_slots, take_from_domains  # noqa: E402
from layerwise.evaluate import base_outputs, evaluate  # noqa: E402
from layerwise.measure.fitness import KLFitness  # noqa: E402
from layerwise.measure.run import DEFAULT_OPTIONS, run_plan, sensitivity_for  # noqa: E402
from layerwise.plan.objectives import DEFAULT_OBJECTIVE, OBJECTIVES  # noqa: E402

CODE_SEED = 20261204
# The modules of the shipped code excerpt (src/layerwise/data/calibration/LICENSE): never judged on.
CALIBRATION_MODULES = {"textwrap.py", "heapq.py", "shlex.py", "glob.py", "fnmatch.py"}


def heldout_code_text() -> str:
    import sysconfig

    folder = Path(sysconfig.get_paths()["stdlib"])
    files = sorted(path for path in folder.glob("*.py")
                   if not path.name.startswith("_") and path.name not in CALIBRATION_MODULES)
    return "\n\n".join(f"# {path.name}\n{path.read_text(encoding='utf-8', errors='replace')}" for path in files)


def heldout_windows(tokenizer, tokens: int, seq_len: int = 512) -> dict:
    data = ROOT / "bench" / "data"
    cut = dict(tokens=tokens, seq_len=seq_len)
    return {"prose": token_windows(tokenizer, EVALUATION_TEXT, seed=None, **cut),
            "code": token_windows(tokenizer, [heldout_code_text()], seed=CODE_SEED, **cut),
            "verse": token_windows(tokenizer, data / "shakespeare_heldout.txt", seed=None, **cut),
            "tables": token_windows(tokenizer, data / "tables_heldout.txt", seed=None, **cut)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--budgets", default="3.25,4.25")
    parser.add_argument("--objectives", default=",".join(OBJECTIVES))
    parser.add_argument("--table", default=None,
                        help="the four-domain sensitivity table: reused if it exists, else measured and saved "
                             "(default: bench/results/robust_sensitivity.json for the measured table of "
                             "sublayers, else bench/out/robust/ESTIMATOR-GRANULARITY.json)")
    parser.add_argument("--granularity", default="sublayer", choices=["block", "sublayer", "linear"])
    parser.add_argument("--sensitivity", default="measured", help="the table's estimator (layerwise.measure.estimators)")
    parser.add_argument("--eval-tokens", type=int, default=10240)
    parser.add_argument("--model", default=None, help="another model (default: the dithered SmolLM2)")
    parser.add_argument("--options", default=DEFAULT_OPTIONS, help="the plan's options (default: run_plan's)")
    parser.add_argument("--seq-len", type=int, default=512)
    parser.add_argument("--held-out-only", action="store_true",
                        help="skip the plans calibrated on all four domains (judged on each)")
    parser.add_argument("--resume", action="store_true",
                        help="keep the rows already in the results file and measure only the missing ones")
    parser.add_argument("--name", default="robust")
    args = parser.parse_args()
    budgets = [float(b) for b in args.budgets.split(",")]
    objectives = args.objectives.split(",")
    if args.table is None:
        args.table = str(RESULTS / "robust_sensitivity.json" if (args.sensitivity, args.granularity) == (
            "measured", "sublayer") else ROOT / "bench" / "out" / "robust" / f"{args.sensitivity}-{args.granularity}.json")
        Path(args.table).parent.mkdir(parents=True, exist_ok=True)

    loaded = load_model(args.model or dithered_smollm2())
    slots = domain_slots(loaded.tokenizer, None, seq_len=args.seq_len)
    # The windows run_plan draws for a new table with every default: the table is the plan's own.
    table = sensitivity_for(loaded, table=args.table, options=args.options, granularity=args.granularity,
                            windows=None if Path(args.table).exists() else take_from_domains(slots, 4096, 0),
                            estimator=args.sensitivity)
    print(f"sensitivity table: {len(table.units)} units x {len(table.options)} options on {table.domains}, "
          f"{table.cost['seconds']:.0f} s", flush=True)
    evaluation = heldout_windows(loaded.tokenizer, args.eval_tokens, args.seq_len)
    bases = {name: base_outputs(loaded, windows, progress=False) for name, windows in evaluation.items()}
    rows: list[dict] = []
    if args.resume and (RESULTS / f"{args.name}.json").exists():
        rows = json.loads((RESULTS / f"{args.name}.json").read_text())["rows"]
    done = {(row["budget"], row["objective"], row["left_out"], row["heldout_domain"]) for row in rows}
    uniform_rows: dict[tuple[float, str], dict] = {}
    bank_windows = token_windows(loaded.tokenizer, EVALUATION_TEXT, tokens=args.seq_len, seq_len=args.seq_len, seed=None)
    with KLFitness(loaded, table, bank_windows, batch_size=1) as bank:
        def judge(choice, domain: str) -> dict:
            bank.apply(choice)
            return quality_row(evaluate(loaded, bases[domain], progress=False))

        for bits in budgets:
            if all((bits, objective, True, domain) in done for objective in objectives for domain in DEFAULT_DOMAINS) \
                    and args.held_out_only:
                continue
            problem = table.problem(table.budget_bits(bits))
            # The same-size uniform plan: the costliest single option that fits (int3 at 3.25, int4 at 4.25).
            fitting = [c for c in range(len(table.options)) if problem.total_cost((c,) * len(table.units)) <= problem.budget]
            uniform_option = max(fitting, key=lambda c: problem.total_cost((c,) * len(table.units)))
            for domain in DEFAULT_DOMAINS:
                uniform_rows[bits, domain] = judge((uniform_option,) * len(table.units), domain) | {
                    "option": table.options[uniform_option]}
                print(f"{bits:5.2f} uniform {table.options[uniform_option]} on {domain}: KL "
                      f"{uniform_rows[bits, domain]['kl']:.4f}", flush=True)
            for objective in objectives:
                runs = [(domain, [d for d in DEFAULT_DOMAINS if d != domain], [domain]) for domain in DEFAULT_DOMAINS]
                if objective == DEFAULT_OBJECTIVE and not args.held_out_only:
                    runs.append((None, list(DEFAULT_DOMAINS), list(DEFAULT_DOMAINS)))
                for left_out, calibrated, judged in runs:
                    if all((bits, objective, left_out is not None, domain) in done for domain in judged):
                        continue
                    bank.restore()
                    start = time.perf_counter()
                    outcome = run_plan(loaded, bits_per_weight=bits, table=args.table, options=args.options,
                                       objective=objective, estimator=table.estimator,
                                       calib={d: DEFAULT_DOMAINS[d] for d in calibrated}, seq_len=args.seq_len,
                                       progress=False)
                    seconds = time.perf_counter() - start
                    labels = outcome.allocation.labels(outcome.table.problem(outcome.table.budget_bits(bits)))
                    for domain in judged:
                        quality = judge(outcome.allocation.choice, domain)
                        uniform = uniform_rows[bits, domain]
                        ratio, interval = paired_ratio(quality, uniform)
                        row = {"heldout_domain": domain, "left_out": left_out is not None, "budget": bits,
                               "objective": objective, "calibrated_on": calibrated, "kl": quality["kl"],
                               "kl_ci": quality["kl_ci"], "uniform_option": uniform["option"],
                               "uniform_kl": uniform["kl"], "uniform_kl_ci": uniform["kl_ci"], "ratio": ratio,
                               "ratio_ci": interval, "perplexity": quality["perplexity"],
                               "uniform_perplexity": uniform["perplexity"],
                               "bits_per_weight": outcome.report["bits_per_weight"],
                               "returned": outcome.report["returned"],
                               "check": {d: {k: v for k, v in c.items() if k in ("ratio", "ratio_ci", "margin",
                                                                                  "margin_ci", "best_uniform")}
                                         for d, c in outcome.report["check"]["domains"].items()},
                               "options_used": {o: labels.count(o) for o in table.options if o in labels},
                               "choice": list(labels), "seconds": seconds, "window_kl": quality["window_kl"],
                               "uniform_window_kl": uniform["window_kl"]}
                        rows.append(row)
                        print(f"{bits:5.2f} {objective:9s} {'held out' if row['left_out'] else 'all four':8s} "
                              f"{domain:7s} KL {row['kl']:.4f} vs uniform {row['uniform_kl']:.4f}: ratio "
                              f"{ratio:.3f} [{interval[0]:.3f}, {interval[1]:.3f}] ({row['returned']})", flush=True)
                    write_results(args.name, _payload(args, table, evaluation, rows))
    summary = _summary(rows)
    write_results(args.name, _payload(args, table, evaluation, rows) | {"summary": summary})
    _print_table(rows, summary)


def _summary(rows: list[dict]) -> dict:
    """Per budget and objective, over held-out domains: the mean ratio and the worst upper bound."""
    summary = {}
    for row in rows:
        if not row["left_out"]:
            continue
        entry = summary.setdefault(f"{row['budget']} {row['objective']}", {"ratios": {}, "upper": {}})
        entry["ratios"][row["heldout_domain"]] = row["ratio"]
        entry["upper"][row["heldout_domain"]] = row["ratio_ci"][1]
    for entry in summary.values():
        entry["mean_ratio"] = float(np.mean(list(entry["ratios"].values())))
        entry["largest_upper_bound"] = float(max(entry["upper"].values()))
        entry["never_worse_with_confidence"] = entry["largest_upper_bound"] < 1.0
        entry["mean_at_most_0.8"] = entry["mean_ratio"] <= 0.8
    return summary


def _payload(args, table, evaluation, rows) -> dict:
    return {"model": args.model or "dithered SmolLM2-135M-Instruct (../shared/models/dither_smollm2.py)",
            "options": table.options, "granularity": table.granularity, "default_objective": DEFAULT_OBJECTIVE,
            "sensitivity": {"calibration": table.calibration, "cost": table.cost},
            "evaluation": {name: windows.describe() for name, windows in evaluation.items()},
            "settings": vars(args), "rows": rows}


def _print_table(rows: list[dict], summary: dict) -> None:
    print("\n| budget | objective | held-out domain | plan KL | uniform KL | KL / uniform [95% interval] | returned |")
    print("| ---: | --- | --- | ---: | ---: | ---: | --- |")
    for r in rows:
        if r["left_out"]:
            print(f"| {r['budget']:.2f} | {r['objective']} | {r['heldout_domain']} | {r['kl']:.4f} | "
                  f"{r['uniform_kl']:.4f} ({r['uniform_option']}) | {r['ratio']:.3f} [{r['ratio_ci'][0]:.3f}, "
                  f"{r['ratio_ci'][1]:.3f}] | {r['returned']} |")
    print("\n| budget | objective | mean ratio over held-out domains | largest upper bound |")
    print("| ---: | --- | ---: | ---: |")
    for key, entry in summary.items():
        bits, objective = key.split(" ")
        print(f"| {bits} | {objective} | {entry['mean_ratio']:.3f} | {entry['largest_upper_bound']:.3f} |")


if __name__ == "__main__":
    main()
