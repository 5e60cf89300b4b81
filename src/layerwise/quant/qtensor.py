"""A quantized weight matrix: what is stored (codes + parameters, or GGUF bytes) and its size."""
from __future__ import annotations

import math
from dataclasses import dataclass, replace

import numpy as np
import torch

from layerwise.errors import LayerwiseError
from layerwise.quant.config import QuantConfig
from layerwise.quant.formats import Params, get_format


@dataclass
class QTensor:
    """Always in [out_features, in_features] orientation; groups run along the input dimension."""

    config: QuantConfig
    shape: tuple[int, int]
    codes: torch.Tensor | None = None  # [rows, cols] integers (grid formats)
    params: Params | None = None  # each [rows, n_groups]
    packed: np.ndarray | None = None  # [rows, row_bytes] (GGUF types)
    # Per-input-channel factors the weights were multiplied by before rounding (AWQ); decoding
    # divides them out. Engines fold them into the previous norm; here they are stored and counted.
    channel_scale: torch.Tensor | None = None

    def dequantize(self) -> torch.Tensor:
        fmt = get_format(self.config.format)
        if fmt.packed:
            from layerwise.quant import gguf_blocks

            values = gguf_blocks.dequantize(self.packed, self.config.format.upper(), self.shape)
        else:
            # Formats decode codes as quantizers write them (int16); compacted ones are widened back.
            written = torch.int16 if self._compacted else self.codes.dtype
            values = map_groups(self.codes.float(), self.group_width,
                                lambda part, params: fmt.decode(part.to(written), params, self.config.bits),
                                self.params)
        if self.channel_scale is not None:
            values = values / self.channel_scale
        return values

    def compact(self) -> "QTensor":
        """The same weights with their codes in one byte where they fit (quantizers write int16
        codes for any width): half the memory for a quantized model held while it is used."""
        codes = self.codes
        if codes is None or codes.dtype != torch.int16 or codes.numel() == 0:
            return self
        low, high = int(codes.min()), int(codes.max())
        for narrow in (torch.int8, torch.uint8):
            if torch.iinfo(narrow).min <= low and high <= torch.iinfo(narrow).max:
                return replace(self, codes=codes.to(narrow))
        return self

    @property
    def _compacted(self) -> bool:
        return self.codes.dtype in (torch.int8, torch.uint8) and self.config.format != "fp8"

    @property
    def group_width(self) -> int:
        return self.config.group_size or self.shape[1]

    @property
    def n_bits(self) -> int:
        """Every stored bit: codes, scales, zero points, exponents, AWQ channel scales."""
        return storage_bits(self.config, self.shape)


def group_spans(columns: int, config: QuantConfig, module: str = "weight") -> tuple[int, int]:
    """(full groups, tail width) for a row of `columns`; an error unless the config allows a tail."""
    width = config.group_size or columns
    full, tail = divmod(columns, width)
    if tail and (config.remainder != "tail" or get_format(config.format).packed):
        hint = "" if get_format(config.format).packed else " (or set remainder='tail' for a shorter last group)"
        raise LayerwiseError(
            f"{module}: {config.label} needs rows that are a multiple of {width}, but it has {columns} "
            f"input columns; choose a group size that divides {columns}{hint}"
        )
    return full, tail


def storage_bits(config: QuantConfig, shape: tuple[int, int]) -> int:
    """Bits stored for an [out, in] weight under `config`: the one count that both a plan's
    predicted size (from the config) and a quantized QTensor's `n_bits` use."""
    rows, columns = shape
    fmt = get_format(config.format)
    if fmt.packed:
        from layerwise.quant import gguf_blocks

        weight_bits = 8 * rows * gguf_blocks.row_bytes(config.format.upper(), columns)
    else:
        full, tail = group_spans(columns, config)
        groups = full + (tail > 0)
        weight_bits = rows * (columns * config.bits + groups * fmt.param_bits(config.bits, config.symmetric))
    # AWQ also stores one fp16 factor per input column (QTensor.channel_scale).
    return weight_bits + (16 * columns if config.algorithm == "awq" else 0)


def map_groups(w: torch.Tensor, width: int, fn, params: Params | None = None):
    """Apply `fn(part [rows, n, g], params [rows, n, 1])` to full groups and the tail, reassemble
    [rows, cols]. With params=None, `fn` returns (values, params) and both are reassembled."""
    rows, columns = w.shape
    full = (columns // width) * width
    pieces = [(w[:, :full].reshape(rows, -1, width), 0, full // width)] if full else []
    if full < columns:
        pieces.append((w[:, full:].reshape(rows, 1, columns - full), full // width, full // width + 1))
    outputs, fitted = [], []
    for part, first, last in pieces:
        if params is None:
            values, part_params = fn(part)
            fitted.append(part_params)
        else:
            values = fn(part, {k: v[:, first:last, None] for k, v in params.items()})
        outputs.append(values.reshape(rows, -1))
    result = torch.cat(outputs, dim=1)
    if params is not None:
        return result
    merged = {k: torch.cat([p[k].squeeze(-1) for p in fitted], dim=1) for k in fitted[0]}
    return result, merged


def bits_per_weight(qtensors: dict[str, QTensor]) -> float:
    weights = sum(math.prod(q.shape) for q in qtensors.values())
    return sum(q.n_bits for q in qtensors.values()) / weights if weights else float("nan")
