"""Search under a fitness that need not be additive (the real KL of whole plans):
"evolutionary", EvoPress (Sieberling et al. 2024, arXiv:2410.14649), a (1+lambda) search with
level-switch mutations and multi-fidelity selection; "hybrid", the exact optimum of the table
refined by a short evolutionary run under the real fitness; and `never_worse_than_uniform`, a
plan or the best uniform one, whichever a fitness prefers.
"""
from __future__ import annotations

import hashlib
import json
import math
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Callable, Sequence

import numpy as np

from layerwise.errors import LayerwiseError
from layerwise.plan.allocate import best_uniform_choice, exact, greedy, register_allocator, uniform_choices_that_fit
from layerwise.plan.problem import Allocation, AllocationProblem, Choice, Fitness
from layerwise.util.files import read_artifact, write_text_atomic


class CachedFitness:
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
    scorer = CachedFitness(stages)
    final = len(stages) - 1
    if start is None:
        start = best_uniform_choice(problem) or greedy(problem).choice
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

    def restore(self, scorer: CachedFitness, rng: np.random.Generator) -> tuple[int, Choice, float, float]:
        data = read_artifact(self.path, self.SCHEMA, 1, "search checkpoint")
        if data.get("key") != self.key:
            raise LayerwiseError(f"{self.path} is the checkpoint of another search (other problem, budget, seed or "
                                 "settings); delete it to start afresh")
        scorer.values = {(tuple(choice), stage): value for choice, stage, value in data["fitness"]}
        scorer.calls = data["calls"]
        rng.bit_generator.state = data["rng"]
        return data["generation"], tuple(data["parent"]), data["parent_fitness"], data["start_fitness"]

    def save(self, generation: int, parent: Choice, parent_fitness: float, start_fitness: float,
             scorer: CachedFitness, rng: np.random.Generator) -> None:
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
    scorer = CachedFitness([fitness])
    value = scorer(allocation.choice, 0)
    uniforms = uniform_choices_that_fit(problem)
    best_uniform = min(uniforms, key=lambda choice: (scorer(choice, 0), choice[0]), default=None)
    evaluations = allocation.evaluations + scorer.calls
    if best_uniform is not None and scorer(best_uniform, 0) < value:
        return Allocation.of(problem, best_uniform, "uniform", evaluations, scorer(best_uniform, 0))
    return replace(allocation, evaluations=evaluations, fitness=value)
