"""llama.cpp's GGUF block formats for weight matrices: float rows to the exact bytes llama.cpp writes, and back.

Why this exists: gguf-py (0.19) can quantize only the 32-weight formats and has just a
dequantizer for the K-quants, yet the K-quants are what `llama-quantize` writes for the usual
Q4_K_M-style recipes. To measure or simulate those formats layer by layer we need llama.cpp's
own codes, not an approximation of them, so the quantizers here are faithful ports of
`quantize_row_*_ref` (and, with `importance`, `quantize_row_*_impl`) from
ggml/src/ggml-quants.c (read at llama.cpp commit 01243c58): same search grids, same rounding
(`nearest_int`), same float32 evaluation order, same fp16 rounding of the super-block scales.

Rows are quantized independently along the last dimension, in blocks of 32 (Q8_0, Q4_0, Q4_1,
Q5_0, Q5_1) or 256 (the K-quants) weights. Everything is vectorised over blocks with numpy in
float32; only loops that are sequential in C (running float sums, whose rounding decides which
candidate scale wins, and the per-element refinement passes) stay Python loops, and they loop
over the 16/32 weights of a block, never over blocks.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import numpy as np
import torch
from gguf.constants import GGML_QUANT_SIZES, GGMLQuantizationType

from layerwise.errors import LayerwiseError

__all__ = [
    "ASYMMETRIC_TYPES",
    "GGUF_TYPES",
    "bits_per_weight",
    "block_size",
    "bytes_per_block",
    "code_grid",
    "dequantize",
    "quantize",
    "row_bytes",
    "with_codes",
]

GGUF_TYPES: tuple[str, ...] = ("Q8_0", "Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q2_K", "Q3_K", "Q4_K", "Q5_K", "Q6_K")
# Types whose blocks store a minimum beside the scale (`m` or `dmin`): value = scale * code - min.
ASYMMETRIC_TYPES: tuple[str, ...] = ("Q4_1", "Q5_1", "Q2_K", "Q4_K", "Q5_K")

_F32 = np.float32
QK_K = 256  # weights per K-quant super-block (ggml-common.h)
GROUP_MAX_EPS = _F32(1e-15)  # ggml-quants.c: a group whose |max| is below this is stored as all zero
# Weights per quantization call: bounds the float32 temporaries (~10x the chunk) for huge matrices.
_CHUNK_WEIGHTS = 1 << 20


# --------------------------------------------------------------------------------------------
# Sizes
# --------------------------------------------------------------------------------------------

def _gguf_type(qtype: str) -> GGMLQuantizationType:
    name = str(qtype).upper()
    if name not in GGUF_TYPES:
        raise LayerwiseError(f"unknown GGUF block type {qtype!r}; supported: {', '.join(GGUF_TYPES)}")
    return GGMLQuantizationType[name]


def block_size(qtype: str) -> int:
    """Weights per block: 32 for the legacy formats, 256 for the K-quant super-blocks."""
    return GGML_QUANT_SIZES[_gguf_type(qtype)][0]


def bytes_per_block(qtype: str) -> int:
    """Bytes one block occupies in a GGUF file (scales included)."""
    return GGML_QUANT_SIZES[_gguf_type(qtype)][1]


def bits_per_weight(qtype: str) -> float:
    """Storage cost including the block scales, e.g. Q4_0 = 4.5, Q6_K = 6.5625."""
    return 8.0 * bytes_per_block(qtype) / block_size(qtype)


def _check_row_length(qtype: str, n_columns: int) -> None:
    bs = block_size(qtype)
    if n_columns <= 0 or n_columns % bs != 0:
        raise LayerwiseError(
            f"{str(qtype).upper()} quantizes rows in blocks of {bs} weights, but the rows here have "
            f"{n_columns} weights ({n_columns} is not a multiple of {bs})"
        )


def row_bytes(qtype: str, n_columns: int) -> int:
    """Bytes of one packed row of `n_columns` weights; the row must be a whole number of blocks."""
    _check_row_length(qtype, n_columns)
    return n_columns // block_size(qtype) * bytes_per_block(qtype)


# --------------------------------------------------------------------------------------------
# Bit-exact scalar helpers
# --------------------------------------------------------------------------------------------

_MAGIC = _F32(12582912.0)  # 1.5 * 2**23, from ggml-quants.c nearest_int()


def _nearest_int(v: np.ndarray) -> np.ndarray:
    """llama.cpp's nearest_int(): adds 1.5*2^23 and reads the mantissa bits.

    Rounds half to even like rint() inside |v| < 2^22, and reproduces C's bit pattern (not a
    clamp) outside it, which a few degenerate search steps do reach.
    """
    bits = (np.asarray(v, dtype=_F32) + _MAGIC).view(np.int32)
    return (bits & np.int32(0x007FFFFF)) - np.int32(0x00400000)


def _seq_sum(a: np.ndarray) -> np.ndarray:
    """Float32 sum over axis 0 in C loop order (`float s = 0; s += a[i]`).

    numpy's own sum is pairwise, and a last-bit difference flips llama.cpp's `err < best` choices.
    """
    acc = a[0] + _F32(0.0)  # 0 + x, as in C: turns -0.0 into +0.0
    for i in range(1, a.shape[0]):
        acc += a[i]
    return acc


def _fp16(v: np.ndarray) -> np.ndarray:
    """GGML_FP32_TO_FP16 (round to nearest even), as the 2 little-endian bytes per value."""
    return np.ascontiguousarray(np.asarray(v, dtype=_F32).astype(np.float16)).view(np.uint8)


def _fp16_round(v: np.ndarray) -> np.ndarray:
    """GGML_FP16_TO_FP32(GGML_FP32_TO_FP16(v)): what the file will hold for a scale."""
    return np.asarray(v, dtype=_F32).astype(np.float16).astype(_F32)


def _as_uint8(v: np.ndarray) -> np.ndarray:
    """C's store of an int into a uint8_t field (keeps the low byte)."""
    return (np.asarray(v) & 0xFF).astype(np.uint8)


def _as_int8(v: np.ndarray) -> np.ndarray:
    """C's store of an int into an int8_t (two's complement wrap on gcc/clang)."""
    return (((np.asarray(v).astype(np.int32) + 128) & 0xFF) - 128).astype(np.int32)


def _positive_or_zero(v: np.ndarray) -> np.ndarray:
    """C's `float m = 0; if (v > m) m = v;`: +0.0 (never -0.0) unless v is positive."""
    return np.where(v > 0, v, _F32(0.0))


def _first_absmax(x: np.ndarray) -> np.ndarray:
    """Per column of x [n, S]: the signed value with the largest |x|, first one on ties.

    This is C's `if (fabsf(x[i]) > amax) { amax = fabsf(x[i]); max = x[i]; }` starting from 0.
    """
    idx = np.argmax(np.abs(x), axis=0)
    return np.take_along_axis(x, idx[None, :], axis=0)[0]


def _subblocks(blocks: np.ndarray, n: int) -> np.ndarray:
    """[B, bs] blocks -> [n, B*bs/n] sub-blocks, element index first (contiguous rows for _seq_sum)."""
    return np.ascontiguousarray(blocks.reshape(-1, n).T)


def _unsub(a: np.ndarray, n_blocks: int) -> np.ndarray:
    """Inverse of _subblocks for per-weight arrays: [n, S] -> [B, bs]."""
    return np.ascontiguousarray(a.T).reshape(n_blocks, -1)


# --------------------------------------------------------------------------------------------
# llama.cpp's per-group searches, vectorised over groups (columns of x: [n, S])
# --------------------------------------------------------------------------------------------

def _make_qx_quants(x: np.ndarray, nmax: int, qw: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """make_qx_quants(n, nmax, x, L, rmse_type=1, qw): symmetric scale by weighted least squares.

    Tries iscale = -(nmax + 0.1*is)/max for is = -9..9 and keeps the one with the best
    weighted fit; weights are qw, or x^2 when qw is None. Returns (scale [S], L [n, S] in 0..2*nmax-1).
    """
    mx = _first_absmax(x)
    zero = np.abs(mx) < GROUP_MAX_EPS
    safe_max = np.where(zero, _F32(1.0), mx)
    w = x * x if qw is None else qw
    wx = w * x
    fnmax = _F32(nmax)

    def levels(iscale: np.ndarray) -> np.ndarray:
        return np.clip(_nearest_int(iscale * x), -nmax, nmax - 1)

    def sums(l: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        lf = l.astype(_F32)
        return _seq_sum(wx * lf), _seq_sum((w * lf) * lf)  # C: w*x[i]*l and w*l*l

    L = levels(_F32(-nmax) / safe_max)
    sumlx, suml2 = sums(L)
    scale = np.where(suml2 != 0, sumlx / np.where(suml2 != 0, suml2, _F32(1.0)), _F32(0.0))
    best = scale * sumlx
    for step in range(-9, 10):  # ggml-quants.c: for (int is = -9; is <= 9; ++is), skipping 0
        if step == 0:
            continue
        iscale = -(fnmax + _F32(0.1) * _F32(step)) / safe_max
        l = levels(iscale)
        slx, sl2 = sums(l)
        better = (sl2 > 0) & (slx * slx > best * sl2)
        L = np.where(better[None, :], l, L)
        scale = np.where(better, slx / np.where(better, sl2, _F32(1.0)), scale)
        best = np.where(better, scale * slx, best)
    scale = np.where(zero, _F32(0.0), scale)
    L = np.where(zero[None, :], 0, L + nmax)
    return scale, L


def _make_q3_quants(x: np.ndarray, nmax: int) -> tuple[np.ndarray, np.ndarray]:
    """make_q3_quants(n, nmax, x, L, do_rmse=true): Q3_K's sub-block scale.

    Starts from iscale = -nmax/max, then up to 5 passes that move one weight at a time to the
    level that most improves the x^2-weighted least-squares fit. A group whose pass changes
    nothing would change nothing on later passes either, so running all groups for the same
    number of passes equals C's per-group early exit.
    """
    mx = _first_absmax(x)
    zero = np.abs(mx) < GROUP_MAX_EPS
    safe_max = np.where(zero, _F32(1.0), mx)
    L = np.clip(_nearest_int((_F32(-nmax) / safe_max) * x), -nmax, nmax - 1)
    w = x * x
    wx = w * x
    lf = L.astype(_F32)
    sumlx = _seq_sum(wx * lf)
    suml2 = _seq_sum((w * lf) * lf)
    with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
        for _ in range(5):
            changed = np.zeros(x.shape[1], dtype=bool)
            for i in range(x.shape[0]):
                li = L[i].astype(_F32)
                slx = sumlx - wx[i] * li
                sl2 = suml2 - (w[i] * li) * li
                new_l = np.clip(_nearest_int((x[i] * sl2) / slx), -nmax, nmax - 1)
                nl = new_l.astype(_F32)
                slx_new = slx + wx[i] * nl
                sl2_new = sl2 + (w[i] * nl) * nl
                accept = (
                    (slx > 0)
                    & (new_l != L[i])
                    & (sl2_new > 0)
                    & ((slx_new * slx_new) * suml2 > (sumlx * sumlx) * sl2_new)
                )
                L[i] = np.where(accept, new_l, L[i])
                sumlx = np.where(accept, slx_new, sumlx)
                suml2 = np.where(accept, sl2_new, suml2)
                changed |= accept
            if not changed.any():
                break
    scale = np.where(suml2 > 0, sumlx / np.where(suml2 > 0, suml2, _F32(1.0)), _F32(0.0))
    scale = np.where(zero, _F32(0.0), scale)
    L = np.where(zero[None, :], 0, L + nmax)
    return scale, L


def _make_qkx_quants(
    x: np.ndarray,
    weights: np.ndarray,
    nmax: int,
    rmin: float,
    rdelta: float,
    nstep: int,
    use_mad: bool,
    version: int = 2,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """make_qkx2_quants (version=2) / make_qkx3_quants (version=3): asymmetric scale and min.

    Returns (scale [S], the_min [S] (>= 0, subtracted on dequantization), L [n, S] in 0..nmax).
    Each step re-fits (scale, min) by weighted least squares from levels found with
    iscale = (rmin + rdelta*is + nmax)/(max - min); the current best `min` feeds the next
    step, so the steps stay a sequential loop (vectorised over groups).
    """
    # C keeps the first minimum/maximum (`if (x[i] < min)`); argmin/argmax do too, so even the
    # sign of a zero matches: Q4_1/Q5_1 with importance store -the_min as `m`, and the sign of
    # max - min decides +-inf in a degenerate step.
    mn = np.take_along_axis(x, np.argmin(x, axis=0)[None, :], axis=0)[0]
    mx = np.take_along_axis(x, np.argmax(x, axis=0)[None, :], axis=0)[0]
    sum_w = weights[0].copy()
    sum_x = sum_w * x[0]
    for i in range(1, x.shape[0]):
        sum_w += weights[i]
        sum_x += weights[i] * x[i]
    mn = np.where(mn > 0, _F32(0.0), mn)
    flat = (mx == mn) if version == 2 else (mx <= mn)
    fnmax = _F32(nmax)

    def error(scale: np.ndarray, the_min: np.ndarray, L: np.ndarray) -> np.ndarray:
        diff = (scale * L.astype(_F32) + the_min) - x
        diff = np.abs(diff) if use_mad else diff * diff
        return _seq_sum(weights * diff)

    with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
        span = np.where(flat, _F32(1.0), mx - mn)
        iscale = fnmax / span
        scale = _F32(1.0) / iscale
        L = np.clip(_nearest_int(iscale * (x - mn)), 0, nmax)
        best = error(scale, mn, L)
        for step in range(nstep + 1):
            iscale = (_F32(rmin) + _F32(rdelta) * _F32(step) + fnmax) / (mx - mn)
            v = iscale * (x - mn)
            if version == 2:
                l = np.clip(_nearest_int(v), 0, nmax)
            else:  # make_qkx3_quants: v > 0 ? nearest_int(MIN(v, nmax)) : 0
                l = np.where(v > 0, _nearest_int(np.where(v < fnmax, v, fnmax)), 0)
            lf = l.astype(_F32)
            wl = weights * lf
            sum_l = _seq_sum(wl)
            sum_l2 = _seq_sum(wl * lf)
            sum_xl = _seq_sum(wl * x)
            D = sum_w * sum_l2 - sum_l * sum_l
            this_scale = (sum_w * sum_xl - sum_x * sum_l) / D
            this_min = (sum_l2 * sum_x - sum_l * sum_xl) / D
            pos_min = this_min > 0
            this_min = np.where(pos_min, _F32(0.0), this_min)
            this_scale = np.where(pos_min, sum_xl / sum_l2, this_scale)
            cur = error(this_scale, this_min, l)
            better = (D > 0) & (cur < best) & ~flat
            L = np.where(better[None, :], l, L)
            best = np.where(better, cur, best)
            scale = np.where(better, this_scale, scale)
            mn = np.where(better, this_min, mn)
    scale = np.where(flat, _F32(0.0), scale)
    L = np.where(flat[None, :], 0, L)
    return scale, -mn, L


def _make_qp_quants(x: np.ndarray, nmax: int, qw: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """make_qp_quants(n, nmax, x, L, quant_weights): positive-only scale for the scales/mins
    of a super-block when an importance matrix is used (quantize_row_q{2,4,5}_K_impl).

    Returns (scale [S], L [n, S] as the uint8 values C stores).
    """
    mx = np.maximum(x.max(axis=0), _F32(0.0))
    zero = mx < GROUP_MAX_EPS
    safe_max = np.where(zero, _F32(1.0), mx)
    fnmax = _F32(nmax)

    def mse(scale: np.ndarray, l: np.ndarray) -> np.ndarray:
        diff = x - scale * l.astype(_F32)
        return _seq_sum((qw * diff) * diff)

    with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
        iscale = fnmax / safe_max
        L = _as_uint8(_nearest_int(iscale * x)).astype(np.int32)
        best = mse(_F32(1.0) / iscale, L)
        for step in range(-4, 5):  # ggml-quants.c: for (int is = -4; is <= 4; ++is), skipping 0
            if step == 0:
                continue
            iscale_is = (_F32(0.1) * _F32(step) + fnmax) / safe_max
            l = np.minimum(nmax, _nearest_int(iscale_is * x))
            cur = mse(_F32(1.0) / iscale_is, l)
            better = cur < best
            best = np.where(better, cur, best)
            iscale = np.where(better, iscale_is, iscale)
        l = np.minimum(nmax, _nearest_int(iscale * x))
        L = _as_uint8(l).astype(np.int32)
        lf = l.astype(_F32)
        sumlx = _seq_sum((qw * x) * lf)
        suml2 = _seq_sum((qw * lf) * lf)
        wx = qw * x
        for _ in range(5):
            changed = np.zeros(x.shape[1], dtype=bool)
            for i in range(x.shape[0]):
                li = L[i].astype(_F32)
                slx = sumlx - wx[i] * li
                sl2 = suml2 - (qw[i] * li) * li
                new_l = np.minimum(nmax, _nearest_int((x[i] * sl2) / slx))
                nl = new_l.astype(_F32)
                slx_new = slx + wx[i] * nl
                sl2_new = sl2 + (qw[i] * nl) * nl
                accept = (
                    (slx > 0)
                    & (sl2 > 0)
                    & (new_l != L[i])
                    & ((slx_new * slx_new) * suml2 > (sumlx * sumlx) * sl2_new)
                )
                L[i] = np.where(accept, _as_uint8(new_l).astype(np.int32), L[i])
                sumlx = np.where(accept, slx_new, sumlx)
                suml2 = np.where(accept, sl2_new, suml2)
                changed |= accept
            if not changed.any():
                break
        scale = np.where(suml2 > 0, sumlx / suml2, _F32(0.0))
    scale = np.where(zero, _F32(0.0), scale)
    L = np.where(zero[None, :], 0, L)
    return scale, L


# --------------------------------------------------------------------------------------------
# 32-weight formats. Without importance these mirror gguf-py's numpy reference operation for
# operation (it is bit-exact with llama.cpp's quantize_row_*_ref: truncation after +0.5/+8.5/
# +16.5, round-half-away for Q8_0, scales rounded to fp16 only when stored).
# --------------------------------------------------------------------------------------------

def _first_equal(blocks: np.ndarray, extreme: np.ndarray) -> np.ndarray:
    """[n, 1]: each block's first value equal to `extreme` -- what C's running `if (v < min) min = v`
    keeps. It differs from numpy's min/max only in the sign of a zero (a block of +0 and -0), which
    is stored (fp16 0x0000 vs 0x8000), so llama-quantize's bytes depend on it."""
    first = (blocks == extreme[:, None]).argmax(axis=-1)
    return np.take_along_axis(blocks, first[:, None], axis=-1)


def _inverse(d: np.ndarray) -> np.ndarray:
    with np.errstate(divide="ignore"):
        return np.where(d == 0, _F32(0.0), _F32(1.0) / d)


def _signed_absmax(blocks: np.ndarray) -> np.ndarray:
    imax = np.abs(blocks).argmax(axis=-1)[:, None]
    return np.take_along_axis(blocks, imax, axis=-1)


def _pack_nibbles_32(q: np.ndarray) -> np.ndarray:
    """[B, 32] codes -> 16 bytes: weight j in the low nibble, weight j+16 in the high nibble."""
    return (q[:, :16] & np.uint8(0x0F)) | (q[:, 16:] << np.uint8(4))


def _high_bits_32(q: np.ndarray) -> np.ndarray:
    """Bit 4 of each of the 32 codes as a little-endian uint32 (Q5_0/Q5_1 `qh`)."""
    return np.packbits((q >> np.uint8(4)) & np.uint8(1), axis=-1, bitorder="little")


def _row_sigma2(x_rows: np.ndarray) -> np.ndarray:
    """quantize_row_q{4,5}_{0,1}_impl: sum over the whole row of x^2 / n_per_row, in C order."""
    return _seq_sum(np.ascontiguousarray((x_rows * x_rows).T)) / _F32(x_rows.shape[1])


def _imatrix_weights_32(x_rows: np.ndarray, importance: np.ndarray) -> np.ndarray:
    """weight[j] = qw[j] * sqrtf(sigma2 + x[j]^2) per 32-block, as [32, B] sub-block columns."""
    sigma2 = _row_sigma2(x_rows)[:, None]
    w = importance[None, :] * np.sqrt(sigma2 + x_rows * x_rows)
    return _subblocks(w, 32)


def _q8_0(blocks: np.ndarray, x_rows: np.ndarray, importance: np.ndarray | None) -> np.ndarray:
    # quantize_q8_0 ignores quant_weights in llama.cpp too.
    d = np.abs(blocks).max(axis=1, keepdims=True) / _F32(127)
    scaled = blocks * _inverse(d)
    a = np.abs(scaled)  # roundf(): half away from zero, as gguf-py's np_roundf
    floored = np.floor(a)
    qs = np.sign(scaled) * (floored + np.floor(_F32(2) * (a - floored)))
    return np.concatenate([_fp16(d), qs.astype(np.int8).view(np.uint8)], axis=1)


def _q4_0(blocks: np.ndarray, x_rows: np.ndarray, importance: np.ndarray | None) -> np.ndarray:
    if importance is not None:  # quantize_row_q4_0_impl: make_qx_quants(32, 8, ...), no requantization
        d, L = _make_qx_quants(_subblocks(blocks, 32), 8, _imatrix_weights_32(x_rows, importance))
        return np.concatenate([_fp16(d[:, None]), _pack_nibbles_32(_unsub(L, len(blocks)).astype(np.uint8))], axis=1)
    d = _signed_absmax(blocks) / _F32(-8)
    q = np.trunc(blocks * _inverse(d) + _F32(8.5)).astype(np.uint8).clip(0, 15)
    return np.concatenate([_fp16(d), _pack_nibbles_32(q)], axis=1)


def _q4_1(blocks: np.ndarray, x_rows: np.ndarray, importance: np.ndarray | None) -> np.ndarray:
    if importance is not None:  # quantize_row_q4_1_impl: make_qkx3_quants(32, 15, ..., -0.9, 0.05, 36)
        w = _imatrix_weights_32(x_rows, importance)
        d, the_min, L = _make_qkx_quants(_subblocks(blocks, 32), w, 15, -0.9, 0.05, 36, False, version=3)
        q = _unsub(L, len(blocks)).astype(np.uint8)
        return np.concatenate([_fp16(d[:, None]), _fp16(-the_min[:, None]), _pack_nibbles_32(q)], axis=1)
    mx, mn = _first_equal(blocks, blocks.max(axis=-1)), _first_equal(blocks, blocks.min(axis=-1))
    d = (mx - mn) / _F32(15)
    q = np.trunc((blocks - mn) * _inverse(d) + _F32(0.5)).astype(np.uint8).clip(0, 15)
    return np.concatenate([_fp16(d), _fp16(mn), _pack_nibbles_32(q)], axis=1)


def _q5_0(blocks: np.ndarray, x_rows: np.ndarray, importance: np.ndarray | None) -> np.ndarray:
    if importance is not None:  # quantize_row_q5_0_impl: make_qx_quants(32, 16, ...)
        d, L = _make_qx_quants(_subblocks(blocks, 32), 16, _imatrix_weights_32(x_rows, importance))
        q = _unsub(L, len(blocks)).astype(np.uint8)
        return np.concatenate([_fp16(d[:, None]), _high_bits_32(q), _pack_nibbles_32(q)], axis=1)
    d = _signed_absmax(blocks) / _F32(-16)
    q = np.trunc(blocks * _inverse(d) + _F32(16.5)).astype(np.uint8).clip(0, 31)
    return np.concatenate([_fp16(d), _high_bits_32(q), _pack_nibbles_32(q)], axis=1)


def _q5_1(blocks: np.ndarray, x_rows: np.ndarray, importance: np.ndarray | None) -> np.ndarray:
    if importance is not None:  # quantize_row_q5_1_impl: make_qkx3_quants(32, 31, ..., -0.9, 0.05, 36)
        w = _imatrix_weights_32(x_rows, importance)
        d, the_min, L = _make_qkx_quants(_subblocks(blocks, 32), w, 31, -0.9, 0.05, 36, False, version=3)
        q = _unsub(L, len(blocks)).astype(np.uint8)
        return np.concatenate(
            [_fp16(d[:, None]), _fp16(-the_min[:, None]), _high_bits_32(q), _pack_nibbles_32(q)], axis=1
        )
    mx, mn = _first_equal(blocks, blocks.max(axis=-1)), _first_equal(blocks, blocks.min(axis=-1))
    d = (mx - mn) / _F32(31)
    q = np.trunc((blocks - mn) * _inverse(d) + _F32(0.5)).astype(np.uint8).clip(0, 31)
    return np.concatenate([_fp16(d), _fp16(mn), _high_bits_32(q), _pack_nibbles_32(q)], axis=1)


# --------------------------------------------------------------------------------------------
# K-quants (256-weight super-blocks)
# --------------------------------------------------------------------------------------------

def _pack_q4_k_codes(L: np.ndarray) -> np.ndarray:
    Lr = L.astype(np.uint8).reshape(len(L), 4, 2, 32)  # per 64 weights: l | (l+32) << 4
    return (Lr[:, :, 0] | (Lr[:, :, 1] << 4)).reshape(len(L), 128)


def _pack_q5_k_codes(L: np.ndarray) -> np.ndarray:
    """qh [B, 32] then qs [B, 128]."""
    Lr = L.astype(np.uint8).reshape(len(L), 4, 2, 32)
    qs = ((Lr[:, :, 0] & 0xF) | ((Lr[:, :, 1] & 0xF) << 4)).reshape(len(L), 128)
    qh = np.zeros((len(L), 32), dtype=np.uint8)
    for c in range(4):  # quantize_row_q5_K_ref: masks m1 = 1 << 2c, m2 = 2 << 2c
        qh |= (Lr[:, c, 0] >> 4) << np.uint8(2 * c)
        qh |= (Lr[:, c, 1] >> 4) << np.uint8(2 * c + 1)
    return np.concatenate([qh, qs], axis=1)


def _pack_q6_k_codes(L: np.ndarray) -> np.ndarray:
    """ql [B, 128] then qh [B, 64] of codes 0..63."""
    B = len(L)
    Lr = L.astype(np.uint8).reshape(B, 2, 4, 32)  # [half, quarter, l]
    lo = Lr & np.uint8(0x0F)
    ql = np.concatenate([lo[:, :, 0] | (lo[:, :, 2] << 4), lo[:, :, 1] | (lo[:, :, 3] << 4)], axis=2)
    hi = Lr >> np.uint8(4)
    qh = hi[:, :, 0] | (hi[:, :, 1] << 2) | (hi[:, :, 2] << 4) | (hi[:, :, 3] << 6)
    return np.concatenate([ql.reshape(B, 128), qh.reshape(B, 64)], axis=1)


def _pack_q3_k_codes(L: np.ndarray) -> np.ndarray:
    """hmask [B, 32] then qs [B, 64] of codes 0..7."""
    B = len(L)
    high = L > 3
    hmask = np.zeros((B, 32), dtype=np.uint8)
    hr = high.reshape(B, 8, 32)
    for b in range(8):  # bit b of hmask[m] is weight 32*b + m
        hmask |= hr[:, b].astype(np.uint8) << np.uint8(b)
    return np.concatenate([hmask, _pack_2bit(np.where(high, L - 4, L))], axis=1)


def _pack_2bit(L: np.ndarray) -> np.ndarray:
    """Q2_K/Q3_K `qs`: per 128 weights, byte l holds weights l, l+32, l+64, l+96 (2 bits each)."""
    Lr = L.astype(np.uint8).reshape(len(L), 2, 4, 32)
    return (Lr[:, :, 0] | (Lr[:, :, 1] << 2) | (Lr[:, :, 2] << 4) | (Lr[:, :, 3] << 6)).reshape(len(L), 64)


def _superblock_sumx2(blocks: np.ndarray) -> np.ndarray:
    """`for (j < QK_K) sumx2 += x[j]*x[j]` per super-block, in C order."""
    return _seq_sum(np.ascontiguousarray((blocks * blocks).T))


def _per_block(importance: np.ndarray, n_blocks: int) -> np.ndarray:
    """The [cols] importance as [n_blocks, QK_K], matching blocks = rows.reshape(-1, QK_K)."""
    q = importance.reshape(-1, QK_K)
    return np.tile(q, (n_blocks // len(q), 1))


def _requantize(x: np.ndarray, d: np.ndarray, lo: int, hi: int, keep: np.ndarray,
                dm: np.ndarray | None = None) -> np.ndarray:
    """Final codes from the stored (fp16-rounded) scales: nearest_int((x + dm)/d) clamped.

    Groups whose d is 0 keep the codes of the search (`if (!d) continue;` in llama.cpp).
    x, keep: [n, S]; d, dm: [S].
    """
    num = x if dm is None else x + dm
    with np.errstate(divide="ignore", invalid="ignore"):
        l = np.clip(_nearest_int(num / d), lo, hi)
    return np.where(d != 0, l, keep)


def _q2_k(blocks: np.ndarray, x_rows: np.ndarray, importance: np.ndarray | None) -> np.ndarray:
    B = len(blocks)
    xs = _subblocks(blocks, 16)
    if importance is None:
        # quantize_row_q2_K_ref: make_qkx2_quants(16, 3, x, |x|, ..., -0.5, 0.1, 15, use_mad=true)
        scales, mins, L = _make_qkx_quants(xs, np.abs(xs), 3, -0.5, 0.1, 15, True)
        scales, mins = scales.reshape(B, 16), mins.reshape(B, 16)
        q4scale = _F32(15)
        max_scale = _positive_or_zero(scales.max(axis=1))
        max_min = _positive_or_zero(mins.max(axis=1))
        with np.errstate(divide="ignore", invalid="ignore"):
            ls = _nearest_int((q4scale / max_scale)[:, None] * scales)
            lm = _nearest_int((q4scale / max_min)[:, None] * mins)
        sc = np.where((max_scale > 0)[:, None], ls & 0xFF, 0)
        sc = np.where((max_min > 0)[:, None], (sc | (lm << 4)) & 0xFF, sc)
        d_raw = np.where(max_scale > 0, max_scale / q4scale, _F32(0.0))
        m_raw = np.where(max_min > 0, max_min / q4scale, _F32(0.0))
    else:
        # quantize_row_q2_K_impl: imatrix weights, make_qkx3_quants, then make_qp_quants on the scales
        sigma2 = _superblock_sumx2(blocks) / _F32(QK_K)
        w = _subblocks(_per_block(importance, B) * np.sqrt(sigma2[:, None] + blocks * blocks), 16)
        sw = _seq_sum(w)
        scales, mins, L = _make_qkx_quants(xs, w, 3, -0.9, 0.05, 36, False, version=3)
        sw_t = _subblocks(sw.reshape(B, 16), 16)
        d_raw, Ls = _make_qp_quants(_subblocks(scales.reshape(B, 16), 16), 15, sw_t)
        m_raw, Lm = _make_qp_quants(_subblocks(mins.reshape(B, 16), 16), 15, sw_t)
        sc = (_unsub(Ls, B) | (_unsub(Lm, B) << 4)) & 0xFF
    d, dmin = _fp16(d_raw[:, None]), _fp16(m_raw[:, None])
    sc_flat = sc.reshape(-1)  # sub-block order, as xs's columns
    d_sub = np.repeat(_fp16_round(d_raw), 16) * (sc_flat & 0xF).astype(_F32)
    m_sub = np.repeat(_fp16_round(m_raw), 16) * (sc_flat >> 4).astype(_F32)
    L = _requantize(xs, d_sub, 0, 3, L, m_sub)
    qs = _pack_2bit(_unsub(L, B))
    return np.concatenate([sc.astype(np.uint8), qs, d, dmin], axis=1)


def _pack_q3_scales(l6: np.ndarray) -> np.ndarray:
    """16 six-bit scales [B, 16] -> Q3_K's 12 bytes: low nibbles of j and j+8 share byte j,
    the 2 high bits of scale j go to byte 8 + j%4 at bit 2*(j/4)."""
    low = (l6[:, :8] & 0xF) | ((l6[:, 8:] & 0xF) << 4)
    high = np.zeros((len(l6), 4), dtype=np.int32)
    for g in range(4):
        high |= (l6[:, 4 * g:4 * g + 4] >> 4) << (2 * g)
    return _as_uint8(np.concatenate([low, high], axis=1))


def _q3_k(blocks: np.ndarray, x_rows: np.ndarray, importance: np.ndarray | None) -> np.ndarray:
    B = len(blocks)
    xs = _subblocks(blocks, 16)
    if importance is None:
        # quantize_row_q3_K_ref: make_q3_quants(16, 4, x, L, true) per 16 weights
        scales, L = _make_q3_quants(xs, 4)
        scales = scales.reshape(B, 16)
        max_scale = _first_absmax(np.ascontiguousarray(scales.T))
        nonzero = max_scale != 0
        with np.errstate(divide="ignore", invalid="ignore"):
            iscale = _F32(-32) / max_scale
            l = _as_int8(_nearest_int(iscale[:, None] * scales))
            d_raw = np.where(nonzero, _F32(1.0) / iscale, _F32(0.0))
        l6 = np.where(nonzero[:, None], np.clip(l, -32, 31) + 32, 0)
    else:
        # quantize_row_q3_K_impl: make_qx_quants(16, 4, x, L, 1, weight), then make_qx_quants(16, 32) on scales
        sigma2 = _F32(2) * _superblock_sumx2(blocks) / _F32(QK_K)
        w = _subblocks(_per_block(importance, B) * np.sqrt(sigma2[:, None] + blocks * blocks), 16)
        sw = _seq_sum(w)
        scales, L = _make_qx_quants(xs, 4, w)
        d_raw, l6 = _make_qx_quants(_subblocks(scales.reshape(B, 16), 16), 32, _subblocks(sw.reshape(B, 16), 16))
        l6 = _unsub(l6, B)
    packed_scales = _pack_q3_scales(l6)
    d = _fp16(d_raw[:, None])
    sc = (l6 - 32).reshape(-1)  # what get-scale decodes from the 12 bytes
    d_sub = np.repeat(_fp16_round(d_raw), 16) * sc.astype(_F32)
    L = _unsub(_requantize(xs, d_sub, -4, 3, L - 4) + 4, B)
    return np.concatenate([_pack_q3_k_codes(L), packed_scales, d], axis=1)


def _pack_k4_scales(ls: np.ndarray, lm: np.ndarray) -> np.ndarray:
    """Q4_K/Q5_K 12 scale bytes from 8 scales and 8 mins (6 bits each), as quantize_row_q4_K_ref:
    j<4: bytes j and j+4 hold them whole; j>=4: low nibbles in byte j+4, high 2 bits in the top
    of bytes j-4 and j."""
    out = np.zeros((len(ls), 12), dtype=np.int32)
    out[:, 0:4] = ls[:, :4]
    out[:, 4:8] = lm[:, :4]
    out[:, 8:12] = (ls[:, 4:] & 0xF) | ((lm[:, 4:] & 0xF) << 4)
    out[:, 0:4] |= (ls[:, 4:] >> 4) << 6
    out[:, 4:8] |= (lm[:, 4:] >> 4) << 6
    return _as_uint8(out)


def _unpack_k4_scales(s: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """get_scale_min_k4 for all 8 sub-blocks: [B, 12] bytes -> (scales [B, 8], mins [B, 8])."""
    s = s.astype(np.int32)
    sc = np.concatenate([s[:, 0:4] & 63, (s[:, 8:12] & 0xF) | ((s[:, 0:4] >> 6) << 4)], axis=1)
    m = np.concatenate([s[:, 4:8] & 63, (s[:, 8:12] >> 4) | ((s[:, 4:8] >> 6) << 4)], axis=1)
    return sc, m


def _k4_common(blocks: np.ndarray, importance: np.ndarray | None, nmax: int, five_bit: bool
               ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Shared body of Q4_K and Q5_K: returns (d/dmin bytes [B, 4], scale bytes [B, 12], codes [B, 256])."""
    B = len(blocks)
    xs = _subblocks(blocks, 32)
    if importance is None:
        # quantize_row_q{4,5}_K_ref: weights av_x + |x| with av_x = sqrt(mean x^2) of the 32 weights
        av_x = np.sqrt(_seq_sum(xs * xs) / _F32(32))
        w = av_x[None, :] + np.abs(xs)
        if five_bit:
            scales, mins, L = _make_qkx_quants(xs, w, 31, -0.5, 0.1, 15, False)
        else:
            scales, mins, L = _make_qkx_quants(xs, w, 15, -1.0, 0.1, 20, False)
        scales, mins = scales.reshape(B, 8), mins.reshape(B, 8)
        max_scale = _positive_or_zero(scales.max(axis=1))
        max_min = _positive_or_zero(mins.max(axis=1))
        with np.errstate(divide="ignore"):
            inv_scale = np.where(max_scale > 0, _F32(63) / max_scale, _F32(0.0))
            inv_min = np.where(max_min > 0, _F32(63) / max_min, _F32(0.0))
        ls = np.minimum(_nearest_int(inv_scale[:, None] * scales) & 0xFF, 63)
        lm = np.minimum(_nearest_int(inv_min[:, None] * mins) & 0xFF, 63)
        d_raw, m_raw = max_scale / _F32(63), max_min / _F32(63)
    else:
        # quantize_row_q{4,5}_K_impl: imatrix weights, make_qkx3_quants, make_qp_quants on scales/mins
        sigma2 = _F32(2) * _superblock_sumx2(blocks) / _F32(QK_K)
        w = _subblocks(_per_block(importance, B) * np.sqrt(sigma2[:, None] + blocks * blocks), 32)
        sw = _subblocks(_seq_sum(w).reshape(B, 8), 8)
        scales, mins, L = _make_qkx_quants(xs, w, nmax, -0.9, 0.05, 36, False, version=3)
        d_raw, Ls = _make_qp_quants(_subblocks(scales.reshape(B, 8), 8), 63, sw)
        m_raw, Lm = _make_qp_quants(_subblocks(mins.reshape(B, 8), 8), 63, sw)
        ls, lm = _unsub(Ls, B), _unsub(Lm, B)
        if five_bit:  # only the Q5_K impl clamps to 63 (values are <= 63 anyway)
            ls, lm = np.minimum(ls, 63), np.minimum(lm, 63)
    packed = _pack_k4_scales(ls, lm)
    sc, m = _unpack_k4_scales(packed)
    d_sub = np.repeat(_fp16_round(d_raw), 8) * sc.reshape(-1).astype(_F32)
    m_sub = np.repeat(_fp16_round(m_raw), 8) * m.reshape(-1).astype(_F32)
    L = _unsub(_requantize(xs, d_sub, 0, nmax, L, m_sub), B)
    head = np.concatenate([_fp16(d_raw[:, None]), _fp16(m_raw[:, None]), packed], axis=1)
    return head, L


def _q4_k(blocks: np.ndarray, x_rows: np.ndarray, importance: np.ndarray | None) -> np.ndarray:
    head, L = _k4_common(blocks, importance, 15, five_bit=False)
    return np.concatenate([head, _pack_q4_k_codes(L)], axis=1)


def _q5_k(blocks: np.ndarray, x_rows: np.ndarray, importance: np.ndarray | None) -> np.ndarray:
    head, L = _k4_common(blocks, importance, 31, five_bit=True)
    return np.concatenate([head, _pack_q5_k_codes(L)], axis=1)


def _q6_k(blocks: np.ndarray, x_rows: np.ndarray, importance: np.ndarray | None) -> np.ndarray:
    B = len(blocks)
    xs = _subblocks(blocks, 16)
    qw = None
    if importance is not None:  # quantize_row_q6_K_impl passes the raw imatrix as qw (no sigma term)
        qw = _subblocks(_per_block(importance, B), 16)
    # make_qx_quants(16, 32, x, L, 1, qw) per 16 weights
    scales, L = _make_qx_quants(xs, 32, qw)
    scales = scales.reshape(B, 16)
    max_scale = _first_absmax(np.ascontiguousarray(scales.T))
    zero_block = np.abs(max_scale) < GROUP_MAX_EPS
    with np.errstate(divide="ignore", invalid="ignore"):
        iscale = _F32(-128) / np.where(zero_block, _F32(1.0), max_scale)
        d_raw = np.where(zero_block, _F32(0.0), _F32(1.0) / iscale)
    sc = _as_int8(np.minimum(127, _nearest_int(iscale[:, None] * scales)))
    sc = np.where(zero_block[:, None], 0, sc)
    d_sub = np.repeat(_fp16_round(d_raw), 16) * sc.reshape(-1).astype(_F32)
    L = _unsub(_requantize(xs, d_sub, -32, 31, L - 32) + 32, B)
    L = np.where(zero_block[:, None], 0, L).astype(np.uint8)  # an all-zero super-block is all-zero bytes
    return np.concatenate([_pack_q6_k_codes(L), sc.astype(np.int8).view(np.uint8), _fp16(d_raw[:, None])], axis=1)


# --------------------------------------------------------------------------------------------
# Dequantization: mirrors gguf-py's float32 arithmetic (scale * code - min, in that order) so
# the result is identical to gguf.quants.dequantize, which equals llama.cpp's dequantize_row_*.
# --------------------------------------------------------------------------------------------

def _f16_at(b: np.ndarray, start: int) -> np.ndarray:
    return np.ascontiguousarray(b[:, start:start + 2]).view(np.float16).astype(_F32)


def _nibbles_32(qs: np.ndarray) -> np.ndarray:
    return np.concatenate([qs & np.uint8(0x0F), qs >> np.uint8(4)], axis=1)


def _bits_32(qh: np.ndarray) -> np.ndarray:
    return np.unpackbits(qh, axis=1, bitorder="little")


def _dq8_0(b: np.ndarray) -> np.ndarray:
    return b[:, 2:].view(np.int8).astype(_F32) * _f16_at(b, 0)


def _dq4_0(b: np.ndarray) -> np.ndarray:
    return _f16_at(b, 0) * (_nibbles_32(b[:, 2:]).astype(np.int8) - np.int8(8)).astype(_F32)


def _dq4_1(b: np.ndarray) -> np.ndarray:
    return _f16_at(b, 0) * _nibbles_32(b[:, 4:]).astype(_F32) + _f16_at(b, 2)


def _dq5_0(b: np.ndarray) -> np.ndarray:
    q = _nibbles_32(b[:, 6:]) | (_bits_32(b[:, 2:6]) << np.uint8(4))
    return _f16_at(b, 0) * (q.astype(np.int8) - np.int8(16)).astype(_F32)


def _dq5_1(b: np.ndarray) -> np.ndarray:
    q = _nibbles_32(b[:, 8:]) | (_bits_32(b[:, 4:8]) << np.uint8(4))
    return _f16_at(b, 0) * q.astype(_F32) + _f16_at(b, 2)


def _unpack_2bit(qs: np.ndarray) -> np.ndarray:
    """Inverse of _pack_2bit: [B, 64] -> [B, 256] codes 0..3."""
    shifts = np.array([0, 2, 4, 6], dtype=np.uint8).reshape(1, 1, 4, 1)
    return ((qs.reshape(len(qs), 2, 1, 32) >> shifts) & np.uint8(3)).reshape(len(qs), QK_K)


def _dq2_k(b: np.ndarray) -> np.ndarray:
    B = len(b)
    sc = b[:, :16]
    d, dmin = _f16_at(b, 80), _f16_at(b, 82)
    dl = (d * (sc & np.uint8(0xF)).astype(_F32)).reshape(B, 16, 1)
    ml = (dmin * (sc >> np.uint8(4)).astype(_F32)).reshape(B, 16, 1)
    q = _unpack_2bit(b[:, 16:80]).reshape(B, 16, 16).astype(_F32)
    return (dl * q - ml).reshape(B, QK_K)


def _dq3_k(b: np.ndarray) -> np.ndarray:
    B = len(b)
    hmask, qs, s = b[:, :32], b[:, 32:96], b[:, 96:108]
    d = _f16_at(b, 108)
    low = np.concatenate([s[:, :8] & np.uint8(0xF), s[:, :8] >> np.uint8(4)], axis=1)
    high = (s[:, 8:12].reshape(B, 1, 4) >> np.array([0, 2, 4, 6], dtype=np.uint8).reshape(1, 4, 1)) & np.uint8(3)
    scales = (low | (high.reshape(B, 16) << np.uint8(4))).astype(np.int8) - np.int8(32)
    dl = (d * scales.astype(_F32)).reshape(B, 16, 1)
    hbit = (hmask.reshape(B, 1, 32) >> np.arange(8, dtype=np.uint8).reshape(1, 8, 1)) & np.uint8(1)
    ql = _unpack_2bit(qs).astype(np.int8)
    q = ql - ((hbit.reshape(B, QK_K) ^ np.uint8(1)) << np.uint8(2)).astype(np.int8)  # bit clear => -4
    return (dl * q.reshape(B, 16, 16).astype(_F32)).reshape(B, QK_K)


def _dq_k4(b: np.ndarray, qs: np.ndarray, qh: np.ndarray | None) -> np.ndarray:
    B = len(b)
    d, dmin = _f16_at(b, 0), _f16_at(b, 2)
    sc, m = _unpack_k4_scales(b[:, 4:16])
    dd = (d * sc.astype(_F32)).reshape(B, 8, 1)
    dm = (dmin * m.astype(_F32)).reshape(B, 8, 1)
    q = (qs.reshape(B, 4, 1, 32) >> np.array([0, 4], dtype=np.uint8).reshape(1, 1, 2, 1)) & np.uint8(0xF)
    q = q.reshape(B, 8, 32)
    if qh is not None:
        h = (qh.reshape(B, 1, 32) >> np.arange(8, dtype=np.uint8).reshape(1, 8, 1)) & np.uint8(1)
        q = q | (h << np.uint8(4))
    return (dd * q.astype(_F32) - dm).reshape(B, QK_K)


def _dq4_k(b: np.ndarray) -> np.ndarray:
    return _dq_k4(b, b[:, 16:144], None)


def _dq5_k(b: np.ndarray) -> np.ndarray:
    return _dq_k4(b, b[:, 48:176], b[:, 16:48])


def _dq6_k(b: np.ndarray) -> np.ndarray:
    B = len(b)
    ql, qh, sc = b[:, :128], b[:, 128:192], b[:, 192:208]
    d = _f16_at(b, 208)
    dd = (d * sc.view(np.int8).astype(_F32)).reshape(B, 16, 1)
    lo = (ql.reshape(B, 2, 1, 64) >> np.array([0, 4], dtype=np.uint8).reshape(1, 1, 2, 1)) & np.uint8(0xF)
    lo = lo.reshape(B, 2, 4, 32)  # [half, (l, l+32, l+64, l+96) group, l]
    hi = (qh.reshape(B, 2, 1, 32) >> np.array([0, 2, 4, 6], dtype=np.uint8).reshape(1, 1, 4, 1)) & np.uint8(3)
    q = (lo | (hi << np.uint8(4))).astype(np.int8) - np.int8(32)
    return (dd * q.reshape(B, 16, 16).astype(_F32)).reshape(B, QK_K)


# --------------------------------------------------------------------------------------------
# Codes on a fixed grid: every type's value is scale * code + offset, with the scales in the
# block's bytes and the code in a fixed integer range. What error-feedback quantizers (GPTQ) need
# to round one column at a time on grids llama.cpp's own quantizer chose.
# --------------------------------------------------------------------------------------------

def _per(values: np.ndarray, width: int) -> np.ndarray:
    """[B, n] per-sub-block values -> [B, n * width] per weight."""
    return np.repeat(values, width, axis=1)


def _codes_q8_0(b):
    return _per(_f16_at(b, 0), 32), None, b[:, 2:].view(np.int8).astype(np.int32)


def _codes_q4_0(b):
    return _per(_f16_at(b, 0), 32), None, _nibbles_32(b[:, 2:]).astype(np.int32) - 8


def _codes_q4_1(b):
    return _per(_f16_at(b, 0), 32), _per(_f16_at(b, 2), 32), _nibbles_32(b[:, 4:]).astype(np.int32)


def _codes_q5_0(b):
    q = _nibbles_32(b[:, 6:]) | (_bits_32(b[:, 2:6]) << np.uint8(4))
    return _per(_f16_at(b, 0), 32), None, q.astype(np.int32) - 16


def _codes_q5_1(b):
    q = _nibbles_32(b[:, 8:]) | (_bits_32(b[:, 4:8]) << np.uint8(4))
    return _per(_f16_at(b, 0), 32), _per(_f16_at(b, 2), 32), q.astype(np.int32)


def _codes_q2_k(b):
    sc = b[:, :16]
    dl = _f16_at(b, 80) * (sc & np.uint8(0xF)).astype(_F32)
    ml = _f16_at(b, 82) * (sc >> np.uint8(4)).astype(_F32)
    return _per(dl, 16), _per(-ml, 16), _unpack_2bit(b[:, 16:80]).astype(np.int32)


def _codes_q3_k(b):
    B = len(b)
    hmask, s = b[:, :32], b[:, 96:108]
    low = np.concatenate([s[:, :8] & np.uint8(0xF), s[:, :8] >> np.uint8(4)], axis=1)
    high = (s[:, 8:12].reshape(B, 1, 4) >> np.array([0, 2, 4, 6], dtype=np.uint8).reshape(1, 4, 1)) & np.uint8(3)
    scales = (low | (high.reshape(B, 16) << np.uint8(4))).astype(np.int8) - np.int8(32)
    hbit = (hmask.reshape(B, 1, 32) >> np.arange(8, dtype=np.uint8).reshape(1, 8, 1)) & np.uint8(1)
    q = _unpack_2bit(b[:, 32:96]).astype(np.int32) - ((hbit.reshape(B, QK_K) ^ np.uint8(1)).astype(np.int32) << 2)
    return _per(_f16_at(b, 108) * scales.astype(_F32), 16), None, q


def _codes_k4(b, qs, qh):
    B = len(b)
    sc, m = _unpack_k4_scales(b[:, 4:16])
    q = (qs.reshape(B, 4, 1, 32) >> np.array([0, 4], dtype=np.uint8).reshape(1, 1, 2, 1)) & np.uint8(0xF)
    q = q.reshape(B, 8, 32)
    if qh is not None:
        q = q | (((qh.reshape(B, 1, 32) >> np.arange(8, dtype=np.uint8).reshape(1, 8, 1)) & np.uint8(1)) << np.uint8(4))
    return (_per(_f16_at(b, 0) * sc.astype(_F32), 32), _per(-(_f16_at(b, 2) * m.astype(_F32)), 32),
            q.reshape(B, QK_K).astype(np.int32))


def _codes_q6_k(b):
    B = len(b)
    ql, qh = b[:, :128], b[:, 128:192]
    lo = (ql.reshape(B, 2, 1, 64) >> np.array([0, 4], dtype=np.uint8).reshape(1, 1, 2, 1)) & np.uint8(0xF)
    hi = (qh.reshape(B, 2, 1, 32) >> np.array([0, 2, 4, 6], dtype=np.uint8).reshape(1, 1, 4, 1)) & np.uint8(3)
    q = (lo.reshape(B, 2, 4, 32) | (hi << np.uint8(4))).astype(np.int32) - 32
    return _per(_f16_at(b, 208) * b[:, 192:208].view(np.int8).astype(_F32), 16), None, q.reshape(B, QK_K)


def _put(b: np.ndarray, start: int, codes_bytes: np.ndarray) -> np.ndarray:
    out = b.copy()
    out[:, start:start + codes_bytes.shape[1]] = codes_bytes
    return out


# type -> (lowest code, highest code, bytes -> (scale, offset or None, code), (bytes, code) -> bytes)
_CODES: dict[str, tuple[int, int, Callable, Callable]] = {
    "Q8_0": (-128, 127, _codes_q8_0, lambda b, q: _put(b, 2, q.astype(np.int8).view(np.uint8))),
    "Q4_0": (-8, 7, _codes_q4_0, lambda b, q: _put(b, 2, _pack_nibbles_32(q + 8))),
    "Q4_1": (0, 15, _codes_q4_1, lambda b, q: _put(b, 4, _pack_nibbles_32(q))),
    "Q5_0": (-16, 15, _codes_q5_0, lambda b, q: _put(b, 2, np.concatenate(
        [_high_bits_32(q + 16), _pack_nibbles_32(q + 16)], axis=1))),
    "Q5_1": (0, 31, _codes_q5_1, lambda b, q: _put(b, 4, np.concatenate(
        [_high_bits_32(q), _pack_nibbles_32(q)], axis=1))),
    "Q2_K": (0, 3, _codes_q2_k, lambda b, q: _put(b, 16, _pack_2bit(q))),
    "Q3_K": (-4, 3, _codes_q3_k, lambda b, q: _put(b, 0, _pack_q3_k_codes(q + 4))),
    "Q4_K": (0, 15, lambda b: _codes_k4(b, b[:, 16:144], None), lambda b, q: _put(b, 16, _pack_q4_k_codes(q))),
    "Q5_K": (0, 31, lambda b: _codes_k4(b, b[:, 48:176], b[:, 16:48]), lambda b, q: _put(b, 16, _pack_q5_k_codes(q))),
    "Q6_K": (-32, 31, _codes_q6_k, lambda b, q: _put(b, 0, _pack_q6_k_codes(q + 32))),
}


QuantizeFn = Callable[[np.ndarray, np.ndarray, np.ndarray | None], np.ndarray]
DequantizeFn = Callable[[np.ndarray], np.ndarray]

# type name -> (quantize blocks, dequantize blocks)
_FORMATS: dict[str, tuple[QuantizeFn, DequantizeFn]] = {
    "Q8_0": (_q8_0, _dq8_0),
    "Q4_0": (_q4_0, _dq4_0),
    "Q4_1": (_q4_1, _dq4_1),
    "Q5_0": (_q5_0, _dq5_0),
    "Q5_1": (_q5_1, _dq5_1),
    "Q2_K": (_q2_k, _dq2_k),
    "Q3_K": (_q3_k, _dq3_k),
    "Q4_K": (_q4_k, _dq4_k),
    "Q5_K": (_q5_k, _dq5_k),
    "Q6_K": (_q6_k, _dq6_k),
}


# --------------------------------------------------------------------------------------------
# Public API
# --------------------------------------------------------------------------------------------

def _to_numpy_f32(a: np.ndarray | torch.Tensor, what: str) -> np.ndarray:
    if isinstance(a, torch.Tensor):
        a = a.detach().to(device="cpu", dtype=torch.float32).numpy()
    a = np.asarray(a)
    if not (np.issubdtype(a.dtype, np.floating) or np.issubdtype(a.dtype, np.integer)):
        raise LayerwiseError(f"{what} must be a float tensor or array, got dtype {a.dtype}")
    return np.ascontiguousarray(a, dtype=_F32)


def quantize(
    weight: np.ndarray | torch.Tensor,
    qtype: str,
    importance: np.ndarray | torch.Tensor | None = None,
) -> np.ndarray:
    """Pack `weight` [rows, cols] row by row into GGUF `qtype` bytes, laid out as llama.cpp does.

    Returns uint8 [rows, row_bytes(qtype, cols)]. Without `importance` this is llama.cpp's
    reference quantizer (what llama-quantize writes without an imatrix). `importance` [cols]
    (per-column weights, an imatrix row) switches to llama.cpp's imatrix-aware quantizers
    (quantize_row_*_impl); Q8_0 ignores it, as llama.cpp does.
    """
    name = _gguf_type(qtype).name
    x = _to_numpy_f32(weight, "weight")
    if x.ndim == 0:
        raise LayerwiseError("weight must have at least one dimension")
    cols = x.shape[-1]
    _check_row_length(name, cols)
    if not np.isfinite(x).all():
        raise LayerwiseError(f"cannot quantize to {name}: the weight contains NaN or infinite values")
    qw = None
    if importance is not None:
        qw = _to_numpy_f32(importance, "importance").reshape(-1)
        if qw.shape != (cols,):
            raise LayerwiseError(
                f"importance must hold one weight per column ({cols}), got shape {tuple(np.shape(importance))}"
            )
        if not np.isfinite(qw).all() or (qw < 0).any():
            raise LayerwiseError("importance weights must be finite and non-negative")
    lead = x.shape[:-1]
    rows = x.reshape(-1, cols)
    bs, nbytes = block_size(name), bytes_per_block(name)
    out = np.empty((rows.shape[0], cols // bs * nbytes), dtype=np.uint8)
    fn = _FORMATS[name][0]
    step = max(1, _CHUNK_WEIGHTS // cols)
    # Degenerate groups (all zero, subnormal scales) take C's inf/NaN paths on purpose; the
    # results are masked or match llama.cpp's, so numpy's warnings about them are noise.
    with np.errstate(all="ignore"):
        for start in range(0, rows.shape[0], step):
            chunk = rows[start:start + step]
            blocks = chunk.reshape(-1, bs)
            out[start:start + step] = fn(blocks, chunk, qw).reshape(len(chunk), -1)
    return out.reshape(*lead, -1)


def dequantize(packed: np.ndarray | torch.Tensor, qtype: str, shape: tuple[int, ...] | torch.Size) -> torch.Tensor:
    """Unpack GGUF `qtype` bytes into a float32 tensor of `shape` (identical to gguf-py / llama.cpp)."""
    name = _gguf_type(qtype).name
    shape = tuple(int(s) for s in shape)
    if not shape:
        raise LayerwiseError("shape must have at least one dimension")
    cols = shape[-1]
    _check_row_length(name, cols)
    if isinstance(packed, torch.Tensor):
        packed = packed.detach().cpu().numpy()
    b = np.ascontiguousarray(np.asarray(packed)).view(np.uint8)
    n_rows = int(np.prod(shape[:-1], dtype=np.int64))
    expected = n_rows * row_bytes(name, cols)
    if b.size != expected:
        raise LayerwiseError(
            f"{name} data for shape {shape} must be {expected} bytes, got {b.size}"
        )
    blocks = b.reshape(-1, bytes_per_block(name))
    with np.errstate(all="ignore"):  # inf/NaN fp16 scales decode to inf/NaN, as in gguf-py
        values = _FORMATS[name][1](blocks)
    return torch.from_numpy(values.reshape(shape))


@dataclass(frozen=True)
class CodeGrid:
    """Packed blocks seen as value = scale * code + offset per weight ([rows, cols] float32; offset
    0 for the symmetric types), codes in [low, high]. `dequantize` computes exactly this."""

    scale: np.ndarray
    offset: np.ndarray
    code: np.ndarray
    low: int
    high: int

    def round(self, x: np.ndarray, columns: slice) -> tuple[np.ndarray, np.ndarray]:
        """Codes for values `x` [rows, k] of `columns` on this grid, and the values they decode to."""
        scale, offset = self.scale[:, columns], self.offset[:, columns]
        with np.errstate(divide="ignore", invalid="ignore"):
            code = np.where(scale != 0, np.rint((x - offset) / scale), 0)
        code = np.clip(code, self.low, self.high).astype(np.int32)
        return code, scale * code.astype(_F32) + offset


def code_grid(packed: np.ndarray, qtype: str, shape: tuple[int, int]) -> CodeGrid:
    """The grid llama.cpp's scales in `packed` (bytes of `qtype` for a [rows, cols] weight) define."""
    name = _gguf_type(qtype).name
    rows, cols = shape
    if np.asarray(packed).size != rows * row_bytes(name, cols):
        raise LayerwiseError(f"{name} data for shape {tuple(shape)} must be {rows * row_bytes(name, cols)} bytes, "
                             f"got {np.asarray(packed).size}")
    low, high, parts, _ = _CODES[name]
    blocks = np.ascontiguousarray(packed).view(np.uint8).reshape(-1, bytes_per_block(name))
    with np.errstate(all="ignore"):
        scale, offset, code = parts(blocks)
    offset = np.zeros_like(scale) if offset is None else offset
    return CodeGrid(scale.reshape(rows, cols), offset.reshape(rows, cols), code.reshape(rows, cols), low, high)


def with_codes(packed: np.ndarray, qtype: str, codes: np.ndarray) -> np.ndarray:
    """`packed` with every weight's code replaced by `codes` [rows, cols] (scales kept)."""
    name = _gguf_type(qtype).name
    low, high, _, put = _CODES[name]
    if codes.min() < low or codes.max() > high:
        raise LayerwiseError(f"{name} codes must lie in [{low}, {high}]")
    bs = block_size(name)
    blocks = np.ascontiguousarray(packed).view(np.uint8).reshape(-1, bytes_per_block(name))
    return put(blocks, codes.reshape(-1, bs).astype(np.int32)).reshape(packed.shape)
