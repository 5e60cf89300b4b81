"""The export formats, registered by name like quantizer formats and allocators: each says what it
writes (one file or a folder), whether it can be written from a model streamed from disk, what it
refuses before any quantization work, and how it writes a quantized model."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Callable

from layerwise.errors import LayerwiseError

if TYPE_CHECKING:
    from layerwise.models.loading import LoadedModel, ModelSource
    from layerwise.plan.plan import Plan
    from layerwise.quant.config import QuantConfig
    from layerwise.quant.qtensor import QTensor


@dataclass
class ExportJob:
    """Everything an exporter may need: the quantized model, the stored form of every quantized
    module, the modules the plan drops, the plan, where the model came from, and the output path."""

    loaded: LoadedModel
    stored: dict[str, QTensor]
    dropped: list[str]
    plan: Plan
    source: ModelSource
    out: Path
    converter: str | Path | None = None  # --converter, or what `prepare` found from it (GGUF: llama.cpp's)


@dataclass(frozen=True)
class Exporter:
    name: str
    description: str
    write: Callable[[ExportJob], dict]  # writes job.out; returns what was written (path, bytes, ...)
    folder: bool  # writes a folder (else one file)
    streams: bool = False  # can be written from a model streamed from disk
    # Before any quantization work: (module -> config) of the plan, raising on what the format cannot hold.
    check_targets: Callable[[dict[str, QuantConfig]], None] | None = None
    # Before any quantization work: (source, --converter) -> the converter the write will use, or None.
    prepare: Callable[[ModelSource, str | Path | None], Path | None] | None = None


EXPORTERS: dict[str, Exporter] = {}


def register_exporter(name: str, *, description: str, folder: bool, streams: bool = False,
                      check_targets: Callable | None = None, prepare: Callable | None = None
                      ) -> Callable[[Callable[[ExportJob], dict]], Callable[[ExportJob], dict]]:
    """Register `write(job) -> report` as the exporter `name` (see `Exporter` for the rest)."""
    def decorate(write: Callable[[ExportJob], dict]) -> Callable[[ExportJob], dict]:
        EXPORTERS[name] = Exporter(name, description, write, folder, streams, check_targets, prepare)
        return write
    return decorate


def exporter_named(name: str) -> Exporter:
    """The exporter registered as `name`; an unknown name is refused with the registered ones."""
    if name not in EXPORTERS:
        raise LayerwiseError(f"unknown export format {name!r}; choose from {', '.join(EXPORTERS)}")
    return EXPORTERS[name]
