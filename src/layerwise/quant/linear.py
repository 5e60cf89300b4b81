"""Quantizing one linear: its stored form under a config, from the weight alone (rounding) or with
statistics of its inputs gathered on calibration text (GPTQ's Hessian, AWQ's sample)."""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from layerwise.models.layout import linear_weight
from layerwise.quant.awq import awq_quantize
from layerwise.quant.config import QuantConfig
from layerwise.quant.gptq import gptq_quantize
from layerwise.quant.qtensor import QTensor
from layerwise.quant.rtn import quantize_weight

# Rows of inputs kept per linear for AWQ's scale search: enough for a stable error estimate.
AWQ_SAMPLE_ROWS = 4096


@dataclass
class InputStats:
    """What GPTQ (Hessian) and AWQ (input sample) need from one linear's inputs."""

    hessian: torch.Tensor | None = None
    rows: int = 0
    sample: list | None = None


def gather_inputs(stats: InputStats, x: torch.Tensor, config: QuantConfig) -> None:
    x = x.reshape(-1, x.shape[-1]).float()
    if config.algorithm == "gptq":
        product = x.t() @ x
        stats.hessian = product if stats.hessian is None else stats.hessian + product
    else:
        stats.sample = (stats.sample or []) + [x[torch.randperm(len(x), generator=torch.Generator().manual_seed(
            stats.rows))[: AWQ_SAMPLE_ROWS // 4]].cpu()]
    stats.rows += len(x)


def quantize_linear(name: str, module: nn.Module, config: QuantConfig, stats: InputStats | None,
                    importance: np.ndarray | None = None) -> QTensor:
    """The stored form of one linear's weight under `config`; the module is left unchanged.
    GPTQ and AWQ need `stats` gathered from the module's inputs (`gather_inputs`); GGUF types
    rounded to nearest take the module's `importance` (`layerwise.quant.imatrix`)."""
    weight = linear_weight(module).detach().float()
    if config.algorithm == "gptq":
        qtensor = gptq_quantize(weight, 2 * stats.hessian / stats.rows, config, module=name)
    elif config.algorithm == "awq":
        sample = torch.cat(stats.sample)[:AWQ_SAMPLE_ROWS].to(weight.device)
        qtensor = awq_quantize(weight, sample, config, module=name)
    else:
        qtensor = quantize_weight(weight, config, name, importance)
    return qtensor
