"""Calibration and evaluation text -> token batches."""
from __future__ import annotations

from layerwise.data.windows import DEFAULT_CALIBRATION, TokenWindows, bos_policy, read_text, token_windows

__all__ = ["DEFAULT_CALIBRATION", "TokenWindows", "bos_policy", "read_text", "token_windows"]
