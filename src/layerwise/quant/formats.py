"""Number formats as pure tensor functions, one registry.

A grid format maps a group of weights ([..., g]) to per-group parameters ([..., 1]) with `fit`,
to integer codes with `encode`, and back with `decode`. Parameters are rounded to the precision
they are stored in (fp16 scales, e8m0 exponents) inside `fit`, so that what is evaluated is what
would be stored, and `param_bits` counts them. GGUF block types are packed formats: their codes
and scales live in llama.cpp's byte layout (quant/gguf_blocks.py).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch

from layerwise.errors import LayerwiseError

Params = dict[str, torch.Tensor]


@dataclass(frozen=True)
class Format:
    name: str
    description: str
    fit: Callable[[torch.Tensor, int, bool], Params] | None
    encode: Callable[[torch.Tensor, Params, int], torch.Tensor] | None
    decode: Callable[[torch.Tensor, Params, int], torch.Tensor] | None
    # Stored bits per group for scales, zero points or exponents, given the code width.
    param_bits: Callable[[int, bool], int] | None
    allowed_bits: tuple[int, ...] = ()
    fixed_bits: int | None = None
    fixed_group_size: int | None = None
    packed: bool = False  # GGUF: bytes in llama.cpp's layout instead of codes + params
    supports_error_feedback: bool = True  # usable with GPTQ / AWQ
    # Whether the grid is shifted by a zero point or a stored minimum: "never", "always" (GGUF
    # Q4_1, Q5_1 and the K-quants with a min) or "optional" (chosen by QuantConfig.symmetric).
    asymmetric: str = "never"
    # How the fitted "scale" is stored: "float16", or "e8m0" (a power of two as its exponent byte).
    scale_storage: str = "float16"


FORMATS: dict[str, Format] = {}


def register_format(fmt: Format) -> Format:
    FORMATS[fmt.name] = fmt
    return fmt


def get_format(name: str) -> Format:
    _register_gguf_types()
    if name not in FORMATS:
        raise LayerwiseError(f"unknown format {name!r}; known: {', '.join(sorted(FORMATS))}")
    return FORMATS[name]


def registered_formats() -> dict[str, Format]:
    """Every format, the GGUF types included."""
    _register_gguf_types()
    return FORMATS


def _fp16(x: torch.Tensor) -> torch.Tensor:
    """Round to what an fp16 field stores."""
    return x.to(torch.float16).to(torch.float32)


def _safe(scale: torch.Tensor) -> torch.Tensor:
    return torch.where(scale == 0, torch.ones_like(scale), scale)


# --- integers -------------------------------------------------------------------------------

def _int_fit(w: torch.Tensor, bits: int, symmetric: bool) -> Params:
    if symmetric:
        # llama.cpp's Q4_0 rule: the entry of largest magnitude maps to the most negative code, so
        # all 2^bits levels are used (absmax / (2^(b-1) - 1) would waste one, which hurts at 2-3 bits).
        index = w.abs().argmax(dim=-1, keepdim=True)
        extreme = w.gather(-1, index)
        return {"scale": _fp16(extreme / -(2 ** (bits - 1)))}
    # The grid always contains zero, as GPTQ's and llm-compressor's min/max observers make it: the
    # range is [min(min, 0), max(max, 0)], so the zero point lies in [0, 2^b - 1]. Without this a
    # group of one sign, e.g. [0.9, 1.0], would need a zero point outside the codes, and clamping
    # it would shift every decoded value (1.0 came back as 0.1 at 4 bits).
    low = w.amin(dim=-1, keepdim=True).clamp(max=0)
    high = w.amax(dim=-1, keepdim=True).clamp(min=0)
    scale = _fp16((high - low) / (2**bits - 1))
    zero = torch.clamp(torch.round(low.abs() / _safe(scale)), max=2**bits - 1)  # |low| = -low, never -0.0
    return {"scale": scale, "zero": zero}


def _int_encode(w: torch.Tensor, params: Params, bits: int) -> torch.Tensor:
    scale = _safe(params["scale"])
    if "zero" in params:
        return torch.clamp(torch.round(w / scale) + params["zero"], 0, 2**bits - 1).to(torch.int16)
    return torch.clamp(torch.round(w / scale), -(2 ** (bits - 1)), 2 ** (bits - 1) - 1).to(torch.int16)


def _int_decode(codes: torch.Tensor, params: Params, bits: int) -> torch.Tensor:
    if "zero" in params:
        return (codes.float() - params["zero"]) * params["scale"]
    return codes.float() * params["scale"]


register_format(Format(
    "int", "integers of 2..8 bits: symmetric (fp16 scale) or asymmetric (fp16 scale + integer zero point)",
    fit=_int_fit, encode=_int_encode, decode=_int_decode,
    param_bits=lambda bits, symmetric: 16 if symmetric else 16 + bits,
    allowed_bits=(2, 3, 4, 5, 6, 7, 8), asymmetric="optional",
))


# --- codebooks: NF4, FP4 (E2M1), MXFP4 ------------------------------------------------------

# QLoRA's NormalFloat4: quantiles of a standard normal, scaled to [-1, 1], with an exact zero.
NF4_VALUES = torch.tensor([
    -1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453, -0.28444138169288635,
    -0.18477343022823334, -0.09105003625154495, 0.0, 0.07958029955625534, 0.16093020141124725,
    0.24611230194568634, 0.33791524171829224, 0.44070982933044434, 0.5626170039176941,
    0.7229568362236023, 1.0,
])
_E2M1_MAGNITUDES = [0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0]
# The 15 distinct E2M1 values (+0 and -0 coincide), sorted.
FP4_VALUES = torch.tensor(sorted({sign * m for m in _E2M1_MAGNITUDES for sign in (1.0, -1.0)}))


def _nearest(values: torch.Tensor, table: torch.Tensor) -> torch.Tensor:
    """Index of the nearest entry of a sorted table (ties go to the larger entry)."""
    midpoints = (table[1:] + table[:-1]) / 2
    return torch.bucketize(values.contiguous(), midpoints.to(values.device), right=True).to(torch.int16)


def _codebook_format(name: str, table: torch.Tensor, description: str) -> Format:
    top = table.abs().max().item()

    def fit(w: torch.Tensor, bits: int, symmetric: bool) -> Params:
        return {"scale": _fp16(w.abs().amax(dim=-1, keepdim=True) / top)}

    def encode(w: torch.Tensor, params: Params, bits: int) -> torch.Tensor:
        return _nearest(w / _safe(params["scale"]), table)

    def decode(codes: torch.Tensor, params: Params, bits: int) -> torch.Tensor:
        return table.to(codes.device)[codes.long()] * params["scale"]

    return Format(name, description, fit, encode, decode, param_bits=lambda bits, symmetric: 16, fixed_bits=4)


register_format(_codebook_format("nf4", NF4_VALUES, "NormalFloat4 (QLoRA) with an fp16 absmax scale per group"))
register_format(_codebook_format("fp4", FP4_VALUES, "FP4 E2M1 with an fp16 scale per group (absmax -> 6)"))


def _mx_fit(w: torch.Tensor, bits: int, symmetric: bool) -> Params:
    # OCP Microscaling: shared scale 2^(floor(log2(absmax)) - emax), emax = 2 for E2M1, stored as an
    # 8-bit exponent (E8M0). Entries above 6 x scale saturate to +-6, as the spec prescribes.
    absmax = w.abs().amax(dim=-1, keepdim=True)
    exponent = torch.floor(torch.log2(torch.where(absmax > 0, absmax, torch.ones_like(absmax)))) - 2
    return {"scale": torch.exp2(exponent.clamp(-127, 127))}


register_format(Format(
    "mxfp4", "OCP MXFP4: E2M1 values, one power-of-two (E8M0) scale per 32 weights",
    fit=_mx_fit,
    encode=lambda w, params, bits: _nearest((w / params["scale"]).clamp(-6, 6), FP4_VALUES),
    decode=lambda codes, params, bits: FP4_VALUES.to(codes.device)[codes.long()] * params["scale"],
    param_bits=lambda bits, symmetric: 8, fixed_bits=4, fixed_group_size=32, scale_storage="e8m0",
))


# --- FP8 E4M3 ---------------------------------------------------------------------------------

_E4M3_MAX = 448.0


def _fp8_fit(w: torch.Tensor, bits: int, symmetric: bool) -> Params:
    return {"scale": _fp16(w.abs().amax(dim=-1, keepdim=True) / _E4M3_MAX)}


def _fp8_encode(w: torch.Tensor, params: Params, bits: int) -> torch.Tensor:
    scaled = (w / _safe(params["scale"])).clamp(-_E4M3_MAX, _E4M3_MAX)
    return scaled.to(torch.float8_e4m3fn).view(torch.uint8)


register_format(Format(
    "fp8", "FP8 E4M3 (round to nearest even) with an fp16 scale per group or per row",
    fit=_fp8_fit, encode=_fp8_encode,
    decode=lambda codes, params, bits: codes.view(torch.float8_e4m3fn).float() * params["scale"],
    param_bits=lambda bits, symmetric: 16, fixed_bits=8,
))


# --- GGUF block types -------------------------------------------------------------------------

def _register_gguf_types() -> None:
    """GGUF types come from quant/gguf_blocks.py; registered on first use to keep imports light."""
    if "q8_0" in FORMATS:
        return
    try:
        from layerwise.quant import gguf_blocks
    except ImportError:
        return
    for qtype in gguf_blocks.GGUF_TYPES:
        register_format(Format(
            qtype.lower(), f"llama.cpp GGUF {qtype}: blocks of {gguf_blocks.block_size(qtype)}, "
            f"{gguf_blocks.bits_per_weight(qtype):g} bits per weight with its scales",
            fit=None, encode=None, decode=None, param_bits=None,
            fixed_bits=int(gguf_blocks.bits_per_weight(qtype)), fixed_group_size=gguf_blocks.block_size(qtype),
            packed=True, supports_error_feedback=False,
            asymmetric="always" if qtype in gguf_blocks.ASYMMETRIC_TYPES else "never",
        ))
