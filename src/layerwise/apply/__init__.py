"""Applying a plan to a model: quantizing (and dropping) what it names, in place and block by
block (`quantize`), the quantized checkpoint on disk (`storage`), and the quantize command (`run`).
"""
from __future__ import annotations

from layerwise.util.lazy import lazy_attributes

_LAZY = {
    "plan_targets": "layerwise.apply.quantize",
    "quantize_": "layerwise.apply.quantize",
    "save_quantized": "layerwise.apply.storage",
    "load_quantized": "layerwise.apply.storage",
    "run_quantize": "layerwise.apply.run",
}

__all__ = list(_LAZY)
__getattr__ = lazy_attributes("layerwise.apply", _LAZY, globals())
