"""Where the leave-one-domain-out gap to 0.8x of uniform comes from (issue 20), from the saved
sensitivity table of bench/robust.py alone: no model runs, nothing here sees test text.

For every held-out domain and budget, plans are allocated as `layerwise plan` allocates them
(`exact`, the table's three other domains' columns) and scored by the table's additive model on
the held-out domain's own column (its calibration excerpt), as a ratio to same-size uniform:

- `left_out`: the default plan (mean objective, three domains): what the table promises for the
  domain it never saw;
- `own_column`: a plan fitted on the held-out domain's column alone, an oracle no user has: the
  most that allocating these options can give that domain by the table's own measure;
- `mean+std x`: the left-out plan with each entry priced at its mean plus x standard deviations
  across the three domains (the risk term issue 20 suggests).

Beside them, from bench/robust.py's rows (`robust.json` for the six default options,
`robust_fine.json` for twelve): the realized ratio on the held-out domain's test text, and the
plan's measured ratio on the never-worse check's windows of the three domains it was fitted on,
next to what the table predicts for those three domains (`fitted_domains_predicted`): the
additive model's own error, on text of the domains it was fitted to.

    python bench/robust_diagnosis.py     # seconds
"""
from __future__ import annotations

import argparse
import ast
import json
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import RESULTS, write_results  # noqa: E402

from layerwise.measure.run import DEFAULT_OPTIONS  # noqa: E402
from layerwise.plan.allocate import allocate  # noqa: E402
from layerwise.plan.problem import AllocationProblem  # noqa: E402
from layerwise.plan.table import SensitivityTable  # noqa: E402

BUDGETS = {3.25: "int3g64", 4.25: "int4g64"}
RISK = (0.5, 1.0, 2.0)
OPTION_SETS = {"6 options (default)": (DEFAULT_OPTIONS, "robust.json"),
               "12 options": ("int2g64,int3g64,int4g64,int5g64,int6g64,int8g64,int2g32,int3g32,int4g32,"
                              "int3g192,int4g192,int5g192", "robust_fine.json")}


def _bench_rows(name: str) -> dict[tuple[float, str], dict]:
    path = RESULTS / name
    if not path.exists():
        return {}
    rows = json.loads(path.read_text())["rows"]
    return {(row["budget"], row["heldout_domain"]): row for row in rows
            if row["objective"] == "mean" and row.get("left_out", True)}


def _check_ratio(row: dict | None) -> float | None:
    """The plan's mean ratio to uniform on the check windows of the domains it was fitted on."""
    if row is None or row.get("returned") == "uniform":
        return None
    check = row["check"] if isinstance(row["check"], dict) else ast.literal_eval(row["check"])
    return float(np.mean([domain["ratio"] for domain in check.values()]))


def _choice(table: SensitivityTable, loss: np.ndarray, budget_bits: float) -> tuple[int, ...]:
    problem = AllocationProblem(tuple(unit.name for unit in table.units), tuple(table.options),
                                table.cost_bits, loss, budget_bits)
    return allocate(problem, "exact").choice


def _ratio(column: np.ndarray, choice: tuple[int, ...], uniform: int) -> float:
    return float(column[np.arange(len(choice)), list(choice)].sum() / column[:, uniform].sum())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--table", default=str(RESULTS / "robust_sensitivity.json"))
    args = parser.parse_args()
    full = SensitivityTable.load(args.table)
    rows = []
    for label, (options, realized_file) in OPTION_SETS.items():
        table = full.with_options(options.split(","))
        realized = _bench_rows(realized_file)
        domain_kl = {domain: np.asarray(values, dtype=np.float64) for domain, values in table.domain_kl.items()}
        for bits, uniform_name in BUDGETS.items():
            budget = table.budget_bits(bits)
            uniform = list(table.options).index(uniform_name)
            for held_out, column in domain_kl.items():
                others = np.stack([values for domain, values in domain_kl.items() if domain != held_out])
                left_out = _choice(table, others.mean(axis=0), budget)
                bench = realized.get((bits, held_out))
                row = {"options": label, "budget": bits, "heldout_domain": held_out,
                       "left_out": _ratio(column, left_out, uniform),
                       "own_column": _ratio(column, _choice(table, column, budget), uniform),
                       "fitted_domains_predicted": float(np.mean([_ratio(other, left_out, uniform)
                                                                  for other in others])),
                       "fitted_domains_check_windows": _check_ratio(bench),
                       "realized_on_test_text": bench["ratio"] if bench is not None else None}
                for risk in RISK:
                    priced = others.mean(axis=0) + risk * others.std(axis=0)
                    row[f"mean+std x{risk:g}"] = _ratio(column, _choice(table, priced, budget), uniform)
                rows.append(row)
    keys = ["left_out", "own_column", *(f"mean+std x{risk:g}" for risk in RISK), "fitted_domains_predicted",
            "fitted_domains_check_windows", "realized_on_test_text"]
    summary = []
    print(f"{'options':20} {'budget':>6} " + " ".join(f"{key:>29}" for key in keys))
    for label in OPTION_SETS:
        for bits in BUDGETS:
            group = [row for row in rows if row["options"] == label and row["budget"] == bits]
            means = {key: (float(np.mean([row[key] for row in group]))
                           if all(row[key] is not None for row in group) else None) for key in keys}
            summary.append({"options": label, "budget": bits, **means})
            print(f"{label:20} {bits:6.2f} " + " ".join(f"{value:29.3f}" if value is not None else f"{'-':>29}"
                                                       for value in means.values()))
    write_results("robust_diagnosis", {"table": str(Path(args.table).name), "rows": rows,
                                       "mean_over_heldout_domains": summary})


if __name__ == "__main__":
    main()
