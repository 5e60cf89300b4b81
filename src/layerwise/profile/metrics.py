"""Per-block activation statistics, one registered function each.

A metric turns one block call into *partial sums* (floats) that are added across batches, so
memory does not grow with the number of tokens; keys that start with "max_" are combined by max.
`finalize` turns the combined partials into the reported number.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

import torch

from layerwise.engine.hooks import BlockCall
from layerwise.errors import LayerwiseError

Partials = dict[str, float]


@dataclass(frozen=True)
class BlockMetric:
    name: str
    description: str
    compute: Callable[[BlockCall], Partials]
    finalize: Callable[[Partials], float]


METRICS: dict[str, BlockMetric] = {}
# Other papers' names for the same quantity; accepted wherever a metric name is.
METRIC_ALIASES = {"bi": "lim", "block_influence": "lim"}


def _mean(partials: Partials) -> float:
    # No samples (the MLP sparsity of mixture-of-experts blocks): not a number, shown as "-".
    return partials["total"] / partials["count"] if partials["count"] else float("nan")


def register_metric(name: str, description: str, finalize: Callable[[Partials], float] = _mean):
    def decorate(compute: Callable[[BlockCall], Partials]) -> Callable[[BlockCall], Partials]:
        METRICS[name] = BlockMetric(name, description, compute, finalize)
        return compute
    return decorate


def resolve_metric(name: str) -> str:
    name = METRIC_ALIASES.get(name, name)
    if name not in METRICS:
        known = sorted(set(METRICS) | set(METRIC_ALIASES))
        raise LayerwiseError(f"unknown metric {name!r}; known: {', '.join(known)}")
    return name


def combine(into: Partials, new: Partials) -> None:
    for key, value in new.items():
        if key not in into:
            into[key] = value
        elif key.startswith("max_"):
            into[key] = max(into[key], value)
        else:
            into[key] += value


def _per_token(values: torch.Tensor) -> Partials:
    values = values.double()
    return {"total": values.sum().item(), "count": float(values.numel())}


def _token_norm(x: torch.Tensor) -> torch.Tensor:
    return x.float().norm(dim=-1)


@register_metric(
    "lim",
    "1 - cos(h_in, h_out) per token (Layer-Wise Quantization's LIM; identical to ShortGPT's Block "
    "Influence): how much the block rotates the residual stream, higher = more important",
)
def layer_input_output_distance(call: BlockCall) -> Partials:
    return _per_token(1.0 - call.cos_in_out)


@register_metric(
    "angular_distance",
    "arccos(cos(h_in, h_out)) / pi per token (Gromov et al., 'The Unreasonable Ineffectiveness of "
    "the Deeper Layers'), a metric version of LIM",
)
def angular_distance(call: BlockCall) -> Partials:
    return _per_token(torch.arccos(call.cos_in_out) / math.pi)


@register_metric(
    "rel_update",
    "||h_out - h_in|| / ||h_in|| per token: the block's relative residual update "
    "(Csordas et al., 'Do Language Models Use Their Depth Efficiently?')",
)
def relative_update(call: BlockCall) -> Partials:
    return _relative_to_input(call, call.h_out - call.h_in)


@register_metric("attn_rel_update", "||attention's residual update|| / ||h_in|| per token")
def attention_relative_update(call: BlockCall) -> Partials:
    return _relative_to_input(call, call.attn_delta)


@register_metric("mlp_rel_update", "||MLP's residual update|| / ||h_in|| per token")
def mlp_relative_update(call: BlockCall) -> Partials:
    return _relative_to_input(call, call.mlp_delta)


def _relative_to_input(call: BlockCall, update: torch.Tensor) -> Partials:
    # A token whose input is exactly zero (a zero embedding row, such as a padding token's) has no
    # relative update; it is left out rather than turning the mean into inf or NaN.
    defined = call.h_in_norm > 0
    return _per_token((_token_norm(update) / call.h_in_norm)[defined])


@register_metric("hidden_norm", "||h_out|| per token: growth of the residual stream with depth ('The Curse of Depth')")
def hidden_norm(call: BlockCall) -> Partials:
    return _per_token(call.h_out_norm)


def _kurtosis(partials: Partials) -> float:
    n = partials["count"]
    mean = partials["s1"] / n
    m2 = partials["s2"] / n - mean**2
    m4 = partials["s4"] / n - 4 * mean * partials["s3"] / n + 6 * mean**2 * partials["s2"] / n - 3 * mean**4
    return m4 / m2**2 if m2 > 0 else float("nan")


@register_metric(
    "act_kurtosis",
    "kurtosis of all h_out entries (3 for a Gaussian; large = outlier features, 'Systematic Outliers')",
    finalize=_kurtosis,
)
def activation_kurtosis(call: BlockCall) -> Partials:
    # Powers in float32 (|x| < 1e9 fits), sums accumulated in float64.
    x = call.h_out.float().flatten()
    x2 = x * x
    f64 = torch.float64
    return {"s1": x.sum(dtype=f64).item(), "s2": x2.sum(dtype=f64).item(), "s3": (x2 * x).sum(dtype=f64).item(),
            "s4": (x2 * x2).sum(dtype=f64).item(), "count": float(x.numel())}


def _max_over_median(partials: Partials) -> float:
    return partials["max_abs"] / (partials["median_total"] / partials["batches"])


@register_metric(
    "max_over_median",
    "max |h_out| / median |h_out| (median averaged over batches; Sun et al., 'Massive Activations')",
    finalize=_max_over_median,
)
def max_over_median(call: BlockCall) -> Partials:
    return {"max_abs": call.abs_out.max().item(), "median_total": call.median_abs_out, "batches": 1.0}


@register_metric(
    "massive_activations",
    "count of h_out entries with |x| > 100 and |x| > 1000 x median |x| (Sun et al.'s criterion)",
    finalize=lambda partials: partials["count"],
)
def massive_activations(call: BlockCall) -> Partials:
    threshold = max(100.0, 1000.0 * call.median_abs_out)
    return {"count": float((call.abs_out > threshold).sum().item())}


@register_metric(
    "mlp_sparsity",
    "fraction of MLP hidden activations (input of the down projection) with |a| <= 1% of that "
    "token's largest |a| ('The Lazy Neuron Phenomenon'); exact zeros for ReLU models",
)
def mlp_sparsity(call: BlockCall) -> Partials:
    if call.mlp_hidden is None:  # mixture-of-experts blocks: no one hidden activation per token
        return {"total": 0.0, "count": 0.0}
    magnitude = call.mlp_hidden.float().abs()
    small = magnitude <= 0.01 * magnitude.amax(dim=-1, keepdim=True)
    return {"total": float(small.sum().item()), "count": float(small.numel())}
