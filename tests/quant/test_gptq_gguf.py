"""GPTQ onto GGUF grids: llama.cpp's quantizer picks each block's scales, GPTQ picks the codes, and
the bytes are what llama.cpp runs."""
from __future__ import annotations

import copy

import numpy as np
import pytest
import torch

from conftest import CALIBRATION_TEXT, EVALUATION_TEXT
from layerwise import LayerwiseError, token_windows
from layerwise.evaluate import base_outputs, evaluate
from layerwise.plan import Plan
from layerwise.plan.options import option_name, parse_option
from layerwise.apply import quantize_
from layerwise.quant import QuantConfig, gguf_blocks, gptq_quantize, quantize_weight
from test_algorithms import correlated_inputs, output_error

TYPES = ["q8_0", "q4_0", "q4_1", "q5_0", "q5_1", "q2_k", "q3_k", "q4_k", "q5_k", "q6_k"]


@pytest.fixture(scope="module")
def layer():
    generator = torch.Generator().manual_seed(0)
    weight = torch.randn(64, 512, generator=generator) * 0.05
    inputs = correlated_inputs(n=4096, columns=512, rank=64)
    return weight, inputs, 2 * inputs.t() @ inputs / len(inputs)


def test_codes_on_a_grid_read_back_as_dequantize_does():
    """value = scale * code + offset reproduces dequantization of any bytes, and codes put back
    into the bytes give the same bytes."""
    for qtype in (t.upper() for t in TYPES):
        packed = np.random.default_rng(0).integers(0, 256, size=(4, gguf_blocks.row_bytes(qtype, 512)), dtype=np.uint8)
        grid = gguf_blocks.code_grid(packed, qtype, (4, 512))
        with np.errstate(all="ignore"):
            values = grid.scale * grid.code.astype(np.float32) + grid.offset
        assert np.array_equal(values, gguf_blocks.dequantize(packed, qtype, (4, 512)).numpy(), equal_nan=True), qtype
        assert np.array_equal(gguf_blocks.with_codes(packed, qtype, grid.code), packed), qtype
        with pytest.raises(LayerwiseError, match="codes must lie in"):
            gguf_blocks.with_codes(packed, qtype, grid.code * 0 + grid.high + 1)


@pytest.mark.parametrize("qtype", TYPES)
def test_gptq_on_gguf_grids_beats_importance_weighted_rounding(layer, qtype):
    weight, inputs, hessian = layer
    config = QuantConfig(qtype, algorithm="gptq")
    gptq = gptq_quantize(weight, hessian, config)
    assert gptq.packed.shape == (64, gguf_blocks.row_bytes(qtype.upper(), 512))
    # What llama-quantize --imatrix writes with the same statistics.
    rtn = quantize_weight(weight, QuantConfig(qtype), importance=torch.diagonal(hessian).numpy())
    ours, theirs = output_error(weight, gptq.dequantize(), inputs), output_error(weight, rtn.dequantize(), inputs)
    assert ours < (0.97 if qtype != "q8_0" else 1.0) * theirs, (ours, theirs)
    # The first block's scales are the ones llama.cpp's quantizer picks for the untouched weights.
    unit = gguf_blocks.block_size(qtype.upper())
    first = gguf_blocks.quantize(weight[:, :unit], qtype.upper(), torch.diagonal(hessian)[:unit].numpy())
    mine = gguf_blocks.code_grid(gptq.packed, qtype.upper(), (64, 512))
    np.testing.assert_array_equal(mine.scale[:, :unit], gguf_blocks.code_grid(first, qtype.upper(), (64, unit)).scale)


def test_option_names_and_refusals():
    assert option_name(parse_option("gptq:q4_k")) == "gptq:q4_k"
    assert parse_option("gptq:q4_k").algorithm == "gptq"
    with pytest.raises(LayerwiseError, match="supports only algorithm 'rtn'"):
        QuantConfig("q4_k", algorithm="awq")
    with pytest.raises(LayerwiseError, match="multiple of 256"):
        gptq_quantize(torch.randn(4, 320), torch.eye(320), QuantConfig("q4_k", algorithm="gptq"))


def test_gptq_q4_0_beats_q4_0_on_stories_held_out_text(stories):
    """On a real model and text it was not calibrated on, GPTQ on Q4_0's grids has less KL to the
    base than llama.cpp's Q4_0 at the same bytes (down_proj's 172 columns stay float)."""
    calibration = token_windows(stories.tokenizer, CALIBRATION_TEXT, tokens=4096, seq_len=256)
    held_out = token_windows(stories.tokenizer, EVALUATION_TEXT, tokens=8192, seq_len=256, seed=None)
    base = base_outputs(stories, held_out, progress=False)
    pattern = "re:.*(q|k|v|o|gate|up)_proj"
    kl = {}
    for algorithm in ("rtn", "gptq"):
        model = copy.deepcopy(stories)
        stored = quantize_(model, Plan(None).override(pattern, QuantConfig("q4_0", algorithm=algorithm)), calibration,
                           progress=False)
        kl[algorithm] = evaluate(model, base, progress=False).kl
        kl[algorithm + " bytes"] = sum(q.packed.nbytes for q in stored.values())
    assert kl["gptq bytes"] == kl["rtn bytes"]
    assert kl["gptq"] < 0.9 * kl["rtn"], kl
