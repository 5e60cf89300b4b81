"""layerwise: find out which layers of a transformer LM matter, and compress it layer by layer."""
from __future__ import annotations

__version__ = "0.1.0"

from layerwise.errors import LayerwiseError
from layerwise.models import Adapter, LoadedModel, get_adapter, load_model
from layerwise.data import token_windows
from layerwise.profile import ProfileResult, profile_model, run_profile

__all__ = [
    "__version__",
    "Adapter",
    "LayerwiseError",
    "LoadedModel",
    "ProfileResult",
    "get_adapter",
    "load_model",
    "profile_model",
    "run_profile",
    "token_windows",
]
