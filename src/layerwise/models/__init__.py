"""Loading models from any source, and the table of where each architecture keeps its parts."""
from __future__ import annotations

from layerwise.models.adapters import ADAPTERS, Adapter, get_adapter, supported_architectures
from layerwise.models.loading import (
    LoadedModel,
    ModelSource,
    load_config,
    load_model,
    load_tokenizer,
    resolve_source,
    wrap_model,
)

__all__ = [
    "ADAPTERS",
    "Adapter",
    "LoadedModel",
    "ModelSource",
    "get_adapter",
    "load_config",
    "load_model",
    "load_tokenizer",
    "resolve_source",
    "supported_architectures",
    "wrap_model",
]
