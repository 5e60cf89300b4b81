"""Measuring how far a changed model is from the original: perplexity, KL, top-1 agreement."""
from __future__ import annotations

from layerwise.engine.divergence import Reference, kl_per_token, top1_agreement
from layerwise.evaluate.quality import BaseOutputs, Quality, base_outputs, evaluate

__all__ = ["BaseOutputs", "Quality", "Reference", "base_outputs", "evaluate", "kl_per_token", "top1_agreement"]
