"""GGUF block formats: bytes identical to llama.cpp / gguf-py, decoding identical to gguf-py, and
round-trip errors within what each format's construction guarantees."""
from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
import pytest
import torch
from gguf import quants as gguf_quants
from gguf.constants import GGMLQuantizationType

from conftest import require_tool
from layerwise.errors import LayerwiseError
from layerwise.quant.gguf_blocks import (
    GGUF_TYPES,
    bits_per_weight,
    block_size,
    bytes_per_block,
    dequantize,
    quantize,
    row_bytes,
)

SIMPLE = ["Q8_0", "Q4_0", "Q4_1", "Q5_0", "Q5_1"]
K_QUANTS = ["Q2_K", "Q3_K", "Q4_K", "Q5_K", "Q6_K"]
FP16_REL = 2.0 ** -11  # half an ulp of fp16, relative: the rounding of a stored scale


def gaussian(rows: int = 64, cols: int = 1024, seed: int = 0) -> np.ndarray:
    """Gaussian weights plus the rows that trip up block quantizers."""
    x = np.random.default_rng(seed).standard_normal((rows, cols)).astype(np.float32)
    x[0, :256] = 0.0  # an all-zero block (and super-block)
    x[1, 40] = 1000.0  # one huge outlier in an otherwise ordinary block
    x[2, :256] = -np.abs(x[2, :256])  # negative-only blocks
    x[3, :256] = np.abs(x[3, :256])  # positive-only blocks
    x[4, :256] = 0.75  # constant blocks
    x[5, :16] = 0.0  # one all-zero 16-weight group inside a K-quant super-block
    return x


def gguf_type(name: str) -> GGMLQuantizationType:
    return GGMLQuantizationType[name]


def blockwise(a: np.ndarray, name: str) -> np.ndarray:
    return a.reshape(-1, block_size(name))


def fp16_at(packed: np.ndarray, name: str, offset: int) -> np.ndarray:
    b = packed.reshape(-1, bytes_per_block(name))
    return np.ascontiguousarray(b[:, offset:offset + 2]).view(np.float16).astype(np.float32)[:, 0]


# --------------------------------------------------------------------------------------------
# Sizes and errors
# --------------------------------------------------------------------------------------------

@pytest.mark.parametrize(
    "name, weights, nbytes, bpw",
    [
        ("Q8_0", 32, 34, 8.5),
        ("Q4_0", 32, 18, 4.5),
        ("Q4_1", 32, 20, 5.0),
        ("Q5_0", 32, 22, 5.5),
        ("Q5_1", 32, 24, 6.0),
        ("Q2_K", 256, 84, 2.625),
        ("Q3_K", 256, 110, 3.4375),
        ("Q4_K", 256, 144, 4.5),
        ("Q5_K", 256, 176, 5.5),
        ("Q6_K", 256, 210, 6.5625),
    ],
)
def test_sizes(name, weights, nbytes, bpw):
    assert block_size(name) == weights
    assert bytes_per_block(name) == nbytes
    assert bits_per_weight(name) == bpw
    assert row_bytes(name, 1536) == 1536 // weights * nbytes
    assert quantize(gaussian(8, 1536), name).shape == (8, row_bytes(name, 1536))


def test_all_types_listed():
    assert GGUF_TYPES == tuple(SIMPLE + K_QUANTS)


@pytest.mark.parametrize("name", K_QUANTS)
def test_k_quants_reject_rows_that_are_not_whole_super_blocks(name):
    # 576 (SmolLM2's hidden size) = 2.25 super-blocks of 256.
    with pytest.raises(LayerwiseError, match=rf"{name}.*blocks of 256.*576"):
        quantize(np.zeros((4, 576), np.float32), name)
    with pytest.raises(LayerwiseError, match="576"):
        row_bytes(name, 576)
    with pytest.raises(LayerwiseError, match="576"):
        dequantize(np.zeros((4, 100), np.uint8), name, (4, 576))


def test_other_bad_inputs_are_clear_errors():
    with pytest.raises(LayerwiseError, match=r"Q4_0.*blocks of 32.*48"):
        quantize(np.zeros((2, 48), np.float32), "Q4_0")
    with pytest.raises(LayerwiseError, match="unknown GGUF block type"):
        quantize(np.zeros((2, 64), np.float32), "Q4_K_M")
    bad = np.zeros((2, 256), np.float32)
    bad[1, 3] = np.nan
    with pytest.raises(LayerwiseError, match="NaN"):
        quantize(bad, "Q4_K")
    with pytest.raises(LayerwiseError, match="one weight per column"):
        quantize(np.zeros((2, 256), np.float32), "Q4_K", importance=np.ones(128, np.float32))
    with pytest.raises(LayerwiseError, match="non-negative"):
        quantize(np.zeros((2, 256), np.float32), "Q4_K", importance=-np.ones(256, np.float32))
    with pytest.raises(LayerwiseError, match="bytes"):
        dequantize(np.zeros((2, 143), np.uint8), "Q4_K", (2, 256))


def test_torch_in_torch_out():
    x = gaussian(8, 512)
    for name in ("Q4_0", "Q4_K"):
        packed = quantize(torch.from_numpy(x), name)
        assert packed.dtype == np.uint8
        assert np.array_equal(packed, quantize(x, name))
        out = dequantize(torch.from_numpy(packed), name, torch.Size([8, 512]))
        assert isinstance(out, torch.Tensor) and out.dtype == torch.float32 and out.shape == (8, 512)


# --------------------------------------------------------------------------------------------
# Bit-exactness
# --------------------------------------------------------------------------------------------

@pytest.mark.parametrize("name", SIMPLE)
@pytest.mark.parametrize("seed", [0, 1])
def test_simple_types_bit_exact_with_gguf_py(name, seed):
    x = gaussian(seed=seed)
    assert np.array_equal(quantize(x, name), gguf_quants.quantize(x, gguf_type(name)))


@pytest.mark.parametrize("name", GGUF_TYPES)
def test_dequantize_identical_to_gguf_py(name):
    x = gaussian()
    packed = quantize(x, name)
    ours = dequantize(packed, name, x.shape)
    assert torch.equal(ours, torch.from_numpy(gguf_quants.dequantize(packed, gguf_type(name))))
    # Arbitrary bytes exercise every code and scale bit, not only those our quantizer emits.
    noise = np.random.default_rng(1).integers(0, 256, size=(16, row_bytes(name, 512)), dtype=np.uint8)
    with np.errstate(all="ignore"):
        theirs = gguf_quants.dequantize(noise, gguf_type(name))
    assert np.array_equal(dequantize(noise, name, (16, 512)).numpy(), theirs, equal_nan=True)


def _uniform(n: int, seed: int) -> np.ndarray:
    """n float32 values in [0, 1) from integer hashing: the same on every platform and numpy version
    (unlike numpy's distribution samplers), so the golden digests below stay valid."""
    state = (np.arange(n, dtype=np.uint64) + np.uint64(seed)) * np.uint64(0x9E3779B97F4A7C15)
    state = state * np.uint64(6364136223846793005) + np.uint64(1442695040888963407)
    state ^= state >> np.uint64(29)
    state = state * np.uint64(0xBF58476D1CE4E5B9)
    return (state >> np.uint64(40)).astype(np.float32) * np.float32(2.0 ** -24)


def golden_input() -> np.ndarray:
    """8x512 weights: near-gaussian, 16-weight groups scaled by powers of two from 1/16 to 8 with
    random signs, some all-zero groups, and the special rows of gaussian()."""
    rows, cols = 8, 512
    u = _uniform(4 * rows * cols, 1).reshape(4, rows, cols)
    x = (u[0] + u[1] + u[2] + u[3] - np.float32(2.0)) * np.float32(1.5)
    k = (_uniform(rows * cols // 16, 2) * np.float32(8)).astype(np.int32)
    mult = np.ldexp(np.float32(1.0), k - 4).astype(np.float32)
    v = _uniform(rows * cols // 16, 3)
    mult[v < 0.3] *= -1
    mult[v < 0.05] = 0
    x = (x.reshape(-1, 16) * mult[:, None]).reshape(rows, cols)
    x[0, :256] = 0
    x[1, 40] = 100.0
    x[2, :256] = -np.abs(x[2, :256])
    x[3, 256:] = 0.25
    x[4, :32] = np.abs(x[4, :32])
    return x


def golden_importance() -> np.ndarray:
    u = _uniform(512, 4)
    imp = (u * np.float32(4)) ** 2
    imp[u < 0.2] = 0  # columns an imatrix never saw
    return imp.astype(np.float32)


# sha256[:16] of the packed golden_input(): without / with golden_importance(). Produced by
# llama.cpp's own C code (ggml-quants.c of llama-cpp-python 0.3.36's llama.cpp: quantize_row_*_ref
# and quantize_row_*_impl, compiled with gcc -O2 -ffp-contract=off); Q8_0 ignores importance.
# Regenerate: python tests/quant/golden/regenerate.py --llama-cpp build/llama.cpp-tools/src
# (test_golden_digests_are_llama_cpp_s does, where the sources are). gguf-py's Q4_1/Q5_1 differ
# from llama.cpp's on one block of golden_input(), of +0 and -0: the sign of its stored minimum.
GOLDEN = {
    "Q8_0": ("096a092c2a93a17c", "096a092c2a93a17c"),
    "Q4_0": ("8f848e5ddd3d7d18", "55e7fea764b3e69f"),
    "Q4_1": ("80abb1d3f5791d1d", "6ba58e1880546967"),
    "Q5_0": ("191e13b98f76991f", "37f713e1d79ceb5e"),
    "Q5_1": ("d04da7e7cba53497", "b676163769b500ec"),
    "Q2_K": ("ee18ab8811dc9879", "55e9c9f8f5149d21"),
    "Q3_K": ("551a1a385589dd86", "c15f3850e0730ef5"),
    "Q4_K": ("c53b44a57257eba7", "5492c172fb850b98"),
    "Q5_K": ("39c667c9103cbd3f", "6bd1c1f9bb0991e6"),
    "Q6_K": ("cb2603f3b64451af", "b1e29b22e778b487"),
}


def digest(packed: np.ndarray) -> str:
    return hashlib.sha256(np.ascontiguousarray(packed).tobytes()).hexdigest()[:16]


@pytest.mark.parametrize("name", GGUF_TYPES)
def test_bytes_match_llama_cpp_reference(name):
    x = golden_input()
    assert digest(quantize(x, name)) == GOLDEN[name][0]
    assert digest(quantize(x, name, importance=golden_importance())) == GOLDEN[name][1]


def test_golden_digests_are_llama_cpp_s(llama_cpp_bin, monkeypatch):
    """The table above is what llama.cpp's C code makes of the golden input today."""
    monkeypatch.syspath_prepend(str(Path(__file__).parent / "golden"))
    from regenerate import golden_digests

    source = require_tool("llama.cpp's ggml sources", (llama_cpp_bin.parent / "src" / "ggml").is_dir() or None,
                          "bash .ci/llama_cpp_tools DIR keeps them in DIR/src")
    assert source and golden_digests(llama_cpp_bin.parent / "src") == GOLDEN


# --------------------------------------------------------------------------------------------
# Round-trip error
# --------------------------------------------------------------------------------------------

@pytest.mark.parametrize("name", SIMPLE)
def test_simple_round_trip_error_bounds(name):
    x = gaussian()
    packed = quantize(x, name)
    err = blockwise(np.abs(x - dequantize(packed, name, x.shape).numpy()), name).max(axis=1)
    xb = blockwise(x, name)
    d = np.abs(fp16_at(packed, name, 0))
    tiny = 1e-6 * np.abs(xb).max(axis=1)  # float32 arithmetic in quantize/dequantize
    if name == "Q8_0":
        # round(x/d) is off by <= d/2; the stored fp16 d is off by <= d*2^-11, times |code| <= 127.
        bound = d / 2 + 127 * d * FP16_REL
    elif name in ("Q4_0", "Q5_0"):
        # Codes -8..7 (-16..15) times d = max/-8 (-16): the max lands exactly on -8d, the rest
        # round to within d/2, except values near -max, which sit above the top code 7d (15d):
        # up to one whole step d. Plus the fp16 rounding of d times the largest |code|.
        n = 8 if name == "Q4_0" else 16
        bound = d + n * d * FP16_REL
    else:
        # min + code*d with d = (max - min)/nmax: every value is within d/2 of a level; the fp16
        # rounding of d (times up to nmax) and of min add their half ulps.
        nmax = 15 if name == "Q4_1" else 31
        bound = d / 2 + nmax * d * FP16_REL + np.abs(fp16_at(packed, name, 2)) * FP16_REL
    assert (err <= bound + tiny).all()


# Which bytes hold the codes, and the byte values that set every code of a block to level 0 / 1
# (so gguf-py's dequantizer, not ours, tells where each weight's grid lies).
_CODE_BYTES = {
    "Q2_K": [(slice(16, 80), 0x00, 0x55)],
    "Q3_K": [(slice(0, 32), 0xFF, 0xFF), (slice(32, 96), 0x00, 0x55)],  # hmask set = no -4 offset
    "Q4_K": [(slice(16, 144), 0x00, 0x11)],
    "Q5_K": [(slice(16, 48), 0x00, 0x00), (slice(48, 176), 0x00, 0x11)],
    "Q6_K": [(slice(0, 128), 0x00, 0x11), (slice(128, 192), 0xAA, 0xAA)],  # high bits 2 = code 32 = 0
}
# Levels relative to level 0: Q2/Q4/Q5_K are min + l*step for l in 0..nmax (asymmetric),
# Q3_K/Q6_K are l*step for l in -4..3 / -32..31 (symmetric).
_LEVELS = {"Q2_K": (0, 3), "Q3_K": (-4, 3), "Q4_K": (0, 15), "Q5_K": (0, 31), "Q6_K": (-32, 31)}


def k_quant_grid(packed: np.ndarray, name: str, shape) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per weight: (step, lowest, highest) representable value of its 16/32-weight group."""
    blocks = packed.reshape(-1, bytes_per_block(name))
    level0, level1 = blocks.copy(), blocks.copy()
    for where, v0, v1 in _CODE_BYTES[name]:
        level0[:, where] = v0
        level1[:, where] = v1
    base = gguf_quants.dequantize(level0, gguf_type(name)).reshape(shape)
    step = gguf_quants.dequantize(level1, gguf_type(name)).reshape(shape) - base
    lo_l, hi_l = _LEVELS[name]
    ends = np.stack([base + lo_l * step, base + hi_l * step])
    return step, ends.min(axis=0), ends.max(axis=0)


@pytest.mark.parametrize("name", K_QUANTS)
def test_k_quants_decode_to_the_nearest_point_of_their_grid(name):
    """llama.cpp's last pass re-rounds every weight against the *stored* (fp16, 4/6-bit) scales,
    so each weight decodes to within half a step of itself, or, if it lies outside its group's
    grid (the scale search may give up the extremes), to the nearer end of the grid."""
    x = gaussian()
    packed = quantize(x, name)
    xq = dequantize(packed, name, x.shape).numpy()
    step, lo, hi = k_quant_grid(packed, name, x.shape)
    err = np.abs(x - xq)
    outside = np.maximum(0, np.maximum(lo - x, x - hi))
    slack = 8 * np.finfo(np.float32).eps * (np.abs(x) + np.abs(lo) + np.abs(hi))
    assert (err <= np.abs(step) / 2 + outside + slack).all()
    # On gaussian data the search clips at most about one step: the iscale grid spans at most
    # nmax + rmin + rdelta*nstep levels over max - min (e.g. Q4_K: 16 over a 15-step grid), and the
    # 4/6-bit scale rounding moves a group's step by a little; so no weight is off by 1.5 steps.
    regular = np.ones(x.shape[0], bool)
    regular[[1, 4]] = False  # the outlier row and the constant row have degenerate groups
    assert (err[regular] <= 1.5 * np.abs(step[regular]) + slack[regular]).all()


def rel_rms(x: np.ndarray, name: str) -> float:
    xq = dequantize(quantize(x, name), name, x.shape).numpy()
    return float(np.sqrt(((x - xq) ** 2).mean() / (x ** 2).mean()))


def test_k_quant_error_ordering_on_gaussian_weights():
    x = np.random.default_rng(2).standard_normal((64, 1024)).astype(np.float32)
    errors = [rel_rms(x, name) for name in K_QUANTS]
    assert errors == sorted(errors, reverse=True), dict(zip(K_QUANTS, errors))
    # Ballpark of llama.cpp on N(0, 1) (measured: 0.30, 0.15, 0.072, 0.036, 0.018).
    for name, err, (lo, hi) in zip(K_QUANTS, errors, [(0.25, 0.35), (0.12, 0.18), (0.06, 0.085),
                                                     (0.03, 0.043), (0.015, 0.021)]):
        assert lo < err < hi, (name, err)
    # The per-group scale search and the min beat the plain formats of the same code width.
    assert rel_rms(x, "Q4_K") < rel_rms(x, "Q4_0")
    assert rel_rms(x, "Q5_K") < rel_rms(x, "Q5_0")


@pytest.mark.parametrize("name", SIMPLE)
def test_simple_types_are_idempotent(name):
    """Decoded weights quantize back to the same bytes: the block's extreme decodes exactly to
    the level that defined d (Q8_0: +-127d, Q4_0/Q5_0: -8d/-16d, Q4_1/Q5_1: min and min + nmax*d),
    so d comes back equal up to float32 rounding that the fp16 store absorbs, and every decoded
    weight sits on a level, far from the rounding boundaries half a step away.

    One exception, also in llama.cpp: an all-zero block of Q4_0/Q5_0 stores d = 0/-8 = -0.0,
    decodes to -0.0s, and those give d = +0.0 next time; only that sign bit differs."""
    x = gaussian()
    packed = quantize(x, name)
    again = quantize(dequantize(packed, name, x.shape), name)
    zero_d = fp16_at(packed, name, 0) == 0  # True for +0.0 and -0.0
    first, second = packed.reshape(len(zero_d), -1), again.reshape(len(zero_d), -1)
    assert np.array_equal(first[~zero_d], second[~zero_d])
    assert np.array_equal(first[zero_d, 2:], second[zero_d, 2:])
    assert (fp16_at(again, name, 0)[zero_d] == 0).all()


@pytest.mark.parametrize("name", K_QUANTS)
def test_k_quants_requantize_without_compounding_error(name):
    """K-quants are NOT idempotent: on decoded weights the scale search can pick another scale of
    near-equal error (e.g. about half of Q3_K's super-blocks change), so only check that a second
    round trip costs little: a re-quantized GGUF stays about as accurate as the first."""
    x = gaussian(seed=3)
    first = dequantize(quantize(x, name), name, x.shape)
    second = dequantize(quantize(first, name), name, x.shape).numpy()
    e1 = np.sqrt(((x - first.numpy()) ** 2).mean())
    e2 = np.sqrt(((x - second) ** 2).mean())
    assert e2 <= 1.05 * e1


@pytest.mark.parametrize("name", GGUF_TYPES)
def test_importance_lowers_the_weighted_error(name):
    x = np.random.default_rng(4).standard_normal((32, 1024)).astype(np.float32)
    importance = np.full(1024, 0.01, np.float32)
    importance[::8] = 1.0
    plain = quantize(x, name)
    weighted = quantize(x, name, importance=importance)
    if name == "Q8_0":  # llama.cpp's quantize_q8_0 ignores the imatrix
        assert np.array_equal(plain, weighted)
        return

    def weighted_error(packed: np.ndarray) -> float:
        return float((importance * (x - dequantize(packed, name, x.shape).numpy()) ** 2).sum())

    assert weighted_error(weighted) < 0.8 * weighted_error(plain)  # measured 0.19 .. 0.55
