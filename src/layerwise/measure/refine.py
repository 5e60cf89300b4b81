"""Measuring, at plan time, the entries of an estimated sensitivity table that the plan hinges on.

A cheap estimate (fisher) ranks a table's entries well (Spearman 0.998 with the measured table on
SmolLM2) and still errs by some percent per entry; a plan turns on the few units whose choice is
close. At the table's optimum each unit's next costlier option saves less KL per bit, and its next
cheaper one loses more, than the price of a bit (the Lagrange multiplier of the budget); a unit
where either is near that price is a hinge, and a few percent of error there flips its choice.
`refine_table` measures both entries of the closest hinge (the option taken and its neighbour),
allocates again with them, and repeats while its share of passes lasts: measured KL goes where it
changes the plan, and every measured entry is recorded in the table (`meta["measured_entries"]`),
never estimated again.
"""
from __future__ import annotations

import math
import time
from dataclasses import replace
from pathlib import Path

import numpy as np

from layerwise.data.windows import TokenWindows
from layerwise.models.loading import LoadedModel
from layerwise.plan.allocate import allocate
from layerwise.plan.problem import AllocationProblem, Choice
from layerwise.plan.table import SensitivityTable
from layerwise.plan.units import EDGE_KINDS
from layerwise.util.progress import progress_bars

# What `--sensitivity auto` may spend in all, the estimate's own passes included, as a share of
# the measured table's passes (issue 18's bound for a cheap plan).
REFINE_SHARE = 0.1


def hinges(problem: AllocationProblem, choice: Choice) -> list[tuple[float, int, int, int]]:
    """(closeness, unit, option taken, neighbouring option) for every unit's next costlier and
    next cheaper option, closest first: |log(slope / price of a bit)|, where slope is the loss
    saved per unit of cost by moving up (or lost by moving down) and the price is the geometric
    mean of the steepest slope up and the flattest slope down at `choice` (positive ones)."""
    moves = []
    for u, taken in enumerate(choice):
        allowed = np.flatnonzero(problem.allowed[u])
        costs, losses = problem.cost[u], problem.loss[u]
        up = [o for o in allowed if costs[o] > costs[taken]]
        down = [o for o in allowed if costs[o] < costs[taken]]
        if up:
            o = min(up, key=lambda option: costs[option])
            moves.append(("up", u, taken, o, (losses[taken] - losses[o]) / (costs[o] - costs[taken])))
        if down:
            o = max(down, key=lambda option: costs[option])
            moves.append(("down", u, taken, o, (losses[o] - losses[taken]) / (costs[taken] - costs[o])))
    if not moves:
        return []
    steepest_up = max((slope for way, *_, slope in moves if way == "up" and slope > 0), default=None)
    flattest_down = min((slope for way, *_, slope in moves if way == "down" and slope > 0), default=None)
    ends = [slope for slope in (steepest_up, flattest_down) if slope is not None]
    if not ends:
        return []
    price = math.exp(np.mean(np.log(ends)))
    # A slope of the wrong sign (the costlier option no better) is far from any price: last.
    return sorted((abs(math.log(slope / price)) if slope > 0 else math.inf, u, taken, o)
                  for _, u, taken, o, slope in moves)


def measured_entries(table: SensitivityTable) -> set[tuple[int, int]]:
    """The (unit, option) entries of `table` holding measured KL: all of a measured table; of an
    estimated one, those refined and the embedding's and head's (always measured)."""
    if table.estimator == "measured":
        return {(u, o) for u in range(len(table.units)) for o in range(len(table.options))}
    recorded = set(table.meta.get("measured_entries", []))
    return {(u, o) for u, unit in enumerate(table.units) for o, option in enumerate(table.options)
            if unit.kind in EDGE_KINDS or f"{unit.name} {option}" in recorded}


def refine_table(loaded: LoadedModel, table: SensitivityTable, calibration: TokenWindows, budget_bits: float,
                 objective: str, *, share: float = REFINE_SHARE, importance: dict | None = None,
                 statistics: TokenWindows | None = None, progress: bool = True) -> tuple[SensitivityTable, dict]:
    """`table` (estimated on the windows `calibration`) with the entries the plan at `budget_bits`
    hinges on measured, closest hinge first, re-allocating after each, until this plan's passes
    reach `share` of what the measured table would cost (the estimate's own passes counted);
    and what was done (entries, passes, seconds). A measured table comes back as it is."""
    from layerwise.measure.sensitivity import entry_measurer, entry_passes, measured_passes  # torch-heavy

    done = measured_entries(table)
    own = table.cost.get("forward_equivalents", 0.0) - table.cost.get("refined_forward_equivalents", 0.0)
    allowance = share * measured_passes(loaded, table) - own - 1.0  # the refinement's own base pass
    record = {"share": share, "allowance_passes": max(allowance, 0.0), "entries": [], "passes": 0.0, "seconds": 0.0}
    if table.estimator == "measured" or allowance <= 0:
        return table, record
    started = time.perf_counter()
    kl = table.kl.copy()
    domain_kl = {name: values.copy() for name, values in table.domain_kl.items()}
    measure = None
    left = allowance
    with progress_bars(progress) as bars:
        task = bars.add_task("sensitivity: measuring the entries the plan hinges on", total=None)
        while True:
            current = replace(table, kl=kl, domain_kl=domain_kl)
            problem = current.problem(budget_bits, objective)
            chosen = allocate(problem, "exact")
            wanted = None
            for _, u, taken, other in hinges(problem, chosen.choice):
                missing = [(u, o) for o in (taken, other) if (u, o) not in done]
                if missing and entry_passes(loaded, table.units[u]) * len(missing) <= left:
                    wanted = missing
                    break
            if wanted is None:
                break
            if measure is None:
                measure = entry_measurer(loaded, table, calibration, importance=importance, statistics=statistics)
            for u, o in wanted:
                values, spent = measure(u, o)
                left -= spent
                record["passes"] += spent
                for name, value in zip(table.domains, values):
                    domain_kl[name][u, o] = value
                kl[u, o] = float(np.mean(values))
                done.add((u, o))
                record["entries"].append(f"{table.units[u].name} {table.options[o]}")
                bars.advance(task)
    record["seconds"] = time.perf_counter() - started
    if not record["entries"]:
        return table, record
    cost = dict(table.cost)
    cost["forward_equivalents"] = cost.get("forward_equivalents", 0.0) + record["passes"]
    cost["refined_forward_equivalents"] = cost.get("refined_forward_equivalents", 0.0) + record["passes"]
    cost["seconds"] = cost.get("seconds", 0.0) + record["seconds"]
    meta = table.meta | {"measured_entries": list(table.meta.get("measured_entries", [])) + record["entries"]}
    return replace(table, kl=kl, domain_kl=domain_kl, cost=cost, meta=meta), record


def save_refined(path: str | Path, refined: SensitivityTable) -> None:
    """Write `refined`'s measured entries and cost into the table file at `path` (which may hold
    more options than the plan used), so later plans on it reuse them."""
    stored = SensitivityTable.load(path)
    columns = {option: stored.options.index(option) for option in refined.options if option in stored.options}
    rows = {unit.name: u for u, unit in enumerate(stored.units)}
    new = set(refined.meta.get("measured_entries", [])) - set(stored.meta.get("measured_entries", []))
    kl = stored.kl.copy()
    domain_kl = {name: values.copy() for name, values in stored.domain_kl.items()}
    for u, unit in enumerate(refined.units):
        for o, option in enumerate(refined.options):
            if f"{unit.name} {option}" in new and option in columns:
                kl[rows[unit.name], columns[option]] = refined.kl[u, o]
                for name in domain_kl:
                    domain_kl[name][rows[unit.name], columns[option]] = refined.domain_kl[name][u, o]
    recorded = list(stored.meta.get("measured_entries", [])) + [entry for entry in refined.meta["measured_entries"]
                                                                if entry in new]
    replace(stored, kl=kl, domain_kl=domain_kl, cost=refined.cost,
            meta=stored.meta | {"measured_entries": recorded}).save(path)
