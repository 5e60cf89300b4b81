"""Writing what real engines load: GGUF with a type per tensor, compressed-tensors, plain Hugging
Face folders. Each format is an exporter in `EXPORTERS` (`layerwise list exporters`)."""
from __future__ import annotations

# Registered on import, listed in this order.
from layerwise.export.gguf import write_gguf  # noqa: I001
from layerwise.export.compressed import write_compressed_tensors
from layerwise.export.plain import write_plain
from layerwise.export.registry import EXPORTERS, ExportJob, Exporter, exporter_named, register_exporter

__all__ = ["EXPORTERS", "ExportJob", "Exporter", "exporter_named", "register_exporter", "write_compressed_tensors",
           "write_gguf", "write_plain"]
