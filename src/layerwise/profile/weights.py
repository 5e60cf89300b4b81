"""Per-linear weight statistics: data-free, computed once per weight matrix."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch


@dataclass(frozen=True)
class WeightMetric:
    name: str
    description: str
    compute: Callable[[torch.Tensor], float]


WEIGHT_METRICS: dict[str, WeightMetric] = {}


def register_weight_metric(name: str, description: str):
    def decorate(compute: Callable[[torch.Tensor], float]) -> Callable[[torch.Tensor], float]:
        WEIGHT_METRICS[name] = WeightMetric(name, description, compute)
        return compute
    return decorate


@register_weight_metric(
    "zd",
    "fraction of weights with |z-score| > 1 (Layer-Wise Quantization's ZD score; a Gaussian gives 0.317)",
)
def z_score_distribution(weight: torch.Tensor) -> float:
    w = weight.double()
    std = w.std()
    if std == 0:
        return 0.0
    return ((w - w.mean()).abs() > std).double().mean().item()


@register_weight_metric("weight_kurtosis", "kurtosis of the weight entries (3 for a Gaussian)")
def weight_kurtosis(weight: torch.Tensor) -> float:
    w = weight.double().flatten()
    centered = w - w.mean()
    variance = centered.pow(2).mean()
    return (centered.pow(4).mean() / variance**2).item() if variance > 0 else float("nan")


@register_weight_metric(
    "effective_rank",
    "exp(entropy of normalised singular values) (Roy & Vetterli), as used to find low-rank "
    "structure in WeLore; at most min(rows, columns)",
)
def effective_rank(weight: torch.Tensor) -> float:
    singular = torch.linalg.svdvals(weight.float())
    p = singular / singular.sum()
    p = p[p > 0]
    return torch.exp(-(p * p.log()).sum()).item()
