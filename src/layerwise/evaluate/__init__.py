"""Measuring how far a changed model is from the original: KL, top-1 agreement."""
from __future__ import annotations

from layerwise.evaluate.divergence import Reference, kl_per_token, top1_agreement

__all__ = ["Reference", "kl_per_token", "top1_agreement"]
