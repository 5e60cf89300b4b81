"""The never-worse check: the chosen plan against every same-size uniform plan, on every
calibration domain, on held-out windows.

The check's windows are calibration text that neither the sensitivity table nor the search saw
(`layerwise.data.windows.TextSlots` hands each job its own slots), so a plan the search over-fitted
to its own windows gets no advantage here. A plan passes only if, on every domain, its mean KL is
at most that of every uniform plan that fits the budget; otherwise the next candidate (a safer
plan) is tried, and if none passes the best uniform plan is returned. Each plan's KL is kept per
window, so every margin comes with a paired 95% bootstrap interval.
"""
from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Callable, Sequence

import numpy as np

from layerwise.plan.allocate import uniform_choices_that_fit
from layerwise.plan.objectives import objective_named
from layerwise.plan.problem import Allocation, AllocationProblem
from layerwise.util.intervals import mean_ci, paired_difference_ci, paired_ratio_ci

WindowKL = Callable[[Sequence[int]], np.ndarray]


@dataclass
class UniformCheck:
    """What the check found; `returned` is the plan to use. The plan-level numbers are for the
    returned candidate (or, when uniform is returned, the first candidate), over all windows;
    `domains` has them per domain against that domain's best uniform plan."""

    returned: Allocation
    plan_kl: float
    plan_kl_ci: list[float]
    uniform: dict[str, dict] = field(default_factory=dict)  # option -> {"kl", "kl_ci", "domains": {d: kl}}
    best_uniform: str | None = None
    margin: float | None = None  # best uniform KL - plan KL (positive: the plan is better)
    margin_ci: list[float] | None = None
    ratio: float | None = None  # plan KL / best uniform KL
    ratio_ci: list[float] | None = None
    domains: dict[str, dict] = field(default_factory=dict)
    candidates: list[dict] = field(default_factory=list)  # every plan tried, in order, and whether it passed

    def to_dict(self) -> dict:
        return {"returned": self.returned.allocator, "plan_kl": self.plan_kl, "plan_kl_ci": self.plan_kl_ci,
                "uniform": self.uniform, "best_uniform": self.best_uniform, "margin": self.margin,
                "margin_ci": self.margin_ci, "ratio": self.ratio, "ratio_ci": self.ratio_ci,
                "domains": self.domains, "candidates": self.candidates}


def _by_domain(values: np.ndarray, labels: np.ndarray) -> dict[str, np.ndarray]:
    return {name: values[labels == name] for name in dict.fromkeys(labels.tolist())}


def _comparison(plan: np.ndarray, uniform: np.ndarray) -> dict:
    compared = {"margin": float(uniform.mean() - plan.mean()), "margin_ci": paired_difference_ci(uniform, plan)}
    if uniform.mean() > 0:
        compared |= {"ratio": float(plan.mean() / uniform.mean()), "ratio_ci": paired_ratio_ci(plan, uniform)}
    return compared


def check_against_uniform(problem: AllocationProblem, allocation: Allocation, window_kl: WindowKL,
                          window_domains: Sequence[str] | None = None,
                          fallbacks: Sequence[Allocation] = ()) -> UniformCheck:
    """Measure `allocation` and every uniform assignment that fits the budget with `window_kl`
    (choice -> KL per held-out window, each window in `window_domains`). The first of
    `allocation`, *`fallbacks` whose mean KL on every domain is at most every uniform plan's is
    returned; if none is, the uniform plan with the best score under the problem's objective."""
    measured: dict[tuple[int, ...], np.ndarray] = {}

    def kl_of(choice: Sequence[int]) -> np.ndarray:
        key = tuple(choice)
        if key not in measured:
            measured[key] = np.asarray(window_kl(key), dtype=np.float64)
        return measured[key]

    first = kl_of(allocation.choice)
    labels = np.asarray(window_domains if window_domains is not None else ["calibration"] * len(first))
    score = objective_named(problem.objective).plan_score
    uniforms = {problem.options[choice[0]]: choice for choice in uniform_choices_that_fit(problem)}
    uniform_kl = {name: kl_of(choice) for name, choice in uniforms.items()}
    uniform_domains = {name: _by_domain(values, labels) for name, values in uniform_kl.items()}

    def passes(values: np.ndarray) -> bool:
        return all(domain.mean() <= uniform_domains[name][d].mean()
                   for d, domain in _by_domain(values, labels).items() for name in uniform_domains)

    candidates, returned = [], None
    for candidate in (allocation, *fallbacks):
        values = kl_of(candidate.choice)
        ok = passes(values)
        candidates.append({"allocator": candidate.allocator, "kl": float(values.mean()), "passed": ok,
                           "domain_kl": {d: float(v.mean()) for d, v in _by_domain(values, labels).items()}})
        if ok:
            returned = candidate
            break
    shown = returned or allocation
    plan = kl_of(shown.choice)
    check = UniformCheck(shown, float(plan.mean()), mean_ci(plan))
    for name, values in uniform_kl.items():
        check.uniform[name] = {"kl": float(values.mean()), "kl_ci": mean_ci(values),
                               "domains": {d: float(v.mean()) for d, v in uniform_domains[name].items()}}
    check.candidates = candidates
    evaluations = allocation.evaluations + len(measured)
    if not uniform_kl:
        check.returned = replace(shown, evaluations=evaluations)
        return check

    def domain_score(name: str) -> float:
        return score(np.array([v.mean() for v in uniform_domains[name].values()]))

    best = min(uniform_kl, key=lambda name: (domain_score(name), uniforms[name][0]))
    check.best_uniform = best
    compared = _comparison(plan, uniform_kl[best])
    check.margin, check.margin_ci = compared["margin"], compared["margin_ci"]
    check.ratio, check.ratio_ci = compared.get("ratio"), compared.get("ratio_ci")
    for d, values in _by_domain(plan, labels).items():
        rival = min(uniform_domains, key=lambda name: (uniform_domains[name][d].mean(), uniforms[name][0]))
        check.domains[d] = {"plan_kl": float(values.mean()), "plan_kl_ci": mean_ci(values), "best_uniform": rival,
                            "uniform_kl": float(uniform_domains[rival][d].mean()),
                            **_comparison(values, uniform_domains[rival][d])}
    if returned is None:
        check.returned = Allocation.of(problem, uniforms[best], "uniform", evaluations, domain_score(best))
    else:
        check.returned = replace(returned, evaluations=evaluations)
    return check
