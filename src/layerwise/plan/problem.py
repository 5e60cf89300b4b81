"""The allocation problem: U units, O options, a cost and a loss table of shape [U, O], a budget on
total cost, and the allocation an allocator returns (numbers only; no torch).

`cost[u, o]` is what unit u costs under option o (bits or bytes) and `loss[u, o]` the measured
damage of that choice alone (e.g. KL to the base model when only unit u is quantized); NaN or
+inf marks an option that unit may not take. Under the additive model the best plan is a
multiple-choice knapsack: minimise the summed loss subject to the summed cost staying within
the budget.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Callable, Sequence

import numpy as np

from layerwise.errors import LayerwiseError
from layerwise.plan.objectives import objective_named

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
