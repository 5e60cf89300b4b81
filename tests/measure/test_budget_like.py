"""Plans no larger than a given GGUF file (`--budget-like`): the embedding and head are units too.

A tiny random Llama (rows of 64 and 128, which GGUF's 32-weight blocks fit; random weights are
enough for sizes) is written as a Hugging Face folder with stories260K's tokenizer; the reference
is our own GGUF of it with every tensor at Q5_0 but the head at Q8_0. GGUF from a Hugging Face
folder needs llama.cpp's converter (.ci/run provides it).
"""
import json
import os
import shutil

import numpy as np
import pytest
import torch
import transformers

from conftest import CALIBRATION_TEXT, SMOLLM2, STORIES, require_tool
from layerwise import load_model, token_windows
from layerwise.apply.quantize import quantize_
from layerwise.engine.divergence import Reference, kl_per_token
from layerwise.errors import LayerwiseError
from layerwise.export.convert import CONVERTER_ENV
from layerwise.export.run import run_export
from layerwise.measure.run import plan_from_choice, run_plan, sensitivity_for
from layerwise.measure.sensitivity import measure_sensitivity
from layerwise.models.gguf_reference import read_reference
from layerwise.plan.plan import Plan
from layerwise.quant import QuantConfig

OPTIONS = "q4_0,q5_0,q8_0"


@pytest.fixture(scope="module")
def converter():
    return require_tool("llama.cpp's convert_hf_to_gguf.py", os.environ.get(CONVERTER_ENV),
                        f"{CONVERTER_ENV} is not set; .ci/run sets it to the converter it unpacks")


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    folder = tmp_path_factory.mktemp("tiny-llama")
    config = transformers.LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                                      num_key_value_heads=2, vocab_size=512, max_position_embeddings=256,
                                      tie_word_embeddings=False, bos_token_id=1, eos_token_id=2)
    torch.manual_seed(0)
    transformers.AutoModelForCausalLM.from_config(config, dtype=torch.float32).save_pretrained(folder)
    for name in ("tokenizer.json", "tokenizer.model", "tokenizer_config.json"):
        shutil.copy(STORIES / name, folder / name)
    return folder


@pytest.fixture(scope="module")
def reference(tiny, converter, tmp_path_factory):
    plan = Plan(QuantConfig("q5_0")).override("model.embed_tokens", QuantConfig("q5_0")) \
        .override("lm_head", QuantConfig("q8_0"))
    out = tmp_path_factory.mktemp("reference") / "reference.gguf"
    run_export(tiny, plan=plan, out=out, converter=converter, progress=False)
    return out


@pytest.fixture(scope="module")
def planned(tiny, reference, tmp_path_factory):
    out = tmp_path_factory.mktemp("plan") / "plan.json"
    outcome = run_plan(tiny, budget_like=reference, options=OPTIONS, calib=CALIBRATION_TEXT, tokens=1024,
                       check_tokens=1024, seq_len=128, table=out.with_name("table.json"), out=out, progress=False)
    return out, outcome


def test_the_embedding_and_head_are_planned_within_the_reference_tensors_bytes(planned, reference):
    out, outcome = planned
    units = [unit.name for unit in outcome.table.units]
    assert units[:2] == ["model.embed_tokens", "lm_head"] and outcome.table.edges
    rules = dict(outcome.plan.rules)
    assert {"model.embed_tokens", "lm_head"} <= set(rules)
    assert all(config.algorithm == "rtn" for config in rules.values())
    like = outcome.report["budget_like"]
    assert like["file_bytes"] == reference.stat().st_size
    assert outcome.report["planned_bytes"] <= like["budget_bytes"] < like["planned_tensor_bytes"]
    recorded = json.loads(out.read_text())["meta"]["provenance"]["budget_like"]
    assert recorded["file_bytes"] == reference.stat().st_size and recorded["sha256"] == like["sha256"]


def test_the_exported_file_is_no_larger_than_the_reference(tiny, planned, reference, converter, tmp_path):
    import gguf

    out, outcome = planned
    report = run_export(tiny, plan=out, out=tmp_path / "ours.gguf", converter=converter, progress=False)
    assert report["file_bytes"] <= reference.stat().st_size
    assert report["reference"]["file_bytes"] == reference.stat().st_size
    types = {t.name: gguf.GGMLQuantizationType(int(t.tensor_type)).name.lower()
             for t in gguf.GGUFReader(tmp_path / "ours.gguf").tensors}
    rules = dict(outcome.plan.rules)
    assert types["token_embd.weight"] == rules["model.embed_tokens"].format
    assert types["output.weight"] == rules["lm_head"].format


def test_a_file_that_would_be_larger_than_the_reference_is_not_written(tiny, planned, converter, tmp_path):
    out, _ = planned
    document = json.loads(out.read_text())
    document["meta"]["provenance"]["budget_like"]["file_bytes"] = 1000
    smaller = tmp_path / "plan.json"
    smaller.write_text(json.dumps(document))
    with pytest.raises(LayerwiseError, match="more than reference.gguf"):
        run_export(tiny, plan=smaller, out=tmp_path / "ours.gguf", converter=converter, progress=False)
    assert not (tmp_path / "ours.gguf").exists()


def test_an_embedding_entry_is_the_kl_of_the_model_with_that_embedding(tiny):
    loaded = load_model(tiny)
    windows = token_windows(loaded.tokenizer, CALIBRATION_TEXT, tokens=512, seq_len=128)
    table = measure_sensitivity(loaded, windows, "gptq:q4_0,q8_0", edges=True, progress=False)
    embed = [unit.name for unit in table.units].index("model.embed_tokens")
    # GPTQ reaches no further than the blocks: the embedding is rounded to nearest under gptq:q4_0.
    assert table.configs[0].algorithm == "gptq"
    choice = [1] * len(table.units)
    choice[embed] = 0
    plan = plan_from_choice(table, choice)
    assert dict(plan.rules)["model.embed_tokens"] == QuantConfig("q4_0")
    quantized = load_model(tiny)
    quantize_(quantized, Plan(None).override("model.embed_tokens", QuantConfig("q4_0")), progress=False)
    kl = []
    with torch.no_grad():
        for batch in windows.batches(4):
            reference = Reference.from_logits(loaded.model(input_ids=batch).logits[:, :-1], store=torch.float16)
            values = kl_per_token(reference, quantized.model(input_ids=batch).logits[:, :-1])
            kl.extend(values.reshape(values.shape[0], -1).mean(dim=1).tolist())
    assert table.kl[embed, 0] == pytest.approx(float(np.mean(kl)), rel=1e-4)
    assert table.kl[embed, 0] > table.kl[embed, 1] > 0


def test_budget_like_refusals(tiny, planned, tmp_path):
    out, outcome = planned
    loaded = load_model(tiny)
    modules = [name for unit in outcome.table.units for name in unit.modules]
    with pytest.raises(LayerwiseError, match="not a GGUF of this model"):
        read_reference(loaded, SMOLLM2, modules)
    junk = tmp_path / "junk.gguf"
    junk.write_bytes(b"not a gguf at all" * 10)
    with pytest.raises(LayerwiseError, match="not a GGUF file"):
        read_reference(loaded, junk, modules)
    cut = tmp_path / "cut.gguf"
    with open(SMOLLM2, "rb") as handle:
        cut.write_bytes(handle.read(100_000))
    with pytest.raises(LayerwiseError, match="truncated or corrupt"):
        read_reference(loaded, cut, modules)
    with pytest.raises(LayerwiseError, match="not found"):
        read_reference(loaded, tmp_path / "missing.gguf", modules)
    with pytest.raises(LayerwiseError, match="exactly one budget"):
        run_plan(loaded, bits_per_weight=4.5, budget_like=SMOLLM2, options=OPTIONS)
    # A table measured with the embedding and head as units serves only plans that plan them.
    with pytest.raises(LayerwiseError, match="with the embedding and head as units"):
        sensitivity_for(loaded, table=out.with_name("table.json"), options=OPTIONS)


def test_a_streamed_plan_like_a_gguf_file_is_the_in_memory_plan(tiny, planned, reference):
    """Streamed, the embedding's entries run every block from its quantized rows and the untied
    head's take the base outputs, each head quantized a slice of rows at a time: the in-memory
    table and plan."""
    _, whole = planned
    streamed = run_plan(tiny, budget_like=reference, options=OPTIONS, calib=CALIBRATION_TEXT, tokens=1024,
                        check_tokens=1024, seq_len=128, streaming=True, progress=False)
    np.testing.assert_allclose(streamed.table.kl, whole.table.kl, rtol=0, atol=1e-6)
    np.testing.assert_array_equal(streamed.table.cost_bits, whole.table.cost_bits)
    assert streamed.table.skipped == whole.table.skipped
    assert streamed.report["options"] == whole.report["options"] and streamed.report["budget_like"] == \
        whole.report["budget_like"]
    assert streamed.report["check"]["plan_kl"] == pytest.approx(whole.report["check"]["plan_kl"], abs=1e-6)
    for option, measured in whole.report["check"]["uniform"].items():
        assert streamed.report["check"]["uniform"][option]["kl"] == pytest.approx(measured["kl"], abs=1e-6), option


def test_a_streamed_table_with_a_tied_embedding_is_the_in_memory_table(monkeypatch):
    """stories260K ties its head to the embedding: quantizing the one quantizes the other, and the
    streamed table never holds the matrix whole (its rows are read for the tokens, its slices for
    the head)."""
    from layerwise.models.streaming import StreamedWeights

    loads = []
    real_load = StreamedWeights._load
    monkeypatch.setattr(StreamedWeights, "_load", lambda self, part, only=None: (loads.append(part),
                                                                                 real_load(self, part, only)))
    options = "q4_0,q8_0,int4pc,drop"
    windows = token_windows(load_model(STORIES).tokenizer, CALIBRATION_TEXT, tokens=512, seq_len=128)
    tables = [measure_sensitivity(load_model(STORIES, streaming=streaming), windows, options, "sublayer", edges=True,
                                  progress=False) for streaming in (False, True)]
    assert loads and not {"model.embed_tokens", "lm_head"} & set(loads)
    assert [unit.name for unit in tables[1].units][0] == "model.embed_tokens" and tables[1].units[1].kind != "head"
    np.testing.assert_allclose(tables[1].kl, tables[0].kl, rtol=0, atol=1e-6)
    np.testing.assert_array_equal(tables[1].cost_bits, tables[0].cost_bits)
    assert tables[1].skipped == tables[0].skipped and "model.embed_tokens drop" in tables[1].skipped
    assert tables[1].cost["forward_equivalents"] == pytest.approx(tables[0].cost["forward_equivalents"])
    assert np.all(tables[1].kl[0, :2] > 0)
