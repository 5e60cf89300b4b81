"""Allocators against brute force on small tables, and the promises each allocator makes (ordering's
order, EvoPress's determinism and screening, hybrid's repair of interactions, never worse than
uniform). The checks recompute costs, losses and fitnesses from the raw numbers the test drew
(`Table`), never from the AllocationProblem or Allocation under test, so an allocator and its
check cannot share a mistake."""
from __future__ import annotations

import itertools
import json
import math
from dataclasses import dataclass

import numpy as np
import pytest

from layerwise import LayerwiseError
from layerwise.plan.allocate import ALLOCATORS, allocate, register_allocator
from layerwise.plan.problem import Allocation, AllocationProblem
from layerwise.plan.search import never_worse_than_uniform

BITS = np.array([2.0, 3.0, 4.0, 8.0])


def names(prefix: str, count: int) -> tuple[str, ...]:
    return tuple(f"{prefix}{index}" for index in range(count))


@dataclass(frozen=True)
class Table:
    """The raw numbers of a problem as the test drew them (NaN loss = forbidden), with plain
    Python arithmetic over them: the independent side of every check."""

    cost: np.ndarray
    loss: np.ndarray
    budget: float

    @property
    def problem(self) -> AllocationProblem:
        units, options = self.cost.shape
        return AllocationProblem(names("unit", units), names("option", options), self.cost, self.loss, self.budget)

    def cost_of(self, choice) -> float:
        return math.fsum(float(self.cost[unit][option]) for unit, option in enumerate(choice))

    def loss_of(self, choice) -> float:
        return math.fsum(float(self.loss[unit][option]) for unit, option in enumerate(choice))

    def fits(self, choice) -> bool:
        """Every option allowed on its unit and the summed cost within budget."""
        return (len(choice) == len(self.cost) and all(math.isfinite(self.loss[u][o]) for u, o in enumerate(choice))
                and self.cost_of(choice) <= self.budget)

    def feasible(self) -> list[tuple[int, ...]]:
        units, options = self.cost.shape
        return [choice for choice in itertools.product(range(options), repeat=units) if self.fits(choice)]

    def brute_force_loss(self) -> float:
        """The least additive loss over every assignment within budget, by enumeration."""
        return min(self.loss_of(choice) for choice in self.feasible())

    def uniform_choices(self) -> list[tuple[int, ...]]:
        units, options = self.cost.shape
        return [(option,) * units for option in range(options) if self.fits((option,) * units)]


def random_table(rng: np.random.Generator, integer_costs: bool = True, forbid: float = 0.15) -> Table:
    """At most 6 units and 4 options, some options forbidden, a budget anywhere from the cheapest
    assignment to a bit above the costliest."""
    units, options = int(rng.integers(1, 7)), int(rng.integers(1, 5))
    shape = (units, options)
    cost = rng.integers(0, 10, shape).astype(float) if integer_costs else rng.uniform(0, 10, shape)
    loss = rng.random(shape)
    loss[rng.random(shape) < forbid] = np.nan
    loss[np.isnan(loss).all(axis=1), 0] = 1.0
    allowed_cost = np.where(np.isfinite(loss), cost, np.nan)
    smallest, largest = math.fsum(np.nanmin(allowed_cost, axis=1)), math.fsum(np.nanmax(allowed_cost, axis=1))
    budget = smallest + rng.uniform(0, 1.1) * (largest - smallest)
    return Table(cost, loss, budget)


def assert_honest(table: Table, allocation: Allocation, name: str = "") -> None:
    """Allowed, within budget, and the reported cost and loss are the table's, all recomputed."""
    assert table.fits(allocation.choice), (name, allocation)
    assert allocation.total_cost == pytest.approx(table.cost_of(allocation.choice), rel=1e-12), name
    assert allocation.total_loss == pytest.approx(table.loss_of(allocation.choice), rel=1e-12), name


def quantization_problem(seed: int, units: int = 20, average_bits: float = 3.5) -> AllocationProblem:
    """Units of 1k-4k weights at int2/3/4/8; loss ~ sensitivity * size * 4^-bits, the shape of
    quantization noise (each extra bit quarters the MSE)."""
    rng = np.random.default_rng(seed)
    size = rng.integers(1, 5, units) * 1000.0
    sensitivity = rng.lognormal(0.0, 1.0, units)
    loss = (sensitivity * size / 1000)[:, None] * 4.0 ** -BITS * rng.uniform(0.8, 1.2, (units, len(BITS)))
    return AllocationProblem(names("block", units), ("int2", "int3", "int4", "int8"), size[:, None] * BITS, loss,
                             average_bits * size.sum())


def neighbours_at_lowest_penalty(problem: AllocationProblem, penalty: float):
    """A fitness the additive model cannot see: extra loss for each pair of adjacent units both
    at option 0 (errors of neighbouring blocks compound)."""
    def fitness(choice: tuple[int, ...]) -> float:
        pairs = sum(1 for left, right in zip(choice, choice[1:]) if left == 0 and right == 0)
        return problem.total_loss(choice) + penalty * pairs
    return fitness


def test_exact_equals_brute_force_on_random_tables():
    rng = np.random.default_rng(0)
    for _ in range(60):
        table = random_table(rng)
        best = table.brute_force_loss()
        for solver in ("milp", "dp"):
            allocation = allocate(table.problem, "exact", solver=solver)
            assert_honest(table, allocation, solver)
            assert allocation.total_loss == pytest.approx(best, abs=1e-9), solver
    for _ in range(20):
        table = random_table(rng, integer_costs=False)
        allocation = allocate(table.problem, "exact")
        assert_honest(table, allocation)
        assert allocation.total_loss == pytest.approx(table.brute_force_loss(), abs=1e-9)


def test_exact_copes_with_tiny_losses_and_huge_costs():
    # KLs of 1e-6 and costs in bits of a 7B model: HiGHS's absolute tolerances must not decide.
    rng = np.random.default_rng(1)
    for _ in range(10):
        base = random_table(rng, forbid=0.0)
        table = Table(base.cost * 1e9 + 1e9, base.loss * 1e-6, base.budget * 1e9 + 1e9 * len(base.cost))
        allocation = allocate(table.problem, "exact")
        assert table.fits(allocation.choice)
        assert allocation.total_loss == pytest.approx(table.brute_force_loss(), rel=1e-9)


def test_every_allocator_is_allowed_and_within_budget_on_random_tables():
    rng = np.random.default_rng(2)
    for _ in range(25):
        table = random_table(rng, integer_costs=bool(rng.integers(2)), forbid=0.1)
        problem = table.problem
        runs = {name: {} for name in ("exact", "greedy")}
        runs["evolutionary"] = {"generations": 5, "offspring": 4}
        runs["hybrid"] = {"generations": 5, "offspring": 4}
        units, options = table.cost.shape
        everywhere = [o for o in range(options) if all(math.isfinite(table.loss[u][o]) for u in range(units))]
        if len(everywhere) >= 2:
            low, high = sorted(everywhere[:2], key=lambda o: table.cost_of([o] * units))
            if table.cost_of([low] * units) <= table.budget:
                runs["ordering"] = {"scores": "random", "high": high, "low": low}
        if table.uniform_choices():
            runs["uniform"] = {}
        for name, settings in runs.items():
            assert_honest(table, allocate(problem, name, **settings), name)


def test_greedy_is_within_budget_no_better_than_brute_force_and_cannot_take_one_more_step():
    rng = np.random.default_rng(4)
    for _ in range(40):
        table = random_table(rng, integer_costs=bool(rng.integers(2)))
        found = allocate(table.problem, "greedy")
        assert_honest(table, found)
        assert found.total_loss >= table.brute_force_loss() - 1e-12
        # The greedy stops only when no single change of one unit lowers the loss and still fits.
        units, options = table.cost.shape
        for unit, option in itertools.product(range(units), range(options)):
            moved = list(found.choice)
            moved[unit] = option
            if table.fits(moved):
                assert table.loss_of(moved) >= table.loss_of(found.choice) - 1e-12, (found.choice, moved)


def test_uniform_is_the_best_single_option_by_enumeration():
    rng = np.random.default_rng(5)
    checked = 0
    for _ in range(40):
        table = random_table(rng, forbid=0.05)
        fitting = table.uniform_choices()
        if not fitting:
            with pytest.raises(LayerwiseError, match="uniform: no"):
                allocate(table.problem, "uniform")
            continue
        found = allocate(table.problem, "uniform")
        assert_honest(table, found)
        assert len(set(found.choice)) == 1
        assert found.total_loss == pytest.approx(min(table.loss_of(choice) for choice in fitting), abs=1e-12)
        checked += 1
    assert checked >= 10


def test_ordering_and_greedy_against_exact_on_larger_tables():
    # 20 units is past brute force; exact is itself checked against it on small tables above.
    for seed in range(5):
        problem = quantization_problem(seed)
        optimum = allocate(problem, "exact").total_loss
        for scores in ("first", "last", "random"):
            assert allocate(problem, "ordering", scores=scores, high="int4", low="int3").total_loss >= optimum
        assert optimum <= allocate(problem, "greedy").total_loss <= 1.1 * optimum


def test_uniform_takes_the_lowest_loss_option_that_fits():
    problem = AllocationProblem(("a", "b"), ("int2", "int4", "int8"), [[2, 4, 8], [2, 4, 8]],
                                [[0.5, 0.1, 0.0], [0.5, 0.1, 0.0]], budget=9)
    allocation = allocate(problem, "uniform")
    assert allocation.labels(problem) == ("int4", "int4")
    assert (allocation.total_cost, allocation.total_loss, allocation.evaluations) == (8.0, pytest.approx(0.2), 0)
    # Only a mix fits: each option is cheap on one unit and dear on the other.
    tight = AllocationProblem(("a", "b"), ("x", "y"), [[1, 4], [4, 1]], [[1, 0], [1, 0]], budget=3)
    with pytest.raises(LayerwiseError, match="no single option fits budget=3.0; the cheapest, 'x', costs 5.0"):
        allocate(tight, "uniform")


def test_budget_above_the_maximum_takes_the_best_option_everywhere():
    problem = AllocationProblem(("a", "b"), ("int4", "int8"), [[4, 8], [4, 8]], [[0.3, 0.1], [0.2, np.nan]], 1e6)
    for name in ("exact", "greedy", "evolutionary", "hybrid"):
        assert allocate(problem, name).labels(problem) == ("int8", "int4"), name
    assert allocate(problem, "uniform").labels(problem) == ("int4", "int4")  # int8 is forbidden on b


def test_ordering_puts_the_lowest_scored_units_low_and_gives_fractional_bits():
    units = 8
    cost = np.tile([3.0, 4.0], (units, 1)) * 1000
    problem = AllocationProblem(names("block", units), ("int3", "int4"), cost, np.tile([0.2, 0.1], (units, 1)),
                                budget=3.6 * 1000 * units)
    scores = [0.9, 0.1, 0.5, 0.3, 0.8, 0.05, 0.7, 0.6]  # higher = more important (LIM)
    allocation = allocate(problem, "ordering", scores=scores, high="int4", low="int3")
    lowered = {unit for unit, label in enumerate(allocation.labels(problem)) if label == "int3"}
    # 3.6 bits on average needs 3.2 units at int3, so four: the four least important.
    assert lowered == {5, 1, 3, 2}
    average_bits = allocation.total_cost / (1000 * units)
    assert 3 < average_bits < 4 and average_bits == 3.5
    by_name = allocate(problem, "ordering", scores=dict(zip(problem.units, scores)), high=1, low=0)
    assert by_name.choice == allocation.choice
    # The two options default to (costlier, cheaper) when the problem has exactly two.
    assert allocate(problem, "ordering", scores=scores).choice == allocation.choice


def test_ordering_first_last_and_random():
    problem = AllocationProblem(names("block", 6), ("int2", "int4"), np.tile([2.0, 4.0], (6, 1)),
                                np.tile([1.0, 0.0], (6, 1)), budget=20.0)  # room for 4 at int4
    assert allocate(problem, "ordering", scores="first").labels(problem)[:2] == ("int2", "int2")
    assert allocate(problem, "ordering", scores="last").labels(problem)[-2:] == ("int2", "int2")
    random_runs = {allocate(problem, "ordering", scores="random", seed=seed).choice for seed in range(6)}
    assert len(random_runs) > 1
    assert allocate(problem, "ordering", scores="random", seed=4) == allocate(problem, "ordering", scores="random",
                                                                              seed=4)
    with pytest.raises(LayerwiseError, match="even every unit at low='int2' costs 12.0"):
        allocate(AllocationProblem(problem.units, ("int2", "int4", "drop"), np.tile([2.0, 4.0, 0.0], (6, 1)),
                                   np.tile([1.0, 0.0, 9.0], (6, 1)), budget=10.0),
                 "ordering", scores="first", high="int4", low="int2")
    with pytest.raises(LayerwiseError, match="scores is missing"):
        allocate(problem, "ordering")
    with pytest.raises(LayerwiseError, match="give 6 finite numbers"):
        allocate(problem, "ordering", scores=[1.0, 2.0])


def test_evolutionary_is_deterministic_for_a_seed_and_counts_evaluations():
    problem = quantization_problem(seed=7, units=12)
    calls = []

    def fitness(choice: tuple[int, ...]) -> float:
        calls.append(choice)
        return problem.total_loss(choice)

    first = allocate(problem, "evolutionary", fitness=fitness, generations=30, seed=11)
    assert first.evaluations == len(calls) == len(set(calls))  # cached: no assignment scored twice
    # Every candidate it proposed was within budget (summed here, not by the allocator), and with a
    # single fidelity the result is the best assignment it ever scored.
    size = problem.cost[:, 0] / BITS[0]
    assert all(math.fsum(float(size[u] * BITS[o]) for u, o in enumerate(choice)) <= problem.budget for choice in calls)
    assert first.fitness == min(fitness(choice) for choice in set(calls))
    second = allocate(problem, "evolutionary", fitness=fitness, generations=30, seed=11)
    assert first == second
    assert first.fitness == pytest.approx(first.total_loss)


def test_evolutionary_reaches_exact_within_one_percent_on_an_additive_fitness():
    problem = quantization_problem(seed=0, units=20)
    optimum = allocate(problem, "exact").total_loss
    found = allocate(problem, "evolutionary", generations=150, offspring=16, seed=0)
    assert found.evaluations <= 2500
    assert found.total_loss <= 1.01 * optimum
    assert found.total_loss < 0.5 * allocate(problem, "uniform").total_loss


def test_hybrid_closes_most_of_the_gap_to_the_brute_force_optimum_of_a_non_additive_fitness():
    # 8 units x 4 options = 65,536 assignments, enumerated: the additive optimum (where hybrid
    # starts) and the true optimum under a fitness that charges adjacent int2 pairs.
    penalty, units = 0.1, 8
    every = np.array(list(itertools.product(range(len(BITS)), repeat=units)))
    gap_total = gap_closed = 0.0
    at_optimum = 0
    for seed in range(8):
        problem = quantization_problem(seed, units=units, average_bits=2.75)
        size = problem.cost[:, 0] / BITS[0]
        loss = problem.loss[np.arange(units), every].sum(axis=1)
        fits = (size * BITS[every]).sum(axis=1) <= problem.budget - 1e-6  # clear of rounding at the edge
        value = loss + penalty * ((every[:, :-1] == 0) & (every[:, 1:] == 0)).sum(axis=1)
        true_optimum = value[fits].min()
        additive_optimum = value[fits][np.argmin(loss[fits])]
        fitness = neighbours_at_lowest_penalty(problem, penalty)
        refined = allocate(problem, "hybrid", fitness=fitness, generations=15, seed=seed)
        assert refined.fitness == pytest.approx(fitness(refined.choice))
        assert true_optimum - 1e-9 <= refined.fitness <= additive_optimum + 1e-9
        gap_total += additive_optimum - true_optimum
        gap_closed += additive_optimum - refined.fitness
        at_optimum += refined.fitness <= true_optimum + 1e-9
    assert gap_total > 0.3  # the interaction matters on these tables (measured: 0.49)
    assert gap_closed >= 0.75 * gap_total  # measured: 96%
    assert at_optimum >= 6  # measured: 7 of 8


def test_hybrid_fixes_an_interaction_the_additive_model_misses():
    # Two of four units must go to int2; units 0 and 1 are the cheapest to lower, but they are
    # neighbours, and the fitness charges 1.0 for that. Lowering 0 and 2 costs 0.4 instead of 1.2.
    problem = AllocationProblem(names("block", 4), ("int2", "int4"), np.tile([2.0, 4.0], (4, 1)),
                                [[0.1, 0.0], [0.1, 0.0], [0.3, 0.0], [0.35, 0.0]], budget=12.0)
    fitness = neighbours_at_lowest_penalty(problem, penalty=1.0)
    additive_optimum = allocate(problem, "exact")
    assert additive_optimum.labels(problem) == ("int2", "int2", "int4", "int4")
    refined = allocate(problem, "hybrid", fitness=fitness, generations=20, seed=0)
    assert refined.labels(problem) == ("int2", "int4", "int2", "int4")
    assert refined.fitness == pytest.approx(0.4)
    assert fitness(additive_optimum.choice) == pytest.approx(1.2)
    assert refined.allocator == "hybrid" and refined.evaluations > 0


def test_multi_fidelity_screening_calls_the_expensive_fitness_less():
    problem = quantization_problem(seed=3, units=12)
    counts = {"cheap": 0, "expensive": 0}

    def cheap(choice: tuple[int, ...]) -> float:
        counts["cheap"] += 1
        return problem.total_loss(choice) * (1 + 0.01 * (hash(choice) % 7))  # a noisy proxy

    def expensive(choice: tuple[int, ...]) -> float:
        counts["expensive"] += 1
        return problem.total_loss(choice)

    allocation = allocate(problem, "evolutionary", fidelities=[cheap, expensive], survivors=[2], generations=20,
                          offspring=16, seed=0)
    assert counts["expensive"] < counts["cheap"] / 4
    assert allocation.evaluations == counts["cheap"] + counts["expensive"]
    assert allocation.fitness == pytest.approx(allocation.total_loss)

    levels_called = []

    def by_level(choice: tuple[int, ...], fidelity: int) -> float:
        levels_called.append(fidelity)
        return problem.total_loss(choice)

    allocate(problem, "evolutionary", fidelities=by_level, survivors=[8, 2], generations=10, seed=0)
    assert set(levels_called) == {0, 1, 2}
    assert levels_called.count(2) < levels_called.count(1) < levels_called.count(0)


def mixing_penalty(table: Table, penalty: float):
    """A fitness the table cannot see: extra loss for each pair of neighbours at different options
    (as when a kernel pays for switching formats). Uniform assignments never pay it."""
    def fitness(choice: tuple[int, ...]) -> float:
        return table.loss_of(choice) + penalty * sum(left != right for left, right in zip(choice, choice[1:]))
    return fitness


def test_never_worse_than_uniform_returns_uniform_when_an_independent_fitness_prefers_it():
    # Under the table the mix (int8, int2, int8, int2) loses 0.2 and uniform int4 0.4, at the same
    # cost 20; the fitness charges 0.5 per switch between neighbours, so the mix scores 1.7.
    table = Table(np.tile([2.0, 4.0, 8.0], (4, 1)),
                  np.array([[0.3, 0.1, 0.0], [0.1, 0.1, 0.0], [0.3, 0.1, 0.0], [0.1, 0.1, 0.0]]), budget=20.0)
    problem, fitness = table.problem, mixing_penalty(table, 0.5)
    mixed = allocate(problem, "exact")
    assert mixed.choice == (2, 0, 2, 0) and table.loss_of(mixed.choice) < table.loss_of((1, 1, 1, 1))
    kept = never_worse_than_uniform(problem, mixed, fitness)
    assert kept.choice == (1, 1, 1, 1) and kept.allocator == "uniform"
    assert kept.fitness == pytest.approx(fitness((1, 1, 1, 1))) == pytest.approx(0.4)
    assert kept.evaluations == 1 + len(table.uniform_choices())  # the mix, then int2 and int4 (int8 costs 32)

    # With switching cheap, the mix wins under the same kind of fitness and is returned unchanged.
    cheap = mixing_penalty(table, 0.01)
    kept = never_worse_than_uniform(problem, mixed, cheap)
    assert kept.choice == mixed.choice and kept.allocator == "exact"
    assert kept.fitness == pytest.approx(cheap(mixed.choice)) == pytest.approx(0.23)


def test_never_worse_than_uniform_keeps_the_better_of_the_plan_and_every_uniform_on_random_tables():
    rng = np.random.default_rng(6)
    returned_uniform = returned_plan = 0
    for _ in range(60):
        table = random_table(rng, forbid=0.0)
        fitness = mixing_penalty(table, float(rng.uniform(0, 0.3)))
        plan = allocate(table.problem, "exact")
        uniforms = table.uniform_choices()
        best = min([fitness(plan.choice)] + [fitness(choice) for choice in uniforms])
        kept = never_worse_than_uniform(table.problem, plan, fitness)
        assert table.fits(kept.choice)
        assert fitness(kept.choice) == pytest.approx(best, abs=1e-12)
        assert kept.fitness == pytest.approx(fitness(kept.choice), abs=1e-12)
        if kept.choice != plan.choice:
            assert kept.choice in uniforms and fitness(kept.choice) < fitness(plan.choice)
            returned_uniform += 1
        else:
            returned_plan += 1
    assert returned_uniform >= 5 and returned_plan >= 5  # both branches exercised


def test_never_worse_than_uniform_defaults_to_the_table_loss():
    problem = AllocationProblem(names("block", 4), ("int2", "int4"), np.tile([2.0, 4.0], (4, 1)),
                                np.tile([0.5, 0.0], (4, 1)), budget=16.0)
    kept = never_worse_than_uniform(problem, Allocation.of(problem, (1, 0, 1, 0), "exact"))
    assert kept.allocator == "uniform" and kept.choice == (1, 1, 1, 1) and kept.evaluations == 3


def test_allocation_reports_labels_cost_and_loss():
    problem = AllocationProblem(("attn", "mlp"), ("int4", "int8"), [[4, 8], [40, 80]], [[0.2, 0.1], [0.4, 0.0]], 84)
    allocation = allocate(problem, "exact")
    assert allocation.labels(problem) == ("int4", "int8")
    assert (allocation.total_cost, allocation.total_loss) == (84.0, pytest.approx(0.2))
    assert allocation.allocator == "exact" and allocation.evaluations == 0


@pytest.mark.parametrize(("changes", "message"), [
    ({"budget": 5.0}, r"budget=5.0 is below the smallest achievable total cost 6.0 \(largest 16.0\)"),
    ({"budget": float("nan")}, "budget=nan is not finite"),
    ({"options": (), "cost": np.zeros((2, 0)), "loss": np.zeros((2, 0))}, "options is empty"),
    ({"cost": np.ones((3, 2))}, r"cost has shape \(3, 2\); expected \(units, options\) = \(2, 2\)"),
    ({"loss": np.ones((2, 3))}, r"loss has shape \(2, 3\)"),
    ({"cost": [[2.0, -1.0], [4.0, 8.0]]}, r"cost\['a', 'int8'\] = -1.0; costs of allowed options must be finite"),
    ({"loss": [[np.nan, np.inf], [0.1, 0.0]]}, "forbids every option for unit 'a'"),
    ({"units": ("a", "a")}, r"units repeats \['a'\]"),
])
def test_bad_problems_are_rejected_with_a_message_naming_the_field(changes, message):
    fields = {"units": ("a", "b"), "options": ("int4", "int8"), "cost": [[2.0, 8.0], [4.0, 8.0]],
              "loss": [[0.2, 0.0], [0.3, 0.0]], "budget": 10.0}
    with pytest.raises(LayerwiseError, match=message):
        AllocationProblem(**{**fields, **changes})


def test_forbidden_options_are_never_chosen_and_their_costs_ignored():
    problem = AllocationProblem(("a", "b"), ("int2", "int4", "drop"), [[2, 4, np.nan], [2, 4, 0]],
                                [[0.9, 0.1, np.nan], [0.9, 0.1, 0.5]], budget=4.0)
    assert (problem.min_cost(), problem.max_cost()) == (2.0, 8.0)
    assert allocate(problem, "exact").labels(problem) == ("int4", "drop")
    with pytest.raises(LayerwiseError, match="start puts unit 'a' at option 'drop'"):
        allocate(problem, "evolutionary", start=("drop", "int2"))


def test_unknown_allocator_and_unknown_option_are_explained():
    problem = quantization_problem(seed=0, units=4)
    with pytest.raises(LayerwiseError, match="unknown allocator 'annealing'; registered: .*evolutionary.*exact"):
        allocate(problem, "annealing")
    with pytest.raises(LayerwiseError, match="allocator 'greedy' has no option 'seed'; accepted: \\(none\\)"):
        allocate(problem, "greedy", seed=1)
    with pytest.raises(LayerwiseError, match="solver='lp' is not known"):
        allocate(problem, "exact", solver="lp")
    with pytest.raises(LayerwiseError, match="give fitness or fidelities, not both"):
        allocate(problem, "evolutionary", fitness=problem.total_loss, fidelities=[problem.total_loss])
    assert {"uniform", "exact", "greedy", "ordering", "evolutionary", "hybrid"} <= set(ALLOCATORS)


def test_an_allocator_over_budget_is_caught():
    @register_allocator("test_overspends")
    def overspends(problem: AllocationProblem) -> Allocation:
        return Allocation.of(problem, [int(np.argmax(row)) for row in problem.cost], "test_overspends")

    try:
        with pytest.raises(AssertionError, match="test_overspends"):
            allocate(quantization_problem(seed=0, units=4), "test_overspends")
    finally:
        del ALLOCATORS["test_overspends"]


def test_an_interrupted_search_resumes_to_the_same_result(tmp_path):
    problem = quantization_problem(seed=3, units=12)
    fitness = neighbours_at_lowest_penalty(problem, penalty=0.02)
    settings = dict(fitness=fitness, generations=25, offspring=8, seed=5)
    uninterrupted = allocate(problem, "hybrid", **settings)

    calls = 0

    def interrupted_fitness(choice):
        nonlocal calls
        calls += 1
        if calls > 60:  # partway through the search, after some generations were saved
            raise KeyboardInterrupt
        return fitness(choice)

    checkpoint = tmp_path / "search.progress"
    with pytest.raises(KeyboardInterrupt):
        allocate(problem, "hybrid", **dict(settings, fitness=interrupted_fitness), checkpoint=checkpoint)
    saved = json.loads(checkpoint.read_text())
    assert 0 < saved["generation"] < 25
    resumed = allocate(problem, "hybrid", **settings, checkpoint=checkpoint)
    assert resumed == uninterrupted  # same plan, same fitness, same count of evaluations

    other = quantization_problem(seed=4, units=12)
    with pytest.raises(LayerwiseError, match="checkpoint of another search"):
        allocate(other, "hybrid", **settings, checkpoint=checkpoint)
