"""How llama.cpp's CPU backend rounds a linear's inputs before it multiplies them by GGUF weights.

ggml's CPU matrix product never multiplies float activations by quantized weights: it first rounds
each row of activations to the weight type's `vec_dot_type` (ggml-cpu.c, `type_traits_cpu`, in the
llama.cpp that llama-cpp-python 0.3.36 ships): Q8_0 for Q4_0, Q5_0 and Q8_0 weights and Q8_1 for
Q4_1 and Q5_1 (both: blocks of 32, 8-bit codes, an fp16 scale amax/127), Q8_K for every K-quant
(blocks of 256, a float32 scale max/127), F16 for F16 weights. A float model never sees this
noise, and it is not small: with stories260K's linears at Q8_0, `llama-perplexity --kl-divergence`
finds 1.7x the KL of the same weights computed in float (tests/quant/test_activations.py). Q8_K's
blocks of 256 are coarse wherever one input channel is much larger than the rest (the down
projections' inputs), since one step then serves all 256.

`round_inputs` reproduces the rounding; `InputRounding` puts it in front of chosen linears, so
that a quantized model can be measured as llama.cpp's CPU backend computes it.
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Iterable, Iterator, Mapping

import torch
from torch import nn

from layerwise.errors import LayerwiseError

# What the ways of computing a GGUF file do to a linear's inputs: "float" nothing (what a float
# model, transformers' GGUF loading or a dequantizing kernel does), "llama-cpu" llama.cpp's CPU
# backend. (CUDA's quantized kernels round to Q8_1 in blocks of 32 for every type: not emulated.)
EMULATIONS = ("float", "llama-cpu")


@dataclass(frozen=True)
class Rounding:
    """One vec_dot type: `block` inputs share one scale amax/127, kept in fp16 (`fp16_scale`,
    Q8_0/Q8_1) or float32 (Q8_K)."""

    name: str
    block: int
    fp16_scale: bool


Q8_0 = Rounding("Q8_0", 32, True)
Q8_1 = Rounding("Q8_1", 32, True)  # the same values as Q8_0; it also stores the block's sum
Q8_K = Rounding("Q8_K", 256, False)

# GGUF weight type -> the rounding of its inputs on llama.cpp's CPU backend.
LLAMA_CPU: dict[str, Rounding] = {
    "q4_0": Q8_0, "q5_0": Q8_0, "q8_0": Q8_0, "q4_1": Q8_1, "q5_1": Q8_1,
    "q2_k": Q8_K, "q3_k": Q8_K, "q4_k": Q8_K, "q5_k": Q8_K, "q6_k": Q8_K,
}


def check_emulation(name: str) -> str:
    if name not in EMULATIONS:
        raise LayerwiseError(f"unknown emulation {name!r}; choose from {', '.join(EMULATIONS)}")
    return name


def input_rounding(config, columns: int, emulation: str) -> Rounding | None:
    """The rounding llama.cpp applies to the inputs of a linear with `columns` inputs quantized by
    `config` (a QuantConfig; its K-quant fallback applied), or None (float inputs)."""
    if emulation == "float" or config is None or isinstance(config, str):
        return None
    return LLAMA_CPU.get(config.for_columns(columns).format)


def rounded(x: torch.Tensor, rounding: Rounding | None) -> torch.Tensor:
    """`x` rounded as `rounding` says, or `x` itself (None)."""
    return x if rounding is None else round_inputs(x, rounding)


def round_inputs(x: torch.Tensor, rounding: Rounding) -> torch.Tensor:
    """`x` [..., columns] as llama.cpp rounds it (quantize_row_q8_0/q8_1/q8_K of ggml-quants.c):
    per block, codes round(x / d) in -127..127 with d = amax / 127, values codes * d (d in fp16
    for Q8_0/Q8_1). Ties round to even here and away from zero in the C reference; ggml's AVX2
    path rounds to even too."""
    shape = x.shape
    if shape[-1] % rounding.block:
        raise LayerwiseError(f"{rounding.name} rounds rows of a multiple of {rounding.block} values, not {shape[-1]}")
    blocks = x.float().reshape(*shape[:-1], shape[-1] // rounding.block, rounding.block)
    step = blocks.abs().amax(dim=-1, keepdim=True) / 127
    safe = torch.where(step > 0, step, torch.ones_like(step))
    codes = torch.round(blocks / safe).clamp_(-127, 127)
    if rounding.fp16_scale:
        step = step.half().float()
    return (codes * step).reshape(shape).to(x.dtype)


class InputRounding:
    """Forward pre-hooks on `modules` (name -> linear) that round each one's input as set by
    `set(name, config)` (None: left as it is); with emulation "float" nothing is hooked and `set`
    does nothing. A context manager: leaving it removes the hooks."""

    def __init__(self, modules: dict[str, nn.Module], emulation: str = "float"):
        self.emulation = check_emulation(emulation)
        self.modules = modules
        self.current: dict[str, Rounding | None] = {}
        self._handles = []
        if emulation != "float":
            self._handles = [module.register_forward_pre_hook(self._hook(name)) for name, module in modules.items()]

    def _hook(self, name: str):
        def hook(module: nn.Module, args: tuple):
            rounding = self.current.get(name)
            if rounding is None:
                return None
            return (round_inputs(args[0], rounding),) + tuple(args[1:])
        return hook

    def set(self, name: str, config) -> None:
        """Round `name`'s inputs as llama.cpp does for weights quantized by `config` (None or "drop":
        not at all)."""
        if self.emulation == "float":
            return
        self.current[name] = input_rounding(config, self.columns(name), self.emulation)

    def columns(self, name: str) -> int:
        """The inputs of linear `name` (GPT-2's Conv1D keeps its weight as [in, out])."""
        module = self.modules[name]
        return module.in_features if hasattr(module, "in_features") else module.weight.shape[0]

    def clear(self, names: Iterable[str]) -> None:
        for name in names:
            self.current.pop(name, None)

    @contextlib.contextmanager
    def applied(self, configs: Mapping[str, object]) -> Iterator[None]:
        """Modules rounding their inputs as `configs` (name -> config) say for the duration, then not."""
        try:
            for name, config in configs.items():
                self.set(name, config)
            yield
        finally:
            self.clear(configs)

    def close(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles = []
        self.current.clear()

    def __enter__(self) -> "InputRounding":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
