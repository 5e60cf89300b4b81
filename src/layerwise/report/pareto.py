"""The pareto command: size against predicted KL for a range of budgets, from a saved sensitivity
table alone (its additive model; no model is loaded), with the curve and the table's heat map."""
from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Sequence

import numpy as np

from layerwise.errors import LayerwiseError
from layerwise.plan.allocate import SEARCHING, allocate
from layerwise.plan.table import SensitivityTable
from layerwise.report.plots import pareto_plot, sensitivity_heatmap
from layerwise.util.files import check_output, write_text_atomic
from layerwise.util.meta import run_metadata


def budgets_between(table: SensitivityTable, low: float | None = None, high: float | None = None,
                    step: float = 0.25) -> list[float]:
    """Average-bits budgets from `low` to `high` (default: the table's cheapest and costliest plans)."""
    cost = np.where(np.isfinite(table.kl), table.cost_bits, np.nan)
    smallest = np.nanmin(cost, axis=1).sum() / table.total_weights
    largest = np.nanmax(cost, axis=1).sum() / table.total_weights
    # Rounded inwards, so that the printed budgets are all achievable.
    low = math.ceil(smallest * 1e6) / 1e6 if low is None else low
    high = math.floor(largest * 1e6) / 1e6 if high is None else high
    count = int(math.floor((high - low) / step + 1e-9)) + 1
    return [round(low + i * step, 6) for i in range(count)]


def run_pareto(
    table: str | Path | SensitivityTable,
    *,
    budgets: Sequence[float] | None = None,
    allocator: str = "exact",
    out: str | Path | None = None,
    overwrite: bool = False,
) -> list[dict]:
    """Size against predicted KL (the table's additive model) for each budget, from one table."""
    if allocator in SEARCHING or allocator == "ordering":
        raise LayerwiseError(f"pareto uses the table alone; choose one of exact, greedy, uniform, not {allocator!r}")
    sensitivity = table if isinstance(table, SensitivityTable) else SensitivityTable.load(table)
    if out is not None:
        check_output(out, overwrite, directory=True)
    rows = []
    for bits in budgets or budgets_between(sensitivity):
        problem = sensitivity.problem(sensitivity.budget_bits(bits))
        allocation = allocate(problem, allocator)
        labels = allocation.labels(problem)
        rows.append({"budget_bits_per_weight": bits,
                     "bits_per_weight": allocation.total_cost / sensitivity.total_weights,
                     "total_bytes": math.ceil((allocation.total_cost + sensitivity.other_bits) / 8),
                     "predicted_kl": allocation.total_loss,
                     "options_used": {name: labels.count(name) for name in sensitivity.options if name in labels}})
    if out is not None:
        document = {"schema": "layerwise.pareto", "schema_version": 1,
                    "meta": run_metadata() | {"table": str(table) if not isinstance(table, SensitivityTable) else None},
                    "allocator": allocator, "rows": rows}
        write_text_atomic(Path(out) / "pareto.json", json.dumps(document, indent=1) + "\n")
        pareto_plot(rows, sensitivity, Path(out) / "pareto.png")
        sensitivity_heatmap(sensitivity, Path(out) / "sensitivity.png")
    return rows
