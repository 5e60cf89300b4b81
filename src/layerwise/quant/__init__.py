"""Quantizers (pure tensor math) and applying a plan to a model."""
from __future__ import annotations

from layerwise.quant.apply import plan_targets, quantize_
from layerwise.quant.config import QuantConfig
from layerwise.quant.formats import FORMATS, Format, get_format, register_format
from layerwise.quant.gptq import gptq_quantize
from layerwise.quant.qtensor import QTensor, bits_per_weight
from layerwise.quant.rtn import quantize_weight

__all__ = [
    "FORMATS",
    "Format",
    "QTensor",
    "QuantConfig",
    "bits_per_weight",
    "get_format",
    "gptq_quantize",
    "plan_targets",
    "quantize_",
    "quantize_weight",
    "register_format",
]
