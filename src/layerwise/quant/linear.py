"""Quantizing one linear: its stored form under a config, from the weight alone (rounding) or with
statistics of its inputs gathered on calibration text (GPTQ's Hessian, AWQ's sample)."""
from __future__ import annotations

import weakref
from dataclasses import dataclass
from typing import Callable

import numpy as np
import torch
from torch import nn

from layerwise.errors import LayerwiseError
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


def gather_inputs(stats: InputStats, x: torch.Tensor, algorithm: str) -> None:
    """Fold a batch of one linear's inputs into what `algorithm` ("gptq" or "awq") needs of them."""
    x = x.reshape(-1, x.shape[-1]).float()
    if algorithm == "gptq":
        if stats.hessian is None:
            stats.hessian = x.t() @ x
        else:  # summed in place: for a 1536-wide input each [in, in] temporary is 9 MB
            stats.hessian.addmm_(x.t(), x)
    else:
        stats.sample = (stats.sample or []) + [x[torch.randperm(len(x), generator=torch.Generator().manual_seed(
            stats.rows))[: AWQ_SAMPLE_ROWS // 4]].cpu()]
    stats.rows += len(x)


def input_statistics_hooks(model: nn.Module, wanted: dict[str, set[str]]
                           ) -> tuple[dict[tuple[str, str], InputStats], Callable[[list], None]]:
    """Empty input statistics for each (linear, algorithm) of `wanted` (linear name -> "gptq" and
    or "awq"), and the hook registration (for `scoped_hooks`) that fills them on forward passes.
    Linears that are handed the very same input tensor one after another (q/k/v, gate/up) share one
    statistics object per algorithm: gathered once and kept once (for a Llama block, 4 Hessians
    instead of 7), the numbers those linears would each have gathered to the bit."""
    stats = {(name, algorithm): InputStats() for name, algorithms in wanted.items() for algorithm in algorithms}
    last: dict = {"input": None, "name": None}  # the previous hooked linear's input (a weak reference)
    shares: set[tuple[str, str]] = set()  # (linear, algorithm) whose statistics are another's

    def gather(name: str):
        def hook(module, args) -> None:
            x = args[0]
            previous = last["input"]() if last["input"] is not None else None
            owner = last["name"] if previous is x else None
            for algorithm in wanted[name]:
                mine, theirs = stats[name, algorithm], stats.get((owner, algorithm))
                if theirs is mine:
                    continue  # shared since an earlier batch
                if (name, algorithm) in shares:
                    raise LayerwiseError(f"{name} shared its input with the linear before it in an earlier batch, "
                                         "not in this one: its statistics cannot be told apart")
                if theirs is not None and mine.rows == 0:
                    stats[name, algorithm] = theirs  # the same input as the linear before: its sums
                    shares.add((name, algorithm))
                    continue
                gather_inputs(mine, x, algorithm)
            last["input"], last["name"] = weakref.ref(x), name
        return hook

    def register(handles: list) -> None:
        for name in wanted:
            handles.append(model.get_submodule(name).register_forward_pre_hook(gather(name)))

    return stats, register


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
