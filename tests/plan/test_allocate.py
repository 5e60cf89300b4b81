"""Allocators against brute force on small tables, the budget on random ones, and the promises
each allocator makes (ordering's order, EvoPress's determinism and screening, hybrid >= exact)."""
from __future__ import annotations

import itertools
import json
import math

import numpy as np
import pytest

from layerwise import LayerwiseError
from layerwise.plan.allocate import (
    ALLOCATORS,
    Allocation,
    AllocationProblem,
    allocate,
    never_worse_than_uniform,
    register_allocator,
)

BITS = np.array([2.0, 3.0, 4.0, 8.0])


def names(prefix: str, count: int) -> tuple[str, ...]:
    return tuple(f"{prefix}{index}" for index in range(count))


def random_problem(rng: np.random.Generator, integer_costs: bool = True, forbid: float = 0.15) -> AllocationProblem:
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
    return AllocationProblem(names("unit", units), names("option", options), cost, loss, budget)


def brute_force_loss(problem: AllocationProblem) -> float:
    """The least additive loss over every assignment within budget, by enumeration."""
    choices = np.array(list(itertools.product(range(len(problem.options)), repeat=len(problem.units))))
    rows = np.arange(len(problem.units))
    total_cost = np.where(problem.allowed, problem.cost, 0.0)[rows, choices].sum(axis=1)
    total_loss = problem.loss[rows, choices].sum(axis=1)
    # Vectorised sums may differ from the exact (fsum) total by an ulp; re-check the boundary.
    fits = [index for index in np.flatnonzero(total_cost <= problem.budget + 1e-6)
            if problem.total_cost(choices[index]) <= problem.budget]
    return float(total_loss[fits].min())


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
        problem = random_problem(rng)
        best = brute_force_loss(problem)
        assert allocate(problem, "exact").total_loss == pytest.approx(best, abs=1e-9)
        assert allocate(problem, "exact", solver="dp").total_loss == pytest.approx(best, abs=1e-9)
    for _ in range(20):
        problem = random_problem(rng, integer_costs=False)
        assert allocate(problem, "exact").total_loss == pytest.approx(brute_force_loss(problem), abs=1e-9)


def test_exact_copes_with_tiny_losses_and_huge_costs():
    # KLs of 1e-6 and costs in bits of a 7B model: HiGHS's absolute tolerances must not decide.
    rng = np.random.default_rng(1)
    for _ in range(10):
        base = random_problem(rng, forbid=0.0)
        problem = AllocationProblem(base.units, base.options, base.cost * 1e9 + 1e9, base.loss * 1e-6,
                                    base.budget * 1e9 + 1e9 * len(base.units))
        assert allocate(problem, "exact").total_loss == pytest.approx(brute_force_loss(problem), rel=1e-9)


def test_every_allocator_meets_the_budget_on_random_tables():
    rng = np.random.default_rng(2)
    for _ in range(25):
        problem = random_problem(rng, integer_costs=bool(rng.integers(2)), forbid=0.1)
        runs = {name: {} for name in ("exact", "greedy")}
        runs["evolutionary"] = {"generations": 5, "offspring": 4}
        runs["hybrid"] = {"generations": 5, "offspring": 4}
        everywhere = np.flatnonzero(problem.allowed.all(axis=0))
        if len(everywhere) >= 2:
            low, high = sorted(everywhere[:2], key=lambda o: problem.cost[:, o].sum())
            if problem.total_cost([low] * len(problem.units)) <= problem.budget:
                runs["ordering"] = {"scores": "random", "high": int(high), "low": int(low)}
        if any(problem.total_cost([o] * len(problem.units)) <= problem.budget for o in everywhere):
            runs["uniform"] = {}
        for name, options in runs.items():
            allocation = allocate(problem, name, **options)
            assert allocation.total_cost <= problem.budget, name
            assert all(problem.allowed[unit, option] for unit, option in enumerate(allocation.choice)), name


def test_greedy_ordering_and_uniform_never_beat_exact_and_greedy_is_close():
    rng = np.random.default_rng(3)
    for _ in range(30):
        problem = random_problem(rng, forbid=0.0)
        optimum = allocate(problem, "exact").total_loss
        assert allocate(problem, "greedy").total_loss >= optimum - 1e-12
        if problem.total_cost([int(np.argmin(problem.cost.sum(axis=0)))] * len(problem.units)) <= problem.budget:
            assert allocate(problem, "uniform").total_loss >= optimum - 1e-12
    for seed in range(5):
        problem = quantization_problem(seed)
        optimum = allocate(problem, "exact").total_loss
        for scores in ("first", "last", "random"):
            assert allocate(problem, "ordering", scores=scores, high="int4", low="int3").total_loss >= optimum
        assert allocate(problem, "greedy").total_loss <= 1.1 * optimum


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
    second = allocate(problem, "evolutionary", fitness=fitness, generations=30, seed=11)
    assert first == second
    assert first.fitness == pytest.approx(first.total_loss)
    start = allocate(problem, "uniform")
    assert first.total_loss <= start.total_loss  # elitist: never worse than where it started


def test_evolutionary_reaches_exact_within_one_percent_on_an_additive_fitness():
    problem = quantization_problem(seed=0, units=20)
    optimum = allocate(problem, "exact").total_loss
    found = allocate(problem, "evolutionary", generations=150, offspring=16, seed=0)
    assert found.evaluations <= 2500
    assert found.total_loss <= 1.01 * optimum
    assert found.total_loss < 0.5 * allocate(problem, "uniform").total_loss


def test_hybrid_is_never_worse_than_exact_under_a_non_additive_fitness():
    for seed in range(4):
        problem = quantization_problem(seed, units=10)
        fitness = neighbours_at_lowest_penalty(problem, penalty=0.05)
        additive_optimum = allocate(problem, "exact")
        refined = allocate(problem, "hybrid", fitness=fitness, generations=15, seed=seed)
        assert refined.fitness == pytest.approx(fitness(refined.choice))
        assert refined.fitness <= fitness(additive_optimum.choice)


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


def test_never_worse_than_uniform_falls_back_when_the_mix_scores_worse():
    problem = AllocationProblem(names("block", 4), ("int2", "int4"), np.tile([2.0, 4.0], (4, 1)),
                                np.tile([0.5, 0.0], (4, 1)), budget=16.0)
    mixed = Allocation.of(problem, (1, 0, 1, 0), "exact")
    kept = never_worse_than_uniform(problem, mixed)
    assert kept.allocator == "uniform" and kept.choice == (1, 1, 1, 1) and kept.evaluations == 3

    def prefers_int2(choice: tuple[int, ...]) -> float:
        return float(sum(choice))

    cheaper_uniform = never_worse_than_uniform(problem, Allocation.of(problem, (0, 1, 0, 0), "exact"), prefers_int2)
    assert cheaper_uniform.allocator == "uniform" and cheaper_uniform.choice == (0, 0, 0, 0)
    best = allocate(problem, "exact")
    assert never_worse_than_uniform(problem, best).choice == best.choice


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
