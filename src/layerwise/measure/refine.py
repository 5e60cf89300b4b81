"""Measuring, at plan time, the entries of an estimated sensitivity table that the plan hinges on.

A cheap estimate (fisher) ranks a table's entries well (Spearman 0.998 with the measured table on
SmolLM2) and still errs by some percent per entry; a plan turns on the few units whose choice is
close. At the table's optimum a unit's best move to a costlier option saves less KL per bit, and
its best move to a cheaper one loses more, than the price of a bit (the Lagrange multiplier of
the budget); a unit where either is near that price is a hinge, and a few percent of error there
flips its choice.
`refine_table` measures both entries of the closest hinge (the option taken and the one it would
move to), allocates again with them, and repeats while its share of passes lasts: measured KL goes
where it changes the plan, and every measured entry is recorded in the table
(`meta["measured_entries"]`), never estimated again.
"""
from __future__ import annotations

import math
import time
from dataclasses import replace
from pathlib import Path
from typing import Callable

import numpy as np

from layerwise.data.windows import TokenWindows
from layerwise.errors import LayerwiseError
from layerwise.models.loading import LoadedModel
from layerwise.plan.allocate import allocate
from layerwise.plan.problem import AllocationProblem, Choice
from layerwise.plan.table import SensitivityTable
from layerwise.plan.units import EDGE_KINDS
from layerwise.util.progress import progress_bars

# What a plan with `--sensitivity auto` may spend, the estimate's own passes included, as a share
# of the measured table's passes (issue 18's bound for a cheap plan).
REFINE_SHARE = 0.1


def check_share(share: float) -> None:
    """Refuse a refinement share outside [0, 1] (before any work that would be lost)."""
    if not 0.0 <= share <= 1.0:
        raise LayerwiseError(f"refine={share}: give the share of the measured table's passes to spend, in [0, 1]")


def hinges(problem: AllocationProblem, choice: Choice) -> list[tuple[float, int, int, int]]:
    """(closeness, unit, option taken, other option) for every unit's moves, closest first.

    A unit's move up is to the costlier option that saves the most loss per unit of cost, its move
    down to the cheaper one that loses the least: the first each way a change of the price of a bit
    (the budget's Lagrange multiplier) would make it take. Their closeness is |log(slope / price)|,
    the price taken as the geometric mean of the steepest move up and the flattest move down at
    `choice` (positive ones); a move that saves nothing is never close. An option that costs what
    the taken one costs is a move too, its closeness |log(loss ratio)|. Under the "worst" objective
    the loss is the domains' mean, not the minimax the plan solves."""
    ties = []
    ups, downs = {}, {}  # unit -> (option, slope) of its best move each way
    for u, taken in enumerate(choice):
        costs, losses = problem.cost[u], problem.loss[u]
        for o in np.flatnonzero(problem.allowed[u]):
            if o == taken:
                continue
            extra = costs[o] - costs[taken]
            slope = (losses[taken] - losses[o]) / extra if extra else None
            if extra == 0:
                ties.append((_log_ratio(losses[o], losses[taken]), u, taken, int(o)))
            elif extra > 0 and (u not in ups or slope > ups[u][1]):  # the most loss saved per cost added
                ups[u] = (int(o), slope)
            elif extra < 0 and (u not in downs or slope < downs[u][1]):  # the least lost per cost saved
                downs[u] = (int(o), slope)
    steepest_up = max((slope for _, slope in ups.values() if slope > 0), default=None)
    flattest_down = min((slope for _, slope in downs.values() if slope > 0), default=None)
    ends = [slope for slope in (steepest_up, flattest_down) if slope is not None]
    closeness = list(ties)
    if ends:
        price = math.exp(np.mean(np.log(ends)))
        for u, (o, slope) in list(ups.items()) + list(downs.items()):
            closeness.append((abs(math.log(slope / price)) if slope > 0 else math.inf, u, choice[u], o))
    return sorted(closeness)


def _log_ratio(a: float, b: float) -> float:
    if a == b:
        return 0.0
    return abs(math.log(a / b)) if a > 0 and b > 0 else math.inf


def measured_entries(table: SensitivityTable) -> set[tuple[int, int]]:
    """The (unit, option) entries of `table` holding measured KL: all of a measured table; of an
    estimated one, those refined and the embedding's and head's (always measured)."""
    if table.estimator == "measured":
        return {(u, o) for u in range(len(table.units)) for o in range(len(table.options))}
    recorded = set(table.meta.get("measured_entries", []))
    return {(u, o) for u, unit in enumerate(table.units) for o, option in enumerate(table.options)
            if unit.kind in EDGE_KINDS or f"{unit.name} {option}" in recorded}


def refine_table(loaded: LoadedModel, table: SensitivityTable, calibration: TokenWindows,
                 problem_for: Callable[[SensitivityTable], AllocationProblem], *, share: float = REFINE_SHARE,
                 importance: dict | None = None, statistics: TokenWindows | None = None,
                 progress: bool = True) -> tuple[SensitivityTable, dict]:
    """`table` (estimated on the windows `calibration`) with the entries the plan hinges on measured,
    closest hinge first, allocating again after each; `problem_for(table)` is the problem the plan
    solves (budget, objective, domains). One plan may spend until the estimate's own passes and its
    own measurements reach `share` of what the measured table of these units and options would cost;
    entries measured before (recorded in the table) are not measured again. Returns the table and
    what was done (entries, passes, seconds); a measured table comes back as it is."""
    from layerwise.measure.sensitivity import entry_measurer, entry_passes, measured_passes  # torch-heavy

    done = measured_entries(table)
    own = table.cost.get("forward_equivalents", 0.0) - table.cost.get("refined_forward_equivalents", 0.0)
    left = share * measured_passes(loaded, table) - own
    record = {"share": share, "allowance_passes": max(left, 0.0), "entries": [], "passes": 0.0, "seconds": 0.0}
    if table.estimator == "measured" or left <= 0:
        return table, record
    started = time.perf_counter()
    kl = table.kl.copy()
    domain_kl = {name: values.copy() for name, values in table.domain_kl.items()}
    measure = None
    with progress_bars(progress) as bars:
        task = bars.add_task("sensitivity: measuring the entries the plan hinges on", total=None)
        while True:
            problem = problem_for(replace(table, kl=kl, domain_kl=domain_kl))
            chosen = allocate(problem, "exact")
            base_pass = 1.0 if measure is None else 0.0  # the first measurement needs one
            wanted = None
            for _, u, taken, other in hinges(problem, chosen.choice):
                missing = [(u, o) for o in (taken, other) if (u, o) not in done]
                if missing and base_pass + entry_passes(loaded, table.units[u]) * len(missing) <= left:
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
