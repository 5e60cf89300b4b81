"""The Plan type: which quantizer applies to which module (numbers in, plan out; no torch.nn)."""
from __future__ import annotations

from layerwise.plan.plan import Plan

__all__ = ["Plan"]
