"""Choosing one option per unit under a total-cost budget (`layerwise.plan.problem`): the registry
of allocators, and those that read the table alone.

Allocators are registered by name and share one signature, `allocator(problem, **options) ->
Allocation`:

- "uniform": the same option everywhere, the baseline every plan is compared with.
- "exact": the optimum of the additive model (a MILP solved by HiGHS, or a DP on integer costs).
- "greedy": the marginal-gain greedy: the best loss reduction per extra unit of cost first.
- "ordering": Layer-Wise Quantization (Dumitru et al. 2024, arXiv:2406.17415): rank units by
  importance, put the least important at the low option, the rest at the high one.
- "evolutionary" and "hybrid" (`layerwise.plan.search`) measure whole plans under a fitness.
"""
from __future__ import annotations

import inspect
import math
from typing import Callable, Mapping, Sequence

import numpy as np
from scipy import sparse
from scipy.optimize import Bounds, LinearConstraint, milp

from layerwise.errors import LayerwiseError
from layerwise.plan.problem import Allocation, AllocationProblem, Choice

Allocator = Callable[..., Allocation]
ALLOCATORS: dict[str, Allocator] = {}
# Allocators that measure whole plans (a fitness on the model), not the table alone.
SEARCHING = ("evolutionary", "hybrid")


def register_allocator(name: str) -> Callable[[Allocator], Allocator]:
    """Register `allocator(problem, **options) -> Allocation` under `name`; the first line of its
    docstring is its one-line description wherever allocators are listed."""
    def decorate(allocator: Allocator) -> Allocator:
        ALLOCATORS[name] = allocator
        return allocator
    return decorate


def allocate(problem: AllocationProblem, allocator: str = "exact", **options) -> Allocation:
    """Run a registered allocator; the result is checked to be allowed and within budget."""
    if allocator not in ALLOCATORS:
        raise LayerwiseError(f"unknown allocator {allocator!r}; registered: {', '.join(sorted(ALLOCATORS))}")
    function = ALLOCATORS[allocator]
    accepted = [name for name in inspect.signature(function).parameters if name != "problem"]
    for name in options:
        if name not in accepted:
            raise LayerwiseError(f"allocator {allocator!r} has no option {name!r}; accepted: "
                                 f"{', '.join(accepted) or '(none)'}")
    allocation = function(problem, **options)
    # A plan over budget is a bug in the allocator, not a user error: fail loudly even under -O.
    within_budget = problem.total_cost(allocation.choice) <= problem.budget
    if not within_budget or not all(problem.allowed[u, o] for u, o in enumerate(allocation.choice)):
        raise AssertionError(f"allocator {allocator!r} returned {allocation.choice} costing {allocation.total_cost} "
                             f"(budget {problem.budget}) or using a forbidden option")
    return allocation


# ---------------------------------------------------------------------------------------------
# Table-only allocators


def uniform_choices_that_fit(problem: AllocationProblem) -> list[Choice]:
    """Every assignment of one option to all units that the budget allows."""
    units = len(problem.units)
    return [(option,) * units for option in range(len(problem.options))
            if problem.allowed[:, option].all() and problem.total_cost((option,) * units) <= problem.budget]


def best_uniform_choice(problem: AllocationProblem) -> Choice | None:
    fitting = uniform_choices_that_fit(problem)
    if not fitting:
        return None
    return min(fitting, key=lambda choice: (problem.total_loss(choice), problem.total_cost(choice), choice[0]))


@register_allocator("uniform")
def uniform(problem: AllocationProblem) -> Allocation:
    """The same option for every unit: the lowest-loss one that fits (the baseline)."""
    choice = best_uniform_choice(problem)
    if choice is None:
        everywhere = [o for o in range(len(problem.options)) if problem.allowed[:, o].all()]
        if not everywhere:
            raise LayerwiseError("uniform: no option is allowed on every unit; use allocator='exact' or 'greedy'")
        cost, cheapest = min((problem.total_cost((o,) * len(problem.units)), o) for o in everywhere)
        raise LayerwiseError(f"uniform: no single option fits budget={problem.budget}; the cheapest, "
                             f"{problem.options[cheapest]!r}, costs {cost}")
    return Allocation.of(problem, choice, "uniform")


def _cheapest_choice(problem: AllocationProblem) -> Choice:
    """Each unit's cheapest allowed option, the lowest-loss one among equally cheap ones."""
    cost = problem._allowed_cost(np.inf)
    return tuple(int(np.lexsort((problem.loss[u], cost[u]))[0]) for u in range(len(problem.units)))


@register_allocator("exact")
def exact(problem: AllocationProblem, solver: str = "milp") -> Allocation:
    """The optimum of the additive model: a MILP (HiGHS), or a DP when costs are integers. Under
    the "worst" objective, the assignment whose worst domain total is least (a MILP)."""
    if problem.worst_domain:
        if solver != "milp":
            raise LayerwiseError(f"exact: solver={solver!r} cannot minimise the worst domain; use solver='milp'")
        choice = _exact_by_milp(problem)
    elif problem.budget >= problem.max_cost():
        # The budget binds nothing: every unit takes its lowest-loss option.
        choice = tuple(int(np.argmin(problem.loss[u])) for u in range(len(problem.units)))
    elif solver == "milp":
        choice = _exact_by_milp(problem)
    elif solver == "dp":
        choice = _exact_by_dp(problem)
    else:
        raise LayerwiseError(f"exact: solver={solver!r} is not known; accepted: 'milp', 'dp'")
    return Allocation.of(problem, choice, "exact")


def _solve_milp(problem: AllocationProblem, solver_budget: float) -> Choice | None:
    """Binary x[u, o], one option per unit, summed cost <= solver_budget, minimal summed loss; under
    the "worst" objective, minimal t with every domain's summed loss <= t (one extra variable)."""
    units, options = problem.cost.shape
    # Scale both tables to O(1): HiGHS's tolerances are absolute, and KLs of 1e-4 or costs of
    # 1e9 bits would otherwise sit below or far above them.
    cost_scale = problem.max_cost()
    cost_row = (problem._allowed_cost(0.0) / cost_scale).ravel()
    one_hot = sparse.kron(sparse.eye(units), np.ones((1, options)), format="csr")
    upper = problem.allowed.ravel().astype(np.float64)  # forbidden options fixed to 0
    if not problem.worst_domain:
        shifted_loss = np.where(problem.allowed, problem.loss - problem.loss.min(axis=1, keepdims=True), 0.0)
        loss_scale = shifted_loss.max() or 1.0
        objective = (shifted_loss / loss_scale).ravel()
        constraints = [LinearConstraint(one_hot, 1.0, 1.0),
                       LinearConstraint(cost_row[None, :], -np.inf, solver_budget / cost_scale)]
        integrality, bounds = np.ones_like(objective), Bounds(0.0, upper)
    else:
        # Each domain's loss is shifted by its per-unit minimum (a constant it keeps on the right).
        domain_loss = np.where(problem.allowed, problem.domain_loss, np.nan)
        floor = np.nanmin(domain_loss, axis=2)  # [D, U]
        shifted = np.nan_to_num(domain_loss - floor[:, :, None], nan=0.0)
        loss_scale = shifted.max() or 1.0
        domains = shifted.shape[0]
        rows = np.hstack([shifted.reshape(domains, -1) / loss_scale, -np.ones((domains, 1))])
        objective = np.zeros(units * options + 1)
        objective[-1] = 1.0
        pad = sparse.csr_matrix((1, 1))
        constraints = [LinearConstraint(sparse.hstack([one_hot, sparse.csr_matrix((units, 1))]), 1.0, 1.0),
                       LinearConstraint(sparse.hstack([sparse.csr_matrix(cost_row[None, :]), pad]), -np.inf,
                                        solver_budget / cost_scale),
                       LinearConstraint(rows, -np.inf, -floor.sum(axis=1) / loss_scale)]
        integrality = np.r_[np.ones(units * options), 0.0]
        bounds = Bounds(np.zeros(units * options + 1), np.r_[upper, np.inf])
    result = milp(objective, constraints=constraints, integrality=integrality, bounds=bounds,
                  options={"mip_rel_gap": 0.0})
    if result.x is None:
        return None
    return tuple(int(o) for o in np.argmax(result.x[:units * options].reshape(units, options), axis=1))


def _exact_by_milp(problem: AllocationProblem) -> Choice:
    solver_budget = problem.budget
    # HiGHS accepts a constraint violated by its feasibility tolerance; if the rounded assignment
    # lands a hair over budget, tighten by the excess and solve again.
    for _ in range(4):
        choice = _solve_milp(problem, solver_budget)
        if choice is None:
            break
        excess = problem.total_cost(choice) - problem.budget
        if excess <= 0:
            return choice
        solver_budget -= excess + 1e-9 * problem.max_cost()
    if problem.total_cost(_cheapest_choice(problem)) >= problem.budget:
        return _cheapest_choice(problem)  # only the cheapest options fit; among them this is optimal
    raise LayerwiseError(f"exact: HiGHS found no assignment within budget={problem.budget}; try solver='dp' "
                         "(integer costs) or allocator='greedy'")


_DP_MAX_CELLS = 50_000_000


def _exact_by_dp(problem: AllocationProblem) -> Choice:
    """Knapsack DP over the spare budget (budget minus the cheapest assignment), in integer cost steps."""
    cost = problem._allowed_cost(0.0)
    if not np.array_equal(cost, np.round(cost)):
        raise LayerwiseError("exact: solver='dp' needs integer costs; use solver='milp'")
    units, options = cost.shape
    cheapest = problem._allowed_cost(np.inf).min(axis=1)
    extra = np.where(problem.allowed, cost - cheapest[:, None], 0).astype(np.int64)
    capacity = int(math.floor(problem.budget) - round(problem.min_cost()))
    if (capacity + 1) * units * options > _DP_MAX_CELLS:
        raise LayerwiseError(f"exact: solver='dp' would need {(capacity + 1) * units * options} cells (spare budget "
                             f"{capacity}); use solver='milp'")
    best = np.zeros(capacity + 1)  # best[c]: least loss of the units so far using at most c spare cost
    picks = np.zeros((units, capacity + 1), dtype=np.int32)
    for u in range(units):
        candidates = np.full((options, capacity + 1), np.inf)
        for o in np.flatnonzero(problem.allowed[u]):
            w = extra[u, o]
            if w <= capacity:
                candidates[o, w:] = best[:capacity + 1 - w] + problem.loss[u, o]
        picks[u] = np.argmin(candidates, axis=0)
        best = candidates[picks[u], np.arange(capacity + 1)]
    choice, spare = [], capacity
    for u in reversed(range(units)):
        option = int(picks[u, spare])
        choice.append(option)
        spare -= int(extra[u, option])
    return tuple(reversed(choice))


@register_allocator("greedy")
def greedy(problem: AllocationProblem) -> Allocation:
    """From the cheapest option per unit, repeatedly take the upgrade with the largest loss
    reduction per extra cost that still fits (the classic multiple-choice knapsack greedy)."""
    units = np.arange(len(problem.units))
    choice = np.array(_cheapest_choice(problem))
    while True:
        total = problem.total_cost(choice)
        gain = problem.loss[units, choice][:, None] - problem.loss  # -inf where forbidden
        extra = problem._allowed_cost(np.inf) - problem.cost[units, choice][:, None]
        candidate = (gain > 0) & (total + extra <= problem.budget)
        if not candidate.any():
            break
        with np.errstate(divide="ignore", invalid="ignore"):
            ratio = np.where(extra > 0, gain / extra, np.inf)  # a cheaper and better option is free
        flat = np.flatnonzero(candidate)
        # Best ratio first, then largest gain, then lowest (unit, option) for determinism.
        for index in flat[np.lexsort((flat, -gain.ravel()[flat], -ratio.ravel()[flat]))]:
            unit, option = divmod(int(index), len(problem.options))
            trial = choice.copy()
            trial[unit] = option
            # The incremental total can differ from the canonical one by an ulp at the boundary.
            if problem.total_cost(trial) <= problem.budget:
                choice = trial
                break
        else:
            break
    return Allocation.of(problem, choice, "greedy")


@register_allocator("ordering")
def ordering(problem: AllocationProblem, scores: Sequence[float] | Mapping[str, float] | str | None = None,
             high: int | str | None = None, low: int | str | None = None, seed: int = 0) -> Allocation:
    """Layer-Wise Quantization (Dumitru et al. 2024): the least important units at the low option,
    the rest at the high one, with the fewest low units that fit the budget.

    `scores` is an importance per unit, higher = more important (LIM, ZD, ...; a sequence in unit
    order or a mapping by unit name), or "random" (shuffled with `seed`), "first" (the first units
    go low first) or "last" (the last units go low first). Mixing two bit widths this way gives
    any average between them, e.g. 3.25 bits from int3 and int4.
    """
    high_index, low_index = _two_options(problem, high, low)
    importance = _importance(problem, scores, seed)
    # Stable order: ties in importance keep unit order.
    least_important_first = np.argsort(importance, kind="stable")
    choice = [high_index] * len(problem.units)
    if problem.total_cost(choice) <= problem.budget:
        return Allocation.of(problem, choice, "ordering")
    for unit in least_important_first:
        choice[unit] = low_index
        if problem.total_cost(choice) <= problem.budget:
            return Allocation.of(problem, choice, "ordering")
    raise LayerwiseError(f"ordering: even every unit at low={problem.options[low_index]!r} costs "
                         f"{problem.total_cost(choice)}, over budget={problem.budget}; raise the budget or pick a "
                         "cheaper low option")


def _two_options(problem: AllocationProblem, high: int | str | None, low: int | str | None) -> tuple[int, int]:
    if high is None or low is None:
        if len(problem.options) != 2:
            raise LayerwiseError(f"ordering: high={high!r}, low={low!r}; with {len(problem.options)} options give "
                                 f"both, from {list(problem.options)}")
        costlier = int(problem.total_cost((1,) * len(problem.units)) > problem.total_cost((0,) * len(problem.units)))
        high = costlier if high is None else high
        low = 1 - costlier if low is None else low
    high_index = problem.option_index(high, "high")
    low_index = problem.option_index(low, "low")
    if high_index == low_index:
        raise LayerwiseError(f"ordering: high and low are both {problem.options[high_index]!r}; give two different "
                             "options")
    for field_name, index in (("high", high_index), ("low", low_index)):
        if not problem.allowed[:, index].all():
            raise LayerwiseError(f"ordering: {field_name}={problem.options[index]!r} is forbidden on some units; the "
                                 "two options must be allowed everywhere")
    return high_index, low_index


def _importance(problem: AllocationProblem, scores: Sequence[float] | Mapping[str, float] | str | None,
                seed: int) -> np.ndarray:
    units = len(problem.units)
    if scores is None:
        raise LayerwiseError("ordering: scores is missing; give an importance per unit (higher = more important, "
                             "e.g. LIM or ZD), or 'random', 'first' or 'last'")
    if isinstance(scores, str):
        orders = {"first": np.arange(units, dtype=np.float64),
                  "last": -np.arange(units, dtype=np.float64),
                  "random": np.random.default_rng(seed).permutation(units).astype(np.float64)}
        if scores not in orders:
            raise LayerwiseError(f"ordering: scores={scores!r} is not known; give one number per unit, or 'random', "
                                 "'first' or 'last'")
        return orders[scores]
    if isinstance(scores, Mapping):
        missing = [name for name in problem.units if name not in scores]
        if missing:
            raise LayerwiseError(f"ordering: scores has no entry for units {missing[:5]}; give one per unit")
        scores = [scores[name] for name in problem.units]
    importance = np.asarray(scores, dtype=np.float64)
    if importance.shape != (units,) or not np.isfinite(importance).all():
        raise LayerwiseError(f"ordering: scores has shape {importance.shape} or non-finite entries; give {units} "
                             "finite numbers, one per unit")
    return importance
