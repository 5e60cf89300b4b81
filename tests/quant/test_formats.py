"""Property tests for every grid format: bounded error, idempotence on its own grid, shapes kept."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from layerwise import LayerwiseError
from layerwise.quant import QuantConfig, quantize_weight
from layerwise.quant.formats import FP4_VALUES, NF4_VALUES, registered_formats
from layerwise.quant.gguf_blocks import bytes_per_block
from layerwise.quant.qtensor import QTensor

GRID_CONFIGS = [
    QuantConfig("int", bits, group, symmetric)
    for bits in (2, 3, 4, 8) for group in (32, None) for symmetric in (True, False)
] + [QuantConfig("nf4", group_size=64), QuantConfig("fp4", group_size=32), QuantConfig("mxfp4"),
     QuantConfig("fp8", group_size=None), QuantConfig("fp8", group_size=64)]


def weights(rows=48, columns=128, seed=0) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    w = torch.randn(rows, columns, generator=generator) * 0.05
    w[3, 7] = 0.9  # an outlier
    w[5, :32] = 0.0  # an all-zero group
    return w


def step_bound(config: QuantConfig, w: torch.Tensor) -> torch.Tensor:
    """Half the widest gap of the format's grid in each group, i.e. the worst rounding error."""
    width = config.group_size or w.shape[1]
    groups = w.reshape(w.shape[0], -1, width)
    absmax = groups.abs().amax(-1, keepdim=True)
    if config.format == "int" and config.symmetric:
        gap = absmax / 2 ** (config.bits - 1)
    elif config.format == "int":  # the asymmetric grid spans [min(min, 0), max(max, 0)]
        span = groups.amax(-1, keepdim=True).clamp(min=0) - groups.amin(-1, keepdim=True).clamp(max=0)
        gap = span / (2**config.bits - 1) * 1.001
    elif config.format == "nf4":
        gap = absmax * (NF4_VALUES[1:] - NF4_VALUES[:-1]).max()
    elif config.format == "fp4":
        gap = absmax / 6 * (FP4_VALUES[1:] - FP4_VALUES[:-1]).max()
    elif config.format == "mxfp4":
        gap = 2 * absmax * 2.0 / 4  # scale <= absmax / 4, widest E2M1 gap 2, plus saturation above 6 x scale
    else:  # fp8 e4m3: 3 mantissa bits, relative gap 2^-3 at the largest binade
        gap = absmax * 2.0**-3
    return (gap / 2 * 1.01 + 1e-7).expand_as(groups).reshape(w.shape)


@pytest.mark.parametrize("config", GRID_CONFIGS, ids=lambda c: c.label)
def test_error_within_half_a_step_and_shapes_kept(config):
    w = weights()
    q = quantize_weight(w, config)
    restored = q.dequantize()
    assert restored.shape == w.shape and restored.dtype == torch.float32
    assert q.codes.shape == w.shape
    half_step = step_bound(config, w)
    error = (restored - w).abs()
    # Between two grid points (the smallest and largest decoded values of its group bracket it),
    # an entry is at most half a step from the nearest. Outside them it was clipped: the symmetric
    # rule maps the extreme to -2^(b-1) steps so the other side stops one step short, and an
    # integer zero point shifts the asymmetric grid by up to half a step. One step bounds those.
    width = config.group_size or w.shape[1]
    groups = restored.reshape(w.shape[0], -1, width)
    low = groups.amin(-1, keepdim=True).expand_as(groups).reshape(w.shape)
    high = groups.amax(-1, keepdim=True).expand_as(groups).reshape(w.shape)
    inside = (w >= low) & (w <= high)
    assert (error[inside] <= half_step[inside]).all()
    assert (error <= 2 * half_step).all()
    assert inside.float().mean() > 0.75  # the half-step check covers most entries
    assert (restored[5, :32] == 0).all()


@pytest.mark.parametrize("config", GRID_CONFIGS, ids=lambda c: c.label)
def test_idempotent_on_its_own_grid(config):
    once = quantize_weight(weights(seed=1), config).dequantize()
    twice = quantize_weight(once, config).dequantize()
    moved = (twice - once).abs() > 1e-6 * once.abs().max().item()
    if config.format == "int" and not config.symmetric:
        # Not exact: the fp16 scale and the integer zero point can leave a group's codes one short
        # of the full range, so refitting that group shrinks its scale slightly. Rare and < 1 step.
        assert moved.float().mean() < 0.05
        assert ((twice - once).abs() <= 2 * step_bound(config, once)).all()
    else:
        assert not moved.any()


def test_more_bits_less_error():
    w = weights(seed=2)
    errors = [(quantize_weight(w, QuantConfig("int", bits, 32)).dequantize() - w).pow(2).mean() for bits in (2, 3, 4, 8)]
    assert errors == sorted(errors, reverse=True)


def test_codes_fit_their_width():
    w = weights(seed=3)
    for bits in (2, 3, 4):
        sym = quantize_weight(w, QuantConfig("int", bits, 32, True)).codes
        asym = quantize_weight(w, QuantConfig("int", bits, 32, False)).codes
        assert sym.min() >= -(2 ** (bits - 1)) and sym.max() <= 2 ** (bits - 1) - 1
        assert asym.min() >= 0 and asym.max() <= 2**bits - 1
    assert quantize_weight(w, QuantConfig("nf4", group_size=32)).codes.max() <= 15


def test_storage_counts_every_bit():
    assert quantize_weight(weights(), QuantConfig("int", 3, 64)).n_bits == 48 * (128 * 3 + 2 * 16)
    assert quantize_weight(weights(), QuantConfig("int", 4, 64, symmetric=False)).n_bits == 48 * (128 * 4 + 2 * (16 + 4))
    assert quantize_weight(weights(), QuantConfig("mxfp4")).n_bits == 48 * (128 * 4 + 4 * 8)
    assert quantize_weight(weights(), QuantConfig("int", 8, None)).n_bits == 48 * (128 * 8 + 16)


def test_group_size_that_does_not_divide_is_an_error_unless_tail_allowed():
    w = torch.randn(8, 576)
    with pytest.raises(LayerwiseError, match=r"mlp.up_proj: rtn int4 g128 sym needs rows that are a multiple of 128, but it has 576"):
        quantize_weight(w, QuantConfig("int", 4, 128), "mlp.up_proj")
    q = quantize_weight(w, QuantConfig("int", 4, 128, remainder="tail"))
    assert q.params["scale"].shape == (8, 5)  # 4 groups of 128 and a tail of 64
    assert q.n_bits == 8 * (576 * 4 + 5 * 16)
    assert (q.dequantize() - w).abs().max() < 0.5


def test_config_validation_names_the_field():
    with pytest.raises(LayerwiseError, match="bits=9 is outside format 'int'"):
        QuantConfig("int", 9)
    with pytest.raises(LayerwiseError, match="unknown format 'int9'"):
        QuantConfig("int9")
    with pytest.raises(LayerwiseError, match="unknown algorithm 'magic'"):
        QuantConfig(algorithm="magic")
    with pytest.raises(LayerwiseError, match="group_size must be positive"):
        QuantConfig(group_size=0)
    assert QuantConfig("nf4", bits=None).bits == 4
    assert QuantConfig("mxfp4", group_size=64).group_size == 32


# --- asymmetric grids: one-signed, constant and all-zero groups -----------------------------

def asymmetric_configs() -> list[QuantConfig]:
    """Every asymmetric setting of every registered format, so a new one is covered unasked."""
    configs = []
    for name, fmt in registered_formats().items():
        if fmt.asymmetric == "never":
            continue
        if fmt.packed:
            configs.append(QuantConfig(name))
            continue
        for bits in fmt.allowed_bits or (fmt.fixed_bits,):
            for group in (16, None):
                configs.append(QuantConfig(name, bits, group, symmetric=False))
    return configs


# Byte offsets of an asymmetric GGUF block's fp16 scale and minimum (ggml-common.h: block_q4_1,
# block_q5_1, block_q2_K, block_q4_K, block_q5_K) and, for a K-quant, the code llama.cpp gives the
# scale of its widest sub-block (value = d * sc * q - dmin * m; sc = 15 for Q2_K, 63 otherwise).
GGUF_SCALE_MIN = {"q4_1": (0, 2, None), "q5_1": (0, 2, None),
                  "q2_k": (80, 82, 15), "q4_k": (0, 2, 63), "q5_k": (0, 2, 63)}


def one_signed_groups(rows: int, n_groups: int, width: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """[rows, n_groups * width] weights whose groups cycle through all positive, all negative,
    constant (either sign) and all zero, far from or near zero; and the kind of each group (0..3)."""
    generator = torch.Generator().manual_seed(seed)
    start = torch.rand(rows, n_groups, 1, generator=generator) * 2 + 0.01
    span = torch.rand(rows, n_groups, 1, generator=generator) * start  # from nearly constant to [a, 2a]
    start[0, 0], span[0, 0] = 0.9, 0.1  # the example: [0.9, 1.0] came back as 0.1 at 4 bits
    values = start + span * torch.rand(rows, n_groups, width, generator=generator)
    sign = torch.where(torch.rand(rows, n_groups, 1, generator=generator) < 0.5, -1.0, 1.0)
    kind = (torch.arange(rows * n_groups).reshape(rows, n_groups, 1) + seed) % 4
    w = torch.where(kind == 1, -values, values)
    w = torch.where(kind == 2, sign * start, w)
    w = torch.where(kind == 3, torch.zeros_like(w), w)
    return w.reshape(rows, -1), kind.expand(rows, n_groups, width).reshape(rows, -1)


def step_and_offset_error(q: QTensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per weight: the step of its group's grid, and how far a stored float minimum can sit from
    the group's own (0 for an integer zero point, which is exact)."""
    if q.packed is None:
        width = q.group_width
        scale = q.params["scale"].repeat_interleave(width, dim=1)[:, : q.shape[1]]
        return scale, torch.zeros_like(scale)
    name = q.config.format
    assert name in GGUF_SCALE_MIN, f"add where {name} stores its scale and minimum to GGUF_SCALE_MIN"
    scale_at, min_at, top_code = GGUF_SCALE_MIN[name]
    blocks = np.ascontiguousarray(q.packed).reshape(-1, bytes_per_block(name.upper()))
    scale, minimum = (blocks[:, at:at + 2].copy().view(np.float16) for at in (scale_at, min_at))
    if top_code is None:
        # Q4_1 / Q5_1: the step is d, and the minimum is rounded to fp16 (half an ulp).
        step, offset = scale.astype(np.float32), np.spacing(np.abs(minimum)).astype(np.float32) / 2
    else:
        # K-quants: value = d * sc * q - dmin * m per sub-block, sc and m of 6 bits (4 in Q2_K)
        # fitted by llama.cpp's weighted least squares, so one sub-block's own step is not a bound;
        # the super-block's is that of its widest sub-block, d * top_code. Each minimum is a whole
        # multiple of dmin: half a dmin off, plus the fp16 rounding of dmin times up to 63.
        step = scale.astype(np.float32) * top_code
        offset = minimum.astype(np.float32) * (0.5 + 63 * 2.0**-11)
    return tuple(torch.from_numpy(np.repeat(a, q.config.group_size, axis=1)).reshape(q.shape) for a in (step, offset))


@pytest.mark.parametrize("config", asymmetric_configs(), ids=lambda c: c.label)
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_asymmetric_grids_round_trip_one_signed_constant_and_zero_groups(config, seed):
    width = config.group_size or 48
    for rows, n_groups in ((1, 1), (3, 2), (5, 3)):
        w, kind = one_signed_groups(rows, n_groups, width, seed + rows)
        if config.group_size is None:  # a per-row group is the whole row
            w, kind = w.reshape(rows * n_groups, width), kind.reshape(rows * n_groups, width)
        q = quantize_weight(w, config)
        error = (q.dequantize() - w).abs()
        step, offset_error = step_and_offset_error(q)
        assert (error <= step * (1 + 1e-6) + offset_error).all(), \
            f"{config.label}: error {(error - step - offset_error).max().item():.3g} beyond one step"
        assert (error[kind == 3] == 0).all()
