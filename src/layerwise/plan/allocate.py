"""Choosing one option per unit under a total-cost budget (numbers in, plan out; no torch).

A model has U units (blocks or sublayers); each can take one of O options (quantizer configs,
later "drop"). `cost[u, o]` is what unit u costs under option o (bits or bytes) and `loss[u, o]`
the measured damage of that choice alone (e.g. KL to the base model when only unit u is
quantized); NaN or +inf marks an option that unit may not take. Under the additive model the
best plan is a multiple-choice knapsack: minimise the summed loss subject to the summed cost
staying within the budget.

Allocators are registered by name and share one signature, `allocator(problem, **options) ->
Allocation`:

- "uniform": the same option everywhere, the baseline every plan is compared with.
- "exact": the optimum of the additive model (a MILP solved by HiGHS, or a DP on integer costs).
- "greedy": the marginal-gain greedy: the best loss reduction per extra unit of cost first.
- "ordering": Layer-Wise Quantization (Dumitru et al. 2024, arXiv:2406.17415): rank units by
  importance, put the least important at the low option, the rest at the high one.
- "evolutionary": EvoPress (Sieberling et al. 2024, arXiv:2410.14649): a (1+lambda) search
  with level-switch mutations and multi-fidelity selection, for fitnesses that are not additive.
- "hybrid": "exact" refined by a short "evolutionary" run under the real fitness.
"""
from __future__ import annotations

import hashlib
import inspect
import json
import math
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Callable, Mapping, Sequence

import numpy as np
from scipy import sparse
from scipy.optimize import Bounds, LinearConstraint, milp

from layerwise.errors import LayerwiseError
from layerwise.plan.objectives import objective_named
from layerwise.util.files import read_artifact, write_text_atomic

Choice = tuple[int, ...]
Fitness = Callable[[Choice], float]


@dataclass(frozen=True, eq=False)
class AllocationProblem:
    """U units, O options, a cost and a loss table of shape [U, O], and a budget on total cost.

    Forbidden entries of `loss` (NaN or +inf) are stored as +inf; the costs of forbidden
    entries are ignored. Arrays are copied and made read-only, so a problem never changes.
    """

    units: tuple[str, ...]
    options: tuple[str, ...]
    cost: np.ndarray
    loss: np.ndarray
    budget: float
    # Optional [D, U, O] losses per calibration domain, and how `total_loss` combines them
    # (`layerwise.plan.objectives`); `loss` is then that objective's additive per-unit loss.
    domain_loss: np.ndarray | None = None
    objective: str = "mean"
    allowed: np.ndarray = field(init=False, repr=False)

    def __post_init__(self) -> None:
        units, options = tuple(self.units), tuple(self.options)
        if not options:
            raise LayerwiseError("AllocationProblem.options is empty, so no assignment exists (no smallest or "
                                 "largest total cost); give at least one option, e.g. ('int4', 'int8')")
        if not units:
            raise LayerwiseError("AllocationProblem.units is empty; give at least one unit name")
        for field_name, names in (("units", units), ("options", options)):
            if len(set(names)) != len(names):
                duplicates = sorted({name for name in names if names.count(name) > 1})
                raise LayerwiseError(f"AllocationProblem.{field_name} repeats {duplicates}; names must be unique")
        shape = (len(units), len(options))
        tables = {}
        for field_name in ("cost", "loss"):
            try:
                tables[field_name] = np.array(getattr(self, field_name), dtype=np.float64)
            except (TypeError, ValueError):
                raise LayerwiseError(f"AllocationProblem.{field_name} is not a numeric table; give an array of shape "
                                     f"(units, options) = {shape}") from None
            if tables[field_name].shape != shape:
                raise LayerwiseError(f"AllocationProblem.{field_name} has shape {tables[field_name].shape}; expected "
                                     f"(units, options) = {shape}")
        cost, loss = tables["cost"], tables["loss"]
        if np.any(loss == -np.inf):
            raise LayerwiseError("AllocationProblem.loss contains -inf; losses must be finite, or NaN/+inf to forbid "
                                 "an option")
        allowed = np.isfinite(loss)
        stuck = np.flatnonzero(~allowed.any(axis=1))
        if stuck.size:
            raise LayerwiseError(f"AllocationProblem.loss forbids every option for unit {units[stuck[0]]!r} "
                                 f"(all NaN/inf); allow at least one of {list(options)}")
        bad_cost = allowed & ~(np.isfinite(cost) & (cost >= 0))
        if bad_cost.any():
            unit_index, option_index = np.argwhere(bad_cost)[0]
            raise LayerwiseError(f"AllocationProblem.cost[{units[unit_index]!r}, {options[option_index]!r}] = "
                                 f"{cost[unit_index, option_index]}; costs of allowed options must be finite and >= 0")
        loss[~allowed] = np.inf
        cost.setflags(write=False)
        loss.setflags(write=False)
        allowed.setflags(write=False)
        for name, value in (("units", units), ("options", options), ("cost", cost), ("loss", loss),
                            ("allowed", allowed)):
            object.__setattr__(self, name, value)
        try:
            budget = float(self.budget)
        except (TypeError, ValueError):
            raise LayerwiseError(f"AllocationProblem.budget={self.budget!r} is not a number; give a total cost "
                                 "in the units of the cost table") from None
        if not math.isfinite(budget):
            raise LayerwiseError(f"AllocationProblem.budget={budget} is not finite; give a total cost in "
                                 f"[{self.min_cost()}, {self.max_cost()}]")
        if budget < self.min_cost():
            raise LayerwiseError(f"AllocationProblem.budget={budget} is below the smallest achievable total cost "
                                 f"{self.min_cost()} (largest {self.max_cost()}); give a budget >= {self.min_cost()}")
        object.__setattr__(self, "budget", budget)
        objective_named(self.objective)
        if self.domain_loss is not None:
            domain_loss = np.array(self.domain_loss, dtype=np.float64)
            if domain_loss.ndim != 3 or domain_loss.shape[1:] != shape:
                raise LayerwiseError(f"AllocationProblem.domain_loss has shape {domain_loss.shape}; expected "
                                     f"(domains, units, options) = (D, {shape[0]}, {shape[1]})")
            domain_loss[:, ~allowed] = np.inf
            domain_loss.setflags(write=False)
            object.__setattr__(self, "domain_loss", domain_loss)

    @property
    def worst_domain(self) -> bool:
        """Whether `total_loss` is the worst domain's total (not a sum over units)."""
        return self.domain_loss is not None and objective_named(self.objective).worst_domain

    def domain_totals(self, choice: Sequence[int]) -> np.ndarray:
        """Summed loss of an assignment on every domain ([D]; one entry without domains)."""
        if self.domain_loss is None:
            return np.array([self.total_loss(choice)])
        return np.array([math.fsum(table[unit, option] for unit, option in enumerate(choice))
                         for table in self.domain_loss])

    def _allowed_cost(self, fill: float) -> np.ndarray:
        return np.where(self.allowed, self.cost, fill)

    def min_cost(self) -> float:
        """Total cost of the cheapest allowed option of every unit: the smallest budget that works."""
        return math.fsum(self._allowed_cost(np.inf).min(axis=1))

    def max_cost(self) -> float:
        """Total cost of the costliest allowed option of every unit: more budget than this is never used."""
        return math.fsum(self._allowed_cost(-np.inf).max(axis=1))

    def total_cost(self, choice: Sequence[int]) -> float:
        """Summed cost of an assignment, correctly rounded (fsum), so every allocator checks the
        budget with the same number whatever order it added costs in."""
        return math.fsum(self.cost[unit, option] for unit, option in enumerate(choice))

    def total_loss(self, choice: Sequence[int]) -> float:
        """The objective of an assignment under the table: the summed loss (the additive model), or
        under the "worst" objective the largest domain total; +inf if an option is forbidden."""
        if self.worst_domain:
            return float(self.domain_totals(choice).max())
        return math.fsum(self.loss[unit, option] for unit, option in enumerate(choice))

    def option_index(self, option: int | str, field_name: str = "option") -> int:
        """The index of an option given by index or label."""
        if isinstance(option, str) and option in self.options:
            return self.options.index(option)
        if isinstance(option, (int, np.integer)) and not isinstance(option, bool) and 0 <= option < len(self.options):
            return int(option)
        raise LayerwiseError(f"{field_name}={option!r} is not an option; give an index in [0, {len(self.options)}) "
                             f"or one of {list(self.options)}")

    def check_choice(self, choice: Sequence[int], field_name: str = "choice") -> Choice:
        """`choice` as a tuple of option indices (labels accepted), allowed on each unit and within budget."""
        if len(choice) != len(self.units):
            raise LayerwiseError(f"{field_name} has {len(choice)} entries; expected one option per unit "
                                 f"({len(self.units)})")
        checked = tuple(self.option_index(option, field_name) for option in choice)
        for unit, option in enumerate(checked):
            if not self.allowed[unit, option]:
                raise LayerwiseError(f"{field_name} puts unit {self.units[unit]!r} at option {self.options[option]!r}, "
                                     "which its loss forbids (NaN/inf)")
        if self.total_cost(checked) > self.budget:
            raise LayerwiseError(f"{field_name} costs {self.total_cost(checked)}, over budget={self.budget}; give an "
                                 "assignment within budget")
        return checked


@dataclass(frozen=True)
class Allocation:
    """One option index per unit, what it costs and loses under the table, and how it was found.

    `evaluations` counts calls of a user fitness (0 for allocators that read only the table);
    `fitness` is the chosen assignment's value under the fitness the allocator optimised, when
    that was not the table itself.
    """

    choice: Choice
    total_cost: float
    total_loss: float
    allocator: str
    evaluations: int = 0
    fitness: float | None = None

    @classmethod
    def of(cls, problem: AllocationProblem, choice: Sequence[int], allocator: str, evaluations: int = 0,
           fitness: float | None = None) -> "Allocation":
        choice = tuple(int(option) for option in choice)
        return cls(choice, problem.total_cost(choice), problem.total_loss(choice), allocator, evaluations, fitness)

    def labels(self, problem: AllocationProblem) -> tuple[str, ...]:
        """The option label of every unit, in unit order."""
        return tuple(problem.options[option] for option in self.choice)


Allocator = Callable[..., Allocation]
ALLOCATORS: dict[str, Allocator] = {}


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


def _best_uniform_choice(problem: AllocationProblem) -> Choice | None:
    fitting = uniform_choices_that_fit(problem)
    if not fitting:
        return None
    return min(fitting, key=lambda choice: (problem.total_loss(choice), problem.total_cost(choice), choice[0]))


@register_allocator("uniform")
def uniform(problem: AllocationProblem) -> Allocation:
    """The same option for every unit: the lowest-loss one that fits (the baseline)."""
    choice = _best_uniform_choice(problem)
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


# ---------------------------------------------------------------------------------------------
# Search under a fitness that need not be additive (EvoPress)


class _CachedFitness:
    """Fitness by stage with a cache, counting real calls; NaN counts as worst (+inf)."""

    def __init__(self, stages: list[Fitness]) -> None:
        self.stages = stages
        self.values: dict[tuple[Choice, int], float] = {}
        self.calls = 0

    def __call__(self, choice: Choice, stage: int) -> float:
        key = (choice, stage)
        if key not in self.values:
            value = float(self.stages[stage](choice))
            self.values[key] = math.inf if math.isnan(value) else value
            self.calls += 1
        return self.values[key]


def _fitness_stages(problem: AllocationProblem, fitness: Fitness | None,
                    fidelities: Sequence[Fitness] | Callable[[Choice, int], float] | None,
                    survivors: Sequence[int] | None, offspring: int) -> tuple[list[Fitness], list[int]]:
    """The fitness of each selection stage, cheapest first, and how many candidates survive each."""
    if fitness is not None and fidelities is not None:
        raise LayerwiseError("evolutionary: give fitness or fidelities, not both (the last fidelity is the fitness)")
    if fidelities is None:
        stages = [fitness if fitness is not None else problem.total_loss]
    elif callable(fidelities):
        count = len(survivors) + 1 if survivors is not None else 2
        stages = [lambda choice, index=index: fidelities(choice, index) for index in range(count)]
    else:
        stages = list(fidelities)
        if not stages or not all(callable(stage) for stage in stages):
            raise LayerwiseError("evolutionary: fidelities must be a non-empty list of callables, or one callable "
                                 "taking (choice, fidelity_index)")
    if survivors is None:
        # EvoPress screens e.g. 64 -> 16 -> 4 -> 1: a quarter survives each cheaper stage.
        survivors = [max(1, offspring // 4 ** (index + 1)) for index in range(len(stages) - 1)]
    survivors = list(survivors)
    if len(survivors) != len(stages) - 1 or any(not 1 <= keep <= offspring for keep in survivors) or \
            survivors != sorted(survivors, reverse=True):
        raise LayerwiseError(f"evolutionary: survivors={survivors}; give {len(stages) - 1} non-increasing counts "
                             f"in [1, offspring={offspring}], one per stage before the last")
    return stages, survivors + [1]


def _levels(problem: AllocationProblem) -> list[list[int]]:
    """Each unit's allowed options from cheapest to costliest: the 'levels' a mutation steps along."""
    return [sorted(np.flatnonzero(problem.allowed[u]).tolist(),
                   key=lambda o, u=u: (problem.cost[u, o], problem.loss[u, o], o))
            for u in range(len(problem.units))]


def _mutate(problem: AllocationProblem, levels: list[list[int]], parent: Choice,
            rng: np.random.Generator) -> Choice:
    """EvoPress's level-switch mutation, adapted to units of different cost.

    EvoPress raises one layer a level and lowers another inside a group of equally sized
    layers, so the total never moves. Here sizes differ, so each switch raises one unit and,
    half the time, lowers another; then random units are lowered until the budget holds and,
    each with probability 1/2, raised where slack is left. Mostly one switch, sometimes two or
    three (EvoPress samples min(randint, randint)). A unit moves at most once per mutation, so a
    repair never just undoes the switch.
    """
    position = [levels[u].index(option) for u, option in enumerate(parent)]
    child = list(parent)
    moved: set[int] = set()
    total = problem.total_cost(child)

    def step(unit: int, direction: int) -> None:
        nonlocal total
        position[unit] += direction
        new_option = levels[unit][position[unit]]
        total += problem.cost[unit, new_option] - problem.cost[unit, child[unit]]
        child[unit] = new_option
        moved.add(unit)

    def pick(direction: int, fresh_only: bool = True) -> int | None:
        candidates = [u for u in range(len(child)) if 0 <= position[u] + direction < len(levels[u])
                      and not (fresh_only and u in moved)]
        return candidates[int(rng.integers(len(candidates)))] if candidates else None

    for _ in range(min(int(rng.integers(1, 4)), int(rng.integers(1, 4)))):
        up = pick(+1)
        if up is not None:
            step(up, +1)
        down = pick(-1) if up is None or rng.random() < 0.5 else None
        if down is not None:
            step(down, -1)
    while total > problem.budget:
        down = pick(-1)
        down = down if down is not None else pick(-1, fresh_only=False)
        if down is None:
            break  # every unit is at its cheapest level, which fits: the excess was rounding
        step(down, -1)
    for unit in rng.permutation(len(child)).tolist():
        if unit not in moved and position[unit] + 1 < len(levels[unit]) and rng.random() < 0.5:
            step(unit, +1)
            if total > problem.budget:
                step(unit, -1)
    # The running total can drift from the canonical sum by an ulp; the canonical one decides.
    while problem.total_cost(child) > problem.budget:
        step(pick(-1, fresh_only=False), -1)
    return tuple(child)


@dataclass(frozen=True)
class _Evolution:
    start: Choice
    start_fitness: float
    best: Choice
    best_fitness: float
    evaluations: int


def _evolve(problem: AllocationProblem, fitness: Fitness | None,
            fidelities: Sequence[Fitness] | Callable[[Choice, int], float] | None, survivors: Sequence[int] | None,
            generations: int, offspring: int, seed: int, start: Sequence[int] | None,
            max_evaluations: int | None, checkpoint: str | Path | None = None) -> _Evolution:
    if generations < 0 or offspring < 1:
        raise LayerwiseError(f"evolutionary: generations={generations}, offspring={offspring}; need generations >= 0 "
                             "and offspring >= 1")
    stages, keep = _fitness_stages(problem, fitness, fidelities, survivors, offspring)
    scorer = _CachedFitness(stages)
    final = len(stages) - 1
    if start is None:
        start = _best_uniform_choice(problem) or greedy(problem).choice
    start = parent = problem.check_choice(start, "start")
    levels = _levels(problem)
    rng = np.random.default_rng(seed)
    progress = _SearchCheckpoint(checkpoint, problem, start, seed, offspring, keep) if checkpoint else None
    generation = 0
    if progress is not None and progress.exists():
        generation, parent, parent_fitness, start_fitness = progress.restore(scorer, rng)
    else:
        parent_fitness = start_fitness = scorer(parent, final)
    while generation < generations:
        if max_evaluations is not None and scorer.calls >= max_evaluations:
            break
        pool = list(dict.fromkeys(child for child in (_mutate(problem, levels, parent, rng) for _ in range(offspring))
                                  if child != parent))
        # Multi-fidelity selection (EvoPress): screen everything with the cheap fitness, re-score
        # only the best few with the expensive one; the last stage keeps one.
        for stage, survive in enumerate(keep):
            values = [scorer(child, stage) for child in pool]
            order = sorted(range(len(pool)), key=lambda k: (values[k], k))
            pool = [pool[k] for k in order[:survive]]
        if pool and scorer(pool[0], final) <= parent_fitness:  # ties move on, to drift across plateaus
            parent, parent_fitness = pool[0], scorer(pool[0], final)
        generation += 1
        if progress is not None:
            progress.save(generation, parent, parent_fitness, start_fitness, scorer, rng)
    return _Evolution(start, start_fitness, parent, parent_fitness, scorer.calls)


class _SearchCheckpoint:
    """The search's whole state after each generation (parent, random generator, every fitness
    value met), so that an interrupted search resumes where it stopped and ends exactly where an
    uninterrupted one with the same seed would."""

    SCHEMA = "layerwise.search-progress"

    def __init__(self, path: str | Path, problem: AllocationProblem, start: Choice, seed: int, offspring: int,
                 keep: list[int]) -> None:
        self.path = Path(path)
        digest = hashlib.sha256(json.dumps([problem.units, problem.options, problem.cost.tolist(),
                                            problem.loss.tolist()]).encode()).hexdigest()
        self.key = {"problem": digest, "budget": problem.budget, "start": list(start), "seed": seed,
                    "offspring": offspring, "survivors": keep}

    def exists(self) -> bool:
        return self.path.exists()

    def restore(self, scorer: _CachedFitness, rng: np.random.Generator) -> tuple[int, Choice, float, float]:
        data = read_artifact(self.path, self.SCHEMA, 1, "search checkpoint")
        if data.get("key") != self.key:
            raise LayerwiseError(f"{self.path} is the checkpoint of another search (other problem, budget, seed or "
                                 "settings); delete it to start afresh")
        scorer.values = {(tuple(choice), stage): value for choice, stage, value in data["fitness"]}
        scorer.calls = data["calls"]
        rng.bit_generator.state = data["rng"]
        return data["generation"], tuple(data["parent"]), data["parent_fitness"], data["start_fitness"]

    def save(self, generation: int, parent: Choice, parent_fitness: float, start_fitness: float,
             scorer: _CachedFitness, rng: np.random.Generator) -> None:
        state = {"schema": self.SCHEMA, "schema_version": 1, "key": self.key, "generation": generation,
                 "parent": list(parent), "parent_fitness": parent_fitness, "start_fitness": start_fitness,
                 "calls": scorer.calls, "rng": rng.bit_generator.state,
                 "fitness": [[list(choice), stage, value] for (choice, stage), value in scorer.values.items()]}
        write_text_atomic(self.path, json.dumps(state) + "\n")


@register_allocator("evolutionary")
def evolutionary(problem: AllocationProblem, fitness: Fitness | None = None,
                 fidelities: Sequence[Fitness] | Callable[[Choice, int], float] | None = None,
                 survivors: Sequence[int] | None = None, generations: int = 100, offspring: int = 16, seed: int = 0,
                 start: Sequence[int] | None = None, max_evaluations: int | None = None,
                 checkpoint: str | Path | None = None) -> Allocation:
    """EvoPress (Sieberling et al. 2024): a (1+lambda) search over assignments within budget.

    `fitness(choice) -> float` is minimised (default: the table's additive loss). For an
    expensive fitness give `fidelities` instead, cheapest first (a list of callables, or one
    callable taking (choice, fidelity_index) with len(survivors) + 1 levels): each generation's
    `offspring` are screened by the cheap ones and only `survivors[i]` go on to stage i + 1.
    Fitness values are cached per assignment, so it must be deterministic for a given choice.
    With `max_evaluations`, no new generation starts once that many calls were made.
    `start` defaults to the best uniform assignment that fits, else the greedy one. The same
    seed gives the same result; `evaluations` counts fitness calls at every fidelity. With
    `checkpoint` (a file path) the state is saved after every generation and an interrupted
    search resumes from it, to the same result.
    """
    run = _evolve(problem, fitness, fidelities, survivors, generations, offspring, seed, start, max_evaluations,
                  checkpoint)
    return Allocation.of(problem, run.best, "evolutionary", run.evaluations, run.best_fitness)


@register_allocator("hybrid")
def hybrid(problem: AllocationProblem, fitness: Fitness | None = None,
           fidelities: Sequence[Fitness] | Callable[[Choice, int], float] | None = None,
           survivors: Sequence[int] | None = None, generations: int = 30, offspring: int = 16, seed: int = 0,
           max_evaluations: int | None = None, checkpoint: str | Path | None = None) -> Allocation:
    """The additive optimum ("exact"), refined by a short evolutionary search under the real
    fitness, which repairs interactions between units that the additive model misses."""
    start = exact(problem).choice
    run = _evolve(problem, fitness, fidelities, survivors, generations, offspring, seed, start, max_evaluations,
                  checkpoint)
    best, value = (run.best, run.best_fitness) if run.best_fitness < run.start_fitness else (start, run.start_fitness)
    return Allocation.of(problem, best, "hybrid", run.evaluations, value)


def never_worse_than_uniform(problem: AllocationProblem, allocation: Allocation,
                             fitness: Fitness | None = None) -> Allocation:
    """`allocation`, or the best uniform assignment within budget if that scores better under
    `fitness` (default: the table's additive loss).

    This is the promise a mixed plan makes: it is never worse than the uniform one at the same
    budget. Costs one fitness call per uniform assignment that fits, plus one.
    """
    fitness = fitness if fitness is not None else problem.total_loss
    scorer = _CachedFitness([fitness])
    value = scorer(allocation.choice, 0)
    uniforms = uniform_choices_that_fit(problem)
    best_uniform = min(uniforms, key=lambda choice: (scorer(choice, 0), choice[0]), default=None)
    evaluations = allocation.evaluations + scorer.calls
    if best_uniform is not None and scorer(best_uniform, 0) < value:
        return Allocation.of(problem, best_uniform, "uniform", evaluations, scorer(best_uniform, 0))
    return replace(allocation, evaluations=evaluations, fitness=value)
