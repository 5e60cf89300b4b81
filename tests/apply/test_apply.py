"""quantize_ on the real stories260K model, sizes, storage, and evaluation against the base."""
from __future__ import annotations

import copy

import pytest
import torch

from conftest import CALIBRATION_TEXT, EVALUATION_TEXT
from layerwise import LayerwiseError, token_windows
from layerwise.apply.storage import apply_quantized, load_quantized, save_quantized
from layerwise.evaluate import base_outputs, evaluate
from layerwise.models.layout import linear_weight
from layerwise.plan import Plan
from layerwise.apply import quantize_
from layerwise.quant import QuantConfig, bits_per_weight
from layerwise.quant.size import size_report


@pytest.fixture(scope="module")
def calibration(stories):
    return token_windows(stories.tokenizer, CALIBRATION_TEXT, tokens=4096, seq_len=256, seed=0)


@pytest.fixture(scope="module")
def base(stories):
    windows = token_windows(stories.tokenizer, EVALUATION_TEXT, tokens=8192, seq_len=512, seed=None)
    return base_outputs(stories, windows, progress=False)


def quantized_copy(stories, plan, calibration=None):
    model = copy.deepcopy(stories)
    return model, quantize_(model, plan, calibration, progress=False)


def test_base_perplexity_matches_the_shared_readme(base):
    # ../shared/README.md: 129 on the first 20,000 tokens; these are the first 8,192.
    assert 100 < base.quality.perplexity < 160
    assert base.quality.kl == 0.0


def test_weights_are_replaced_by_their_dequantized_values(stories):
    model, stored = quantized_copy(stories, Plan.uniform(bits=4, group_size=32, remainder="tail"))
    assert len(stored) == 5 * 7
    for name, q in stored.items():
        torch.testing.assert_close(linear_weight(model.model.get_submodule(name)), q.dequantize())
    assert torch.equal(model.model.model.norm.weight, stories.model.model.norm.weight)


def test_quality_ordering_on_real_text(stories, base, calibration):
    results = {}
    for label, plan in {
        "int8": Plan.uniform(bits=8, group_size=None),
        "rtn3": Plan.uniform(bits=3, group_size=None),
        "gptq3": Plan.uniform(bits=3, group_size=None, algorithm="gptq"),
    }.items():
        model, _ = quantized_copy(stories, plan, calibration)
        results[label] = evaluate(model, base, progress=False)
    assert results["int8"].kl < 0.01 and results["int8"].top1 > 0.95
    assert results["gptq3"].kl < results["rtn3"].kl
    assert results["rtn3"].perplexity > results["int8"].perplexity


def test_sizes_count_scales_and_tied_head_once(stories):
    plan = Plan.uniform(bits=3, group_size=None)
    sizes = size_report(stories, plan.resolve([n for n in _linears(stories)], []))
    _, stored = quantized_copy(stories, plan)
    assert size_report(stories, stored) == sizes
    assert sizes["linear_bits_per_weight"] == pytest.approx(bits_per_weight(stored))
    # Every linear has 64 or 172 input columns and one fp16 scale per row.
    expected_bits = sum(q.shape[0] * (q.shape[1] * 3 + 16) for q in stored.values())
    assert sizes["linear_bytes"] == expected_bits // 8
    assert stories.model.config.tie_word_embeddings
    assert sizes["embeddings_and_head_bytes"] == 512 * 64 * 2  # one tied matrix at 16 bits


def test_storage_round_trip_and_model_check(stories, tmp_path):
    plan = Plan.uniform(bits=4, group_size=None, symmetric=False).override("re:.*mlp.down_proj", QuantConfig("nf4", group_size=4))
    model, stored = quantized_copy(stories, plan)
    save_quantized(tmp_path, plan, stored, {"model": stories.describe()})
    document, reloaded = load_quantized(tmp_path)
    fresh = copy.deepcopy(stories)
    apply_quantized(fresh, document, reloaded)
    for name in stored:
        assert torch.equal(fresh.model.get_submodule(name).weight, model.model.get_submodule(name).weight)
    document["meta"]["model"]["fingerprint"] = "0" * 64
    with pytest.raises(LayerwiseError, match="made from a model with fingerprint"):
        apply_quantized(fresh, document, reloaded)


def test_plan_errors_name_the_module(stories):
    with pytest.raises(LayerwiseError, match=r"model.layers.0.self_attn.q_proj: rtn int4 g128 sym needs rows that are a multiple of 128, but it has 64"):
        quantized_copy(stories, Plan.uniform(bits=4, group_size=128))
    with pytest.raises(LayerwiseError, match="matches no quantizable module"):
        quantized_copy(stories, Plan.uniform(bits=4, group_size=None).override("model.layers.7.mlp.up_proj", bits=3))
    with pytest.raises(LayerwiseError, match="need calibration text"):
        quantized_copy(stories, Plan.uniform(bits=4, group_size=None, algorithm="gptq"))


def _linears(loaded):
    from layerwise.models.layout import block_linears

    return [name for _, name, _ in block_linears(loaded.model, loaded.adapter)]


def test_k_quants_fall_back_as_llama_cpp_does_where_rows_do_not_fit(stories):
    from layerwise.apply.quantize import plan_fallbacks, plan_targets

    # stories260K's rows are 64 wide (172 for down_proj, which no GGUF block fits: kept at int8).
    fitting = "re:.*(self_attn|gate_proj|up_proj).*"
    asked = Plan(QuantConfig("int", 8, None)).override(fitting, QuantConfig("q4_k", remainder="fallback"))
    with pytest.raises(LayerwiseError, match="needs rows that are a multiple of 256"):
        quantized_copy(stories, Plan(QuantConfig("int", 8, None)).override(fitting, QuantConfig("q4_k")))
    assert {config.format for config in plan_targets(stories, asked).values()} == {"q5_0", "int"}
    fallbacks = plan_fallbacks(stories, asked)
    assert len(fallbacks) == 30 and set(fallbacks.values()) == {"q4_k -> q5_0"}
    fell_back, _ = quantized_copy(stories, asked)
    direct, _ = quantized_copy(stories, Plan(QuantConfig("int", 8, None)).override(fitting, QuantConfig("q5_0")))
    for (name, a), b in zip(fell_back.model.named_parameters(), direct.model.parameters()):
        assert torch.equal(a, b), name
    low_bits = Plan(QuantConfig("int", 8, None)).override(fitting, QuantConfig("q3_k", remainder="fallback"))
    assert set(plan_fallbacks(stories, low_bits).values()) == {"q3_k -> q4_0"}
