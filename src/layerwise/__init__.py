"""layerwise: find out which layers of a transformer LM matter, and compress it layer by layer.

The names below are imported on first use, so that torch-free parts (the report, the
allocators) can be imported without loading torch.
"""
from __future__ import annotations

__version__ = "0.1.0"

from layerwise.errors import LayerwiseError
from layerwise.util.lazy import lazy_attributes

_LAZY = {
    "Adapter": "layerwise.models",
    "LoadedModel": "layerwise.models",
    "get_adapter": "layerwise.models",
    "load_model": "layerwise.models",
    "token_windows": "layerwise.data",
    "ProfileResult": "layerwise.profile",
    "profile_model": "layerwise.profile",
    "run_profile": "layerwise.profile",
    "Plan": "layerwise.plan",
    "run_plan": "layerwise.measure",
    "quantize_": "layerwise.apply",
    "run_quantize": "layerwise.apply",
}

__all__ = ["__version__", "LayerwiseError", *_LAZY]
__getattr__ = lazy_attributes("layerwise", _LAZY, globals())
