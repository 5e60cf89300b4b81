"""Hybrid models (blocks of attention and of another token mixer) end to end on tiny random LFM2
(short convolutions) and Qwen3-Next (linear attention, with routed and shared experts): profile
with ablation of each block's mixer, a plan, quantization, evaluation, and an HF export that plain
transformers reloads. Random weights: wiring, not quality."""
from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
from transformers import AutoModelForCausalLM

from conftest import CALIBRATION_TEXT, EVALUATION_TEXT
from layerwise.data.windows import token_windows
from layerwise.models import load_model
from tiny_families import FAMILIES, HYBRID_FAMILIES, save_tiny

# End to end through the CLI or fresh processes: left out of the quick tier (-m "not slow").
pytestmark = pytest.mark.slow

# The modules of each block's token-mixing sublayer (Falcon-H1 has no block kinds: attention and
# a Mamba mixer in every block).
MIXERS = {"lfm2": ["conv", "self_attn", "conv"], "qwen3_next": ["linear_attn", "self_attn", "linear_attn"],
          "falcon_h1": ["self_attn+mamba"] * 3}


@pytest.mark.parametrize("model_type", HYBRID_FAMILIES)
def test_hybrid_end_to_end(model_type, tmp_path):
    from layerwise.apply.quantize import quantize_
    from layerwise.evaluate import base_outputs, evaluate
    from layerwise.export.run import run_export
    from layerwise.measure.run import run_plan
    from layerwise.profile.runner import profile_model

    save_tiny(model_type, tmp_path / "m")
    loaded = load_model(tmp_path / "m")
    assert loaded.adapter.block_kinds == tuple(FAMILIES[model_type].get("layer_types", ()))

    windows = token_windows(loaded.tokenizer, CALIBRATION_TEXT, tokens=256, seq_len=128)
    profile = profile_model(loaded, windows, ablation=["attn"], weights=False, progress=False)
    # Every block's mixer, attention or not, is found and measured (random short convolutions add
    # little: KL near zero, but never negative or missing).
    assert all(row["attn_rel_update"] > 0 and row["ablation_kl_attn"] >= 0 for row in profile.blocks)
    assert profile.blocks[1]["ablation_kl_attn"] > 0

    outcome = run_plan(loaded, bits_per_weight=5.0, options="int4g64,int8g64", tokens=256, fitness_tokens=128,
                       check_tokens=256, seq_len=128, allocator="exact", out=tmp_path / "plan.json", progress=False)
    mixers = {unit.block: unit.modules for unit in outcome.table.units if unit.kind == "attn"}
    for block, expected in enumerate(MIXERS[model_type]):
        assert {name.split(".")[3] for name in mixers[block]} == set(expected.split("+"))

    eval_windows = token_windows(loaded.tokenizer, EVALUATION_TEXT, tokens=256, seq_len=128)
    base = base_outputs(loaded, eval_windows, progress=False)
    quantized = copy.deepcopy(loaded)
    quantize_(quantized, outcome.plan, progress=False)
    quality = evaluate(quantized, base, progress=False)
    assert 0 < quality.kl < 1 and np.isfinite(quality.perplexity)
    run_export(tmp_path / "m", plan=tmp_path / "plan.json", format="hf", out=tmp_path / "hf", progress=False)
    ids = eval_windows.input_ids[:1]
    with torch.no_grad():
        reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "hf").eval()(input_ids=ids).logits
        torch.testing.assert_close(reloaded, quantized.model(input_ids=ids).logits, rtol=1e-4, atol=1e-4)
