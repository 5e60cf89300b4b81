"""Per-layer statistics from one calibration pass with scoped hooks."""
from __future__ import annotations

from layerwise.profile.metrics import METRIC_ALIASES, METRICS, register_metric, resolve_metric
from layerwise.profile.result import ProfileResult
from layerwise.profile.runner import profile_model, run_profile
from layerwise.profile.weights import WEIGHT_METRICS, register_weight_metric

__all__ = [
    "METRICS",
    "METRIC_ALIASES",
    "WEIGHT_METRICS",
    "ProfileResult",
    "profile_model",
    "register_metric",
    "register_weight_metric",
    "resolve_metric",
    "run_profile",
]
