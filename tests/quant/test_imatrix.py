"""The importance matrix: what it sums, llama.cpp's two file formats, and its use by GGUF types."""
from __future__ import annotations

import copy

import numpy as np
import pytest
import torch

from conftest import CALIBRATION_TEXT, SMOLLM2
from layerwise.apply.run import run_quantize
from layerwise.data.windows import bos_policy, encode_text, read_text
from layerwise.errors import LayerwiseError
from layerwise.models.layout import linear_weight
from layerwise.plan import Plan
from layerwise.quant import QuantConfig
from layerwise.quant import gguf_blocks
from layerwise.quant.imatrix import Imatrix, collect_imatrix, imatrix_windows, importance_for, run_imatrix


@pytest.fixture(scope="module")
def computed(stories, tmp_path_factory):
    out = tmp_path_factory.mktemp("imatrix") / "imatrix.gguf"
    return run_imatrix(stories, data=CALIBRATION_TEXT, out=out, ctx=128, chunks=6, progress=False), out


def test_chunks_are_llama_imatrix_s(stories):
    windows = imatrix_windows(stories.tokenizer, CALIBRATION_TEXT, ctx=128, chunks=3)
    bos = bos_policy(stories.tokenizer)
    ids = [bos] + encode_text(stories.tokenizer, read_text(CALIBRATION_TEXT)[0])
    assert windows.input_ids.shape == (3, 128)
    for i, row in enumerate(windows.input_ids.tolist()):
        assert row == [bos] + ids[i * 128 + 1:(i + 1) * 128]  # consecutive chunks, the first token made BOS
    with pytest.raises(LayerwiseError, match="needs at least 512"):
        imatrix_windows(stories.tokenizer, ["a short text"], ctx=256)


def test_sums_are_the_squared_inputs_of_each_linear(stories, computed):
    imatrix, _ = computed
    windows = imatrix_windows(stories.tokenizer, CALIBRATION_TEXT, ctx=128, chunks=6)
    layers = stories.model.model.layers
    with torch.no_grad():
        hidden = stories.model(input_ids=windows.input_ids, output_hidden_states=True).hidden_states
        attn_in = layers[2].input_layernorm(hidden[2]).reshape(-1, 64).double()
    assert set(imatrix.counts["blk.2.attn_q.weight"]) == {6 * 128}
    np.testing.assert_allclose(imatrix.sums["blk.2.attn_q.weight"][0], (attn_in ** 2).sum(0).numpy(), rtol=1e-5)
    np.testing.assert_allclose(imatrix.importance("blk.2.attn_k.weight"), (attn_in ** 2).mean(0).numpy(), rtol=1e-5)
    assert len(imatrix.sums) == 5 * 7 and imatrix.chunk_count == 6 and imatrix.chunk_size == 128
    assert "output.weight" not in imatrix.sums


def test_both_file_formats_read_back(computed, tmp_path):
    import gguf

    imatrix, path = computed
    reader = gguf.GGUFReader(path)
    assert reader.fields["general.type"].contents() == "imatrix"
    assert "general.architecture" not in reader.fields
    assert reader.fields["imatrix.chunk_size"].contents() == 128
    assert {t.name for t in reader.tensors} == {f"{name}{suffix}" for name in imatrix.sums
                                                for suffix in (".in_sum2", ".counts")}
    back = Imatrix.load(path)
    assert back.datasets == [str(CALIBRATION_TEXT)] and back.chunk_count == 6
    legacy = Imatrix.load(imatrix.save(tmp_path / "imatrix.dat"))
    assert legacy.chunk_count == 6 and legacy.datasets == [str(CALIBRATION_TEXT)]
    for name in imatrix.sums:
        np.testing.assert_allclose(back.sums[name], imatrix.sums[name], rtol=1e-6)
        np.testing.assert_allclose(legacy.importance(name), imatrix.importance(name), rtol=1e-6)
    assert legacy.counts["blk.0.ffn_down.weight"].tolist() == [6.0]  # the chunks, as llama-imatrix writes them
    # A matrix that saw no token (an expert never routed to) reads back as weight 1, as llama.cpp's.
    unseen = Imatrix({"blk.0.ffn_down_exps.weight": np.ones((2, 4))}, {"blk.0.ffn_down_exps.weight": np.array([8., 0.])},
                     [], 2, 4)
    for saved in (unseen.save(tmp_path / "unseen.dat"), unseen.save(tmp_path / "unseen.gguf")):
        np.testing.assert_allclose(Imatrix.load(saved).importance("blk.0.ffn_down_exps.weight"),
                                   [0.125] * 4 + [1.0] * 4)
    assert Imatrix.load(tmp_path / "unseen.gguf").datasets == ["(unknown)"]


def test_bad_files_are_refused(tmp_path, computed):
    with pytest.raises(LayerwiseError, match="no importance matrix at"):
        Imatrix.load(tmp_path / "missing.gguf")
    (tmp_path / "junk.dat").write_bytes(b"\xff\xff\xff\xff")
    with pytest.raises(LayerwiseError, match="neither a GGUF nor a legacy"):
        Imatrix.load(tmp_path / "junk.dat")
    imatrix, path = computed
    (tmp_path / "cut.dat").write_bytes(imatrix.save(tmp_path / "whole.dat").read_bytes()[:100])
    with pytest.raises(LayerwiseError, match="not a readable importance matrix"):
        Imatrix.load(tmp_path / "cut.dat")
    with pytest.raises(LayerwiseError, match="not an importance matrix"):
        Imatrix.load(SMOLLM2)


def test_importance_is_checked_against_the_model(stories, computed):
    imatrix, _ = computed
    found = importance_for(stories, imatrix, ["model.layers.1.mlp.down_proj"])
    assert found["model.layers.1.mlp.down_proj"].shape == (172,)
    wrong = Imatrix({name: sums[:, :10] for name, sums in imatrix.sums.items()}, imatrix.counts)
    with pytest.raises(LayerwiseError, match="has 10 values, but model.layers.1.mlp.down_proj has 172 input columns"):
        importance_for(stories, wrong, ["model.layers.1.mlp.down_proj"])
    assert Imatrix.load(computed[1]).model_fingerprint == stories.fingerprint
    other = Imatrix(imatrix.sums, imatrix.counts, model_fingerprint="f" * 64)
    with pytest.raises(LayerwiseError, match="computed on another model"):
        importance_for(stories, other, ["model.layers.1.mlp.down_proj"])
    partial = Imatrix({k: v for k, v in imatrix.sums.items() if "blk.4." not in k}, imatrix.counts)
    with pytest.raises(LayerwiseError, match="no entry for blk.4"):
        importance_for(stories, partial, ["model.layers.4.self_attn.q_proj"])


def test_quantize_weights_gguf_types_by_the_importance_matrix(stories, computed):
    imatrix, path = computed
    plan = Plan(QuantConfig("q4_0")).override("re:.*down_proj", QuantConfig("int", 4, None))
    name = "model.layers.3.self_attn.v_proj"
    weight = linear_weight(stories.model.get_submodule(name)).detach().clone()
    _, weighted, _ = run_quantize(copy.deepcopy(stories), plan, imatrix=path, progress=False)
    _, plain, _ = run_quantize(copy.deepcopy(stories), plan, progress=False)
    expected = gguf_blocks.quantize(weight, "Q4_0", imatrix.importance("blk.3.attn_v.weight"))
    assert np.array_equal(weighted[name].packed, expected)
    assert not np.array_equal(weighted[name].packed, plain[name].packed)
    assert torch.equal(weighted["model.layers.3.mlp.down_proj"].codes, plain["model.layers.3.mlp.down_proj"].codes)
    with pytest.raises(LayerwiseError, match="GGUF block types rounded to nearest"):
        run_quantize(copy.deepcopy(stories), Plan(QuantConfig("int", 4, None)), imatrix=path, progress=False)


def test_calibration_text_gives_the_importance_matrix_when_none_is_named(stories):
    from layerwise import token_windows

    plan = Plan(QuantConfig("q4_0")).override("re:.*down_proj", QuantConfig("int", 4, None))
    _, stored, _ = run_quantize(copy.deepcopy(stories), plan, calib=CALIBRATION_TEXT, tokens=1024, seq_len=128,
                                progress=False)
    windows = token_windows(stories.tokenizer, CALIBRATION_TEXT, tokens=1024, seq_len=128, seed=0)
    imatrix = collect_imatrix(stories, windows, progress=False)
    name = "model.layers.2.self_attn.q_proj"
    weight = linear_weight(stories.model.get_submodule(name)).detach()
    assert np.array_equal(stored[name].packed, gguf_blocks.quantize(weight, "Q4_0", imatrix.importance("blk.2.attn_q.weight")))
    _, plain, _ = run_quantize(copy.deepcopy(stories), plan, progress=False)
    assert not np.array_equal(stored[name].packed, plain[name].packed)


def test_collect_includes_the_head_when_asked(stories):
    windows = imatrix_windows(stories.tokenizer, CALIBRATION_TEXT, ctx=64, chunks=2)
    imatrix = collect_imatrix(stories, windows, include_output=True, progress=False)
    assert imatrix.sums["output.weight"].shape == (1, 64)


def test_a_plan_measured_with_an_importance_matrix_is_quantized_with_it(stories, computed, tmp_path):
    from layerwise.measure.run import run_plan

    imatrix, path = computed
    kept = tmp_path / "imatrix.gguf"
    kept.write_bytes(path.read_bytes())
    options = "q4_0,q8_0,int8pc"  # int8pc for down_proj, whose 172 columns take no GGUF type
    common = dict(bits_per_weight=6.0, options=options, granularity="linear", tokens=1024, check_tokens=1024,
                  seq_len=128, progress=False)
    outcome = run_plan(stories, imatrix=kept, table=tmp_path / "sens.json", out=tmp_path / "plan.json", **common)
    record = outcome.plan.meta["provenance"]["imatrix"]
    assert record["file"] == str(kept.resolve()) and outcome.table.meta["importance_sha256"] == \
        record["importance_sha256"]
    plain = run_plan(stories, **common)
    q4 = outcome.table.options.index("q4_0")
    assert not np.allclose(outcome.table.kl[:, q4], plain.table.kl[:, q4], equal_nan=True), \
        "the importance matrix changed no entry of the table"
    with pytest.raises(LayerwiseError, match="measured with importance matrix .* asks for no importance matrix"):
        run_plan(stories, table=tmp_path / "sens.json", **common)
    # quantize (and so eval and export) of the plan takes the plan's importance matrix by itself
    _, stored, _ = run_quantize(copy.deepcopy(stories), Plan.load(tmp_path / "plan.json"), progress=False)
    name = next(n for n, q in stored.items() if q.config.format == "q4_0")
    weight = linear_weight(stories.model.get_submodule(name)).detach()
    tensor = f"blk.{name.split('.')[2]}.{GGUF_NAME[name.split('.')[-1]]}.weight"
    assert np.array_equal(stored[name].packed, gguf_blocks.quantize(weight, "Q4_0", imatrix.importance(tensor)))
    # The table's own options serve a plan that names none; a plan that no longer rounds a GGUF
    # type (here overridden to int8) carries its importance matrix unused, without complaint.
    again = run_plan(stories, imatrix=kept, table=tmp_path / "sens.json", **(common | {"options": None}))
    assert again.table.options == outcome.table.options
    _, _, _ = run_quantize(copy.deepcopy(stories), Plan.load(tmp_path / "plan.json").override(
        "re:.*", QuantConfig("int", 8, None)), progress=False)
    kept.unlink()
    with pytest.raises(LayerwiseError, match="which is gone; pass --imatrix"):
        run_quantize(copy.deepcopy(stories), Plan.load(tmp_path / "plan.json"), progress=False)
    with pytest.raises(LayerwiseError, match="none of the plan's options is one"):
        run_plan(stories, bits_per_weight=6.0, options="int4pc,int8pc", imatrix=path, progress=False)


GGUF_NAME = {"q_proj": "attn_q", "k_proj": "attn_k", "v_proj": "attn_v", "o_proj": "attn_output",
             "gate_proj": "ffn_gate", "up_proj": "ffn_up"}


def test_the_heads_entry_weights_the_embedding_tied_to_it(stories, tmp_path):
    from layerwise.measure.run import plan_importance
    from layerwise.models.layout import head_is_tied

    embed, down = stories.adapter.embed, "re:.*down_proj"
    assert head_is_tied(stories.model, stories.adapter)
    windows = imatrix_windows(stories.tokenizer, CALIBRATION_TEXT, ctx=64, chunks=2)
    with_head = collect_imatrix(stories, windows, include_output=True, progress=False)
    without = collect_imatrix(stories, windows, progress=False)
    head_importance = with_head.importance("output.weight")
    found = importance_for(stories, with_head, ["model.layers.0.self_attn.q_proj"], head=True)
    np.testing.assert_array_equal(found[embed], head_importance)
    assert embed not in importance_for(stories, without, ["model.layers.0.self_attn.q_proj"], head=True)
    assert embed not in importance_for(stories, with_head, ["model.layers.0.self_attn.q_proj"])
    # a plan choosing the embedding's type measures it so, and quantize writes it so
    with_head.save(tmp_path / "imatrix.gguf")
    planned, _ = plan_importance(stories, "q4_0", "linear", tmp_path / "imatrix.gguf")
    np.testing.assert_array_equal(planned[embed], head_importance)
    plan = Plan(QuantConfig("q8_0")).override(down, QuantConfig("int", 8, None)).override(embed, QuantConfig("q4_0"))
    weight = stories.model.get_submodule(embed).weight.detach().clone()
    _, weighted, _ = run_quantize(copy.deepcopy(stories), plan, imatrix=with_head, progress=False)
    _, plain, _ = run_quantize(copy.deepcopy(stories), plan, imatrix=without, progress=False)
    assert np.array_equal(weighted[embed].packed, gguf_blocks.quantize(weight, "Q4_0", head_importance))
    assert np.array_equal(plain[embed].packed, gguf_blocks.quantize(weight, "Q4_0"))
    assert not np.array_equal(weighted[embed].packed, plain[embed].packed)
