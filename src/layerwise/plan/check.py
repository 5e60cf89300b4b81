"""The never-worse check: the chosen plan against every same-size uniform plan, on held-out windows.

The check's windows are calibration text that neither the sensitivity table nor the search saw
(`layerwise.data.windows.TextSlots` hands each job its own slots), so a plan the search over-fitted
to its own windows gets no advantage here. Each plan's KL is kept per window, so the margin over
the best uniform plan comes with a paired 95% bootstrap interval.
"""
from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Callable, Sequence

import numpy as np

from layerwise.plan.allocate import Allocation, AllocationProblem, uniform_choices_that_fit
from layerwise.util.intervals import mean_ci, paired_difference_ci, paired_ratio_ci

WindowKL = Callable[[Sequence[int]], np.ndarray]


@dataclass
class UniformCheck:
    """What the check found; `returned` is the plan to use (the uniform one if it did better)."""

    returned: Allocation
    plan_kl: float
    plan_kl_ci: list[float]
    uniform: dict[str, dict] = field(default_factory=dict)  # option -> {"kl", "kl_ci"}
    best_uniform: str | None = None
    margin: float | None = None  # best uniform KL - plan KL (positive: the plan is better)
    margin_ci: list[float] | None = None
    ratio: float | None = None  # plan KL / best uniform KL
    ratio_ci: list[float] | None = None

    def to_dict(self) -> dict:
        return {"returned": self.returned.allocator, "plan_kl": self.plan_kl, "plan_kl_ci": self.plan_kl_ci,
                "uniform": self.uniform, "best_uniform": self.best_uniform, "margin": self.margin,
                "margin_ci": self.margin_ci, "ratio": self.ratio, "ratio_ci": self.ratio_ci}


def check_against_uniform(problem: AllocationProblem, allocation: Allocation, window_kl: WindowKL) -> UniformCheck:
    """Measure `allocation` and every uniform assignment that fits the budget with `window_kl`
    (choice -> KL per held-out window); return the uniform one if its mean KL is lower."""
    plan = np.asarray(window_kl(allocation.choice), dtype=np.float64)
    check = UniformCheck(allocation, float(plan.mean()), mean_ci(plan))
    per_uniform = {}
    for choice in uniform_choices_that_fit(problem):
        if tuple(choice) == tuple(allocation.choice):
            values = plan
        else:
            values = np.asarray(window_kl(choice), dtype=np.float64)
        name = problem.options[choice[0]]
        per_uniform[name] = (choice, values)
        check.uniform[name] = {"kl": float(values.mean()), "kl_ci": mean_ci(values)}
    if not per_uniform:
        return check
    best = min(per_uniform, key=lambda name: (per_uniform[name][1].mean(), per_uniform[name][0][0]))
    choice, best_values = per_uniform[best]
    check.best_uniform = best
    check.margin = float(best_values.mean() - plan.mean())
    check.margin_ci = paired_difference_ci(best_values, plan)
    if best_values.mean() > 0:
        check.ratio = float(plan.mean() / best_values.mean())
        check.ratio_ci = paired_ratio_ci(plan, best_values)
    evaluations = allocation.evaluations + len(per_uniform) + 1
    if best_values.mean() < plan.mean():
        check.returned = Allocation.of(problem, choice, "uniform", evaluations, float(best_values.mean()))
    else:
        check.returned = replace(allocation, evaluations=evaluations)
    return check
