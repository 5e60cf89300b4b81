"""Round to nearest: every group fitted and rounded independently."""
from __future__ import annotations

import numpy as np
import torch

from layerwise.quant.config import QuantConfig
from layerwise.quant.formats import get_format
from layerwise.quant.qtensor import QTensor, group_spans, map_groups


def quantize_weight(weight: torch.Tensor, config: QuantConfig, module: str = "weight",
                    importance: np.ndarray | None = None) -> QTensor:
    """Quantize one [out, in] matrix by rounding to the nearest grid point of its group. GGUF types
    take `importance` (one weight per input column, an importance-matrix row) as llama-quantize
    takes its imatrix; other formats ignore it."""
    weight = weight.detach().float()
    rows, columns = weight.shape
    group_spans(columns, config, module)
    fmt = get_format(config.format)
    if fmt.packed:
        from layerwise.quant import gguf_blocks

        return QTensor(config, (rows, columns), packed=gguf_blocks.quantize(weight.cpu(), config.format.upper(),
                                                                                importance))

    def fit_and_encode(part: torch.Tensor):
        params = fmt.fit(part, config.bits, config.symmetric)
        return fmt.encode(part, params, config.bits).float(), params

    codes, params = map_groups(weight, config.group_size or columns, fit_and_encode)
    return QTensor(config, (rows, columns), codes=codes.to(_code_dtype(config)), params=params)


def _code_dtype(config: QuantConfig) -> torch.dtype:
    return torch.uint8 if config.format == "fp8" else torch.int16
