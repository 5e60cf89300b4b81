"""layerwise: find out which layers of a transformer LM matter, and compress it layer by layer.

The names below are imported on first use, so that torch-free parts (the report, the
allocators) can be imported without loading torch.
"""
from __future__ import annotations

import importlib

__version__ = "0.1.0"

from layerwise.errors import LayerwiseError

_LAZY = {
    "Adapter": "layerwise.models",
    "LoadedModel": "layerwise.models",
    "get_adapter": "layerwise.models",
    "load_model": "layerwise.models",
    "token_windows": "layerwise.data",
    "ProfileResult": "layerwise.profile",
    "profile_model": "layerwise.profile",
    "run_profile": "layerwise.profile",
}

__all__ = ["__version__", "LayerwiseError", *_LAZY]


def __getattr__(name: str):
    if name in _LAZY:
        value = getattr(importlib.import_module(_LAZY[name]), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'layerwise' has no attribute {name!r}")
