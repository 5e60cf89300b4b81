"""What cheap sensitivity estimates cost and what they lose, against the measured table, on SmolLM2.

The measured table is the four-domain one of bench/robust.py (the dithered SmolLM2, the default
options and windows of `layerwise plan`: 4096 tokens of the shipped mix, units per sublayer);
every estimator (`layerwise.measure.estimators`) fills a table on the same windows and options. For
each: its cost in forward passes of the table's windows (and the measured table's, counted the
same way), Spearman's rank correlation of its entries with the measured ones, and the quality of
`layerwise plan`'s default plan from it (exact allocator, never-worse check on held-out
calibration windows) at 3.25 and 4.25 bits per weight, judged on WikiText-2 test and on Python
code (20 x 512 tokens each), with the paired KL ratio to the plan from the measured table. `auto`
is the fisher table with the entries each plan hinges on measured (`layerwise.measure.refine`),
refined afresh per budget from the fisher table, so its cost and agreement are per budget.

    python bench/sensitivity.py    # about 70 minutes on 2 cores once the measured table exists
    python bench/sensitivity.py --estimators auto --merge    # auto again, the other rows kept
    python bench/sensitivity.py --ranks-only    # cost, Spearman and top-10% agreement only
    python bench/sensitivity.py --ranks-only --estimators fisher@1,fisher@2,fisher@4 --name fisher_samples
        # fisher@K: fisher with K draws of the sampled tokens per window (FISHER_SAMPLES)
"""
from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
from pathlib import Path

import numpy as np
from scipy.stats import spearmanr

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import EVALUATION_TEXT, RESULTS, dithered_smollm2, evaluation_domains, paired_ratio, quality_row, write_results  # noqa: E402

from layerwise import load_model, token_windows  # noqa: E402
from layerwise.data.overlap import rebuild_windows  # noqa: E402
from layerwise.evaluate import base_outputs, evaluate  # noqa: E402
from layerwise.measure.estimators import ESTIMATORS, FISHER_SAMPLES  # noqa: E402
from layerwise.measure.fitness import KLFitness  # noqa: E402
from layerwise.measure.run import DEFAULT_OPTIONS, run_plan, sensitivity_for  # noqa: E402
from layerwise.measure.sensitivity import measured_passes  # noqa: E402
from layerwise.measure import estimators  # noqa: E402
from layerwise.plan.table import SensitivityTable  # noqa: E402

OUT = Path(__file__).resolve().parent / "out" / "sensitivity"


def top_k_agreement(measured: SensitivityTable, estimate: SensitivityTable, share: float = 0.1) -> float:
    """Per option, the fraction of the measured table's most damaging units (the top `share` of
    units by KL) that the estimate also ranks there; the mean over options."""
    k = max(1, round(share * len(measured.units)))
    agreements = []
    for o in range(len(measured.options)):
        if not (np.all(np.isfinite(measured.kl[:, o])) and np.all(np.isfinite(estimate.kl[:, o]))):
            continue
        truth = set(np.argsort(-measured.kl[:, o])[:k])
        agreements.append(len(truth & set(np.argsort(-estimate.kl[:, o])[:k])) / k)
    return float(np.mean(agreements))


def rank_row(name: str, table: SensitivityTable, passes: float, measured: SensitivityTable,
             measured_cost: float) -> dict:
    """An estimator's cost, Spearman of all entries and top-10% agreement with the measured table."""
    finite = np.isfinite(measured.kl) & np.isfinite(table.kl)
    return {"estimator": name, "cost_passes": passes, "measured_cost_passes": measured_cost,
            "cost_ratio": passes / measured_cost,
            "spearman": float(spearmanr(measured.kl[finite], table.kl[finite]).statistic),
            "top_10pct_agreement": top_k_agreement(measured, table), "seconds": table.cost["seconds"],
            "per_option": {option: _option_agreement(measured.kl[:, o], table.kl[:, o])
                           for o, option in enumerate(measured.options)}}


def _option_agreement(truth: np.ndarray, estimate: np.ndarray) -> dict:
    """Within one option: Spearman over units, and the 10th/50th/90th percentiles of estimate / truth."""
    finite = np.isfinite(truth) & np.isfinite(estimate) & (truth > 0)
    ratios = estimate[finite] / truth[finite]
    return {"spearman": float(spearmanr(truth[finite], estimate[finite]).statistic),
            "ratio_percentiles_10_50_90": [float(v) for v in np.percentile(ratios, [10, 50, 90])]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=None, help="another model (default: the dithered SmolLM2)")
    parser.add_argument("--table", default=str(RESULTS / "robust_sensitivity.json"),
                        help="the measured table (bench/robust.py's); its windows are every estimator's")
    parser.add_argument("--options", default=DEFAULT_OPTIONS)
    cheap = [name for name in ESTIMATORS if name != "measured"] + ["auto"]
    parser.add_argument("--estimators", default=",".join(cheap),
                        help="estimators to compare with the measured table; auto is fisher with the entries "
                             "each plan hinges on measured (its cost and table differ per budget)")
    parser.add_argument("--budgets", default="3.25,4.25")
    parser.add_argument("--eval-tokens", type=int, default=10240)
    parser.add_argument("--name", default="sensitivity")
    parser.add_argument("--merge", action="store_true",
                        help="keep the rows of estimators not given from results NAME.json (the measured-table "
                             "plan is judged again; its KL must come out the same)")
    parser.add_argument("--ranks-only", action="store_true",
                        help="only the tables' cost and agreement with the measured one (results NAME_ranks.json)")
    args = parser.parse_args()
    budgets = [float(b) for b in args.budgets.split(",")]
    OUT.mkdir(parents=True, exist_ok=True)

    loaded = load_model(args.model or dithered_smollm2())
    measured = sensitivity_for(loaded, table=args.table, options=args.options, estimator="measured")
    windows = rebuild_windows(loaded.tokenizer, measured.calibration)
    if windows is None:
        sys.exit(f"the calibration text of {args.table} cannot be found to re-cut its windows")
    measured_cost = measured_passes(loaded, measured)
    tables = {"measured": (args.table, measured, measured_cost)}
    asked = [name for name in args.estimators.split(",") if name != "measured"]  # measured is always run
    if args.ranks_only and "auto" in asked:
        asked.remove("auto")  # its table depends on the budget: only a plan makes it
    for name in dict.fromkeys("fisher" if name == "auto" else name for name in asked):
        path = OUT / f"{name}.json"
        if not path.exists():
            estimator, _, samples = name.partition("@")
            if samples:  # fisher@K: K draws of the sampled tokens per window
                estimators.FISHER_SAMPLES = int(samples)
            try:
                sensitivity_for(loaded, table=path, options=args.options, granularity=measured.granularity,
                                windows=windows, estimator=estimator)
            finally:
                estimators.FISHER_SAMPLES = FISHER_SAMPLES
        estimated = SensitivityTable.load(path)
        estimated.check_model(loaded)
        tables[name] = (str(path), estimated, estimated.cost["forward_equivalents"])
        print(f"{name}: {estimated.cost['forward_equivalents']:.1f} passes, {estimated.cost['seconds']:.0f} s",
              flush=True)

    ranks = [rank_row(name, table, passes, measured, measured_cost) for name, (_, table, passes) in tables.items()]
    print(f"{'estimator':9s} {'passes':>7s} {'x measured':>10s} {'spearman':>8s} {'top 10%':>7s}")
    for row in ranks:
        print(f"{row['estimator']:9s} {row['cost_passes']:7.1f} {row['cost_ratio']:10.3f} {row['spearman']:8.3f} "
              f"{row['top_10pct_agreement']:7.2f}")
    if args.ranks_only:
        write_results(f"{args.name}_ranks", {"model": "dithered SmolLM2-135M-Instruct", "table": args.table,
                                             "options": args.options, "rows": ranks})
        return

    previous = json.loads((RESULTS / f"{args.name}.json").read_text()) if args.merge else {"rows": [], "plans": {}}
    kept_plans = previous["plans"]
    # The commands whose rows the file holds: this one and, with --merge, the earlier ones.
    commands = previous.get("earlier_commands", []) + ([previous["command"]] if "command" in previous else [])

    def kept(rows: list[dict]) -> list[dict]:
        """This run's rows and, with --merge, the earlier ones of estimators not run again, judged
        against the same measured-table plan (checked: its KL must be what it was, to the last digits
        that threads' summation order moves)."""
        for row in rows:
            for old in previous["rows"]:
                if (old["estimator"], old["budget"], old["domain"]) == ("measured", row["budget"], row["domain"]) \
                        and row["estimator"] == "measured" and abs(old["kl"] / row["kl"] - 1) > 1e-4:
                    sys.exit(f"the measured-table plan's KL changed ({old['kl']} -> {row['kl']}): "
                             "rerun every estimator")
        redone = {(row["estimator"], row["budget"]) for row in rows}
        earlier = [row for row in previous["rows"] if (row["estimator"], row["budget"]) not in redone]

        def order(row: dict) -> tuple:
            return row["budget"], row["domain"] != "wikitext2-test", row["estimator"] != "measured"
        return sorted(rows + earlier, key=order)

    evaluation = evaluation_domains(loaded.tokenizer, args.eval_tokens)
    bases = {domain: base_outputs(loaded, w, progress=False) for domain, w in evaluation.items()}
    # The bank only keeps every (unit, option)'s weights; its own windows are never judged on.
    bank_windows = token_windows(loaded.tokenizer, EVALUATION_TEXT, tokens=512, seq_len=512, seed=None)
    rows, plans = [], {}
    with KLFitness(loaded, measured, bank_windows, batch_size=1) as bank:
        for bits in budgets:
            judged, ranked = {}, {rank["estimator"]: rank for rank in ranks}
            for name in ["measured"] + asked:
                path, table, _ = tables["fisher" if name == "auto" else name]
                if name == "auto":  # a fresh copy of the fisher table per budget, which the plan refines
                    path = OUT / f"auto_{bits}.json"
                    shutil.copyfile(tables["fisher"][0], path)
                bank.restore()
                started = time.perf_counter()
                outcome = run_plan(loaded, bits_per_weight=bits, table=path, options=args.options,
                                   estimator="auto" if name == "auto" else table.estimator, progress=False)
                if name == "auto":
                    refined = SensitivityTable.load(path)
                    ranked[name] = rank_row(name, refined, refined.cost["forward_equivalents"], measured,
                                            measured_cost) | {"refinement": outcome.report["refinement"]}
                labels = [outcome.report["options"][unit.name] for unit in measured.units]
                choice = [measured.options.index(label) for label in labels]
                plans[f"{name} {bits}"] = labels
                judged[name] = {}
                for domain in evaluation:
                    bank.apply(choice)
                    judged[name][domain] = quality_row(evaluate(loaded, bases[domain], progress=False))
                print(f"{bits:5.2f} {name:9s} plan {outcome.report['returned']} in "
                      f"{time.perf_counter() - started:.0f} s: " + ", ".join(
                          f"{d} KL {q['kl']:.4f}" for d, q in judged[name].items()), flush=True)
            for name, rank in ranked.items():
                if name not in judged:
                    continue
                for domain in evaluation:
                    ratio, interval = paired_ratio(judged[name][domain], judged["measured"][domain])
                    rows.append({key: rank[key] for key in ("estimator", "cost_passes", "measured_cost_passes",
                                                            "cost_ratio", "spearman", "top_10pct_agreement")}
                                | {"budget": bits, "domain": domain, "kl": judged[name][domain]["kl"],
                                   "kl_ci": judged[name][domain]["kl_ci"],
                                   "kl_measured_table": judged["measured"][domain]["kl"], "ratio": ratio,
                                   "ratio_ci": interval, "window_kl": judged[name][domain]["window_kl"]}
                                | ({"refinement": rank["refinement"]} if "refinement" in rank else {}))
            write_results(args.name, {"model": "dithered SmolLM2-135M-Instruct", "table": args.table,
                                      "options": args.options, "rows": kept(rows), "plans": kept_plans | plans,
                                      "earlier_commands": commands})
    print(f"{'estimator':9s} {'budget':>6s} {'domain':15s} {'passes':>7s} {'x measured':>10s} {'spearman':>8s} "
          f"{'KL':>7s} {'KL / measured-table plan [95%]':>32s}")
    for row in kept(rows):
        print(f"{row['estimator']:9s} {row['budget']:6.2f} {row['domain']:15s} {row['cost_passes']:7.1f} "
              f"{row['cost_ratio']:10.3f} {row['spearman']:8.3f} {row['kl']:7.4f} "
              f"{row['ratio']:8.3f} [{row['ratio_ci'][0]:.3f}, {row['ratio_ci'][1]:.3f}]")


if __name__ == "__main__":
    main()
