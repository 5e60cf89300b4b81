"""Quantizers: pure tensor math, one linear at a time (`layerwise.apply` applies a plan to a model).

Names are imported on first use: `layerwise.quant.config` (what a plan stores) must stay
importable without torch, for the torch-free report and allocators.
"""
from __future__ import annotations

from layerwise.util.lazy import lazy_attributes

_LAZY = {
    "QuantConfig": "layerwise.quant.config",
    "FORMATS": "layerwise.quant.formats",
    "Format": "layerwise.quant.formats",
    "get_format": "layerwise.quant.formats",
    "register_format": "layerwise.quant.formats",
    "gptq_quantize": "layerwise.quant.gptq",
    "InputStats": "layerwise.quant.linear",
    "quantize_linear": "layerwise.quant.linear",
    "QTensor": "layerwise.quant.qtensor",
    "bits_per_weight": "layerwise.quant.qtensor",
    "quantize_weight": "layerwise.quant.rtn",
}

__all__ = list(_LAZY)
__getattr__ = lazy_attributes("layerwise.quant", _LAZY, globals())
