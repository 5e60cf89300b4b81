"""Loading models from any source, and the table of where each architecture keeps its parts.

Loading names are imported on first use: the adapter table is plain data that the torch-free
allocators (plan units) read.
"""
from __future__ import annotations

from layerwise.models.adapters import ADAPTERS, Adapter, get_adapter, supported_architectures
from layerwise.util.lazy import lazy_attributes

_LAZY = {name: "layerwise.models.loading" for name in (
    "LoadedModel", "ModelSource", "load_config", "load_model", "load_tokenizer", "resolve_source", "wrap_model")}

__all__ = ["ADAPTERS", "Adapter", "get_adapter", "supported_architectures", *_LAZY]
__getattr__ = lazy_attributes("layerwise.models", _LAZY, globals())
