"""What cheap sensitivity estimates cost and what they lose, against the measured table, on SmolLM2.

The measured table is the four-domain one of bench/robust.py (the dithered SmolLM2, the default
options and windows of `layerwise plan`: 4096 tokens of the shipped mix, units per sublayer);
every estimator (`layerwise.measure.estimators`) fills a table on the same windows and options. For
each: its cost in forward passes of the table's windows (and the measured table's, counted the
same way), Spearman's rank correlation of its entries with the measured ones, and the quality of
`layerwise plan`'s default plan from it (exact allocator, never-worse check on held-out
calibration windows) at 3.25 and 4.25 bits per weight, judged on WikiText-2 test and on Python
code (20 x 512 tokens each), with the paired KL ratio to the plan from the measured table.

    python bench/sensitivity.py    # about 45 minutes on 2 cores once the measured table exists
    python bench/sensitivity.py --ranks-only    # cost, Spearman and top-10% agreement only
    python bench/sensitivity.py --ranks-only --estimators fisher@1,fisher@2,fisher@4 --name fisher_samples
        # fisher@K: fisher with K draws of the sampled tokens per window (FISHER_SAMPLES)
"""
from __future__ import annotations

import argparse
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
from layerwise.measure.sensitivity import head_cost_in_blocks  # noqa: E402
from layerwise.measure import estimators  # noqa: E402
from layerwise.plan.table import SensitivityTable  # noqa: E402

OUT = Path(__file__).resolve().parent / "out" / "sensitivity"


def measured_passes(loaded, table: SensitivityTable) -> float:
    """What the measured table costs for these options, counted as measure_sensitivity counts:
    one base pass, then for every entry the blocks from the unit's on and the head."""
    n_blocks, head = loaded.n_blocks, head_cost_in_blocks(loaded)
    runs = sum((n_blocks - max(unit.block, 0) + head) * np.isfinite(table.kl[u]).sum()
               for u, unit in enumerate(table.units))
    return 1.0 + runs / (n_blocks + head)


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


def rank_rows(tables: dict) -> list[dict]:
    """Per estimator: cost, Spearman of all entries and top-10% agreement with the measured table."""
    measured = tables["measured"][1]
    rows = []
    for name, (_, table, passes) in tables.items():
        finite = np.isfinite(measured.kl) & np.isfinite(table.kl)
        rows.append({"estimator": name, "cost_passes": passes, "measured_cost_passes": tables["measured"][2],
                     "cost_ratio": passes / tables["measured"][2],
                     "spearman": float(spearmanr(measured.kl[finite], table.kl[finite]).statistic),
                     "top_10pct_agreement": top_k_agreement(measured, table), "seconds": table.cost["seconds"],
                     "per_option": {option: _option_agreement(measured.kl[:, o], table.kl[:, o])
                                    for o, option in enumerate(measured.options)}})
    return rows


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
    parser.add_argument("--estimators", default=",".join(name for name in ESTIMATORS if name != "measured"))
    parser.add_argument("--budgets", default="3.25,4.25")
    parser.add_argument("--eval-tokens", type=int, default=10240)
    parser.add_argument("--name", default="sensitivity")
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
    tables = {"measured": (args.table, measured, measured_passes(loaded, measured))}
    for name in args.estimators.split(","):
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

    ranks = rank_rows(tables)
    print(f"{'estimator':9s} {'passes':>7s} {'x measured':>10s} {'spearman':>8s} {'top 10%':>7s}")
    for row in ranks:
        print(f"{row['estimator']:9s} {row['cost_passes']:7.1f} {row['cost_ratio']:10.3f} {row['spearman']:8.3f} "
              f"{row['top_10pct_agreement']:7.2f}")
    if args.ranks_only:
        write_results(f"{args.name}_ranks", {"model": "dithered SmolLM2-135M-Instruct", "table": args.table,
                                             "options": args.options, "rows": ranks})
        return

    evaluation = evaluation_domains(loaded.tokenizer, args.eval_tokens)
    bases = {domain: base_outputs(loaded, w, progress=False) for domain, w in evaluation.items()}
    # The bank only keeps every (unit, option)'s weights; its own windows are never judged on.
    bank_windows = token_windows(loaded.tokenizer, EVALUATION_TEXT, tokens=512, seq_len=512, seed=None)
    rows, plans = [], {}
    with KLFitness(loaded, measured, bank_windows, batch_size=1) as bank:
        for bits in budgets:
            judged = {}
            for name, (path, table, passes) in tables.items():
                bank.restore()
                started = time.perf_counter()
                outcome = run_plan(loaded, bits_per_weight=bits, table=path, options=args.options,
                                   estimator=table.estimator, progress=False)
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
            for rank in ranks:
                name = rank["estimator"]
                for domain in evaluation:
                    ratio, interval = paired_ratio(judged[name][domain], judged["measured"][domain])
                    rows.append({key: rank[key] for key in ("estimator", "cost_passes", "measured_cost_passes",
                                                            "cost_ratio", "spearman", "top_10pct_agreement")}
                                | {"budget": bits, "domain": domain, "kl": judged[name][domain]["kl"],
                                   "kl_ci": judged[name][domain]["kl_ci"],
                                   "kl_measured_table": judged["measured"][domain]["kl"], "ratio": ratio,
                                   "ratio_ci": interval, "window_kl": judged[name][domain]["window_kl"]})
            write_results(args.name, {"model": "dithered SmolLM2-135M-Instruct", "table": args.table,
                                      "options": args.options, "rows": rows, "plans": plans})
    print(f"{'estimator':9s} {'budget':>6s} {'domain':15s} {'passes':>7s} {'x measured':>10s} {'spearman':>8s} "
          f"{'KL':>7s} {'KL / measured-table plan [95%]':>32s}")
    for row in rows:
        print(f"{row['estimator']:9s} {row['budget']:6.2f} {row['domain']:15s} {row['cost_passes']:7.1f} "
              f"{row['cost_ratio']:10.3f} {row['spearman']:8.3f} {row['kl']:7.4f} "
              f"{row['ratio']:8.3f} [{row['ratio_ci'][0]:.3f}, {row['ratio_ci'][1]:.3f}]")


if __name__ == "__main__":
    main()
