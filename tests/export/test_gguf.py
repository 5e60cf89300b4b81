"""GGUF export read back by loaders we did not write: gguf-py and transformers' GGUF loader."""
import json

import numpy as np
import pytest

from conftest import SMOLLM2, STORIES
from layerwise import load_model
from layerwise.apply.run import run_quantize
from layerwise.errors import LayerwiseError
from layerwise.export.run import run_export
from layerwise.models.layout import block_linears, linear_weight
from layerwise.plan import Plan
from layerwise.quant import QuantConfig
from test_cli import assert_one_line_error, layerwise

MIXED = Plan(QuantConfig("q4_0")).override("re:.*down_proj", QuantConfig("q8_0")).override(
    "re:.*self_attn.k_proj", QuantConfig("q5_1"))


@pytest.mark.slow
def test_mixed_gguf_reads_back_as_the_weights_we_evaluated(tmp_path):
    import gguf

    report = run_export(SMOLLM2, plan=MIXED, out=tmp_path / "mixed.gguf", progress=False)
    assert report["planned_tensor_bytes"] == report["predicted_sizes"]["linear_bytes"]
    assert report["tensors_by_type"]["Q5_1"] == 30 and report["tensors_by_type"]["Q4_0"] >= 150
    ours = load_model(SMOLLM2)
    run_quantize(ours, MIXED, progress=False)
    back = load_model(tmp_path / "mixed.gguf")  # transformers' GGUF loader (it un-permutes q and k)
    for (_, name, mine), (_, _, theirs) in zip(block_linears(ours.model, ours.adapter),
                                               block_linears(back.model, back.adapter)):
        assert np.array_equal(linear_weight(mine).detach().numpy(), linear_weight(theirs).detach().numpy()), name
    reader = gguf.GGUFReader(tmp_path / "mixed.gguf")
    tensor = next(t for t in reader.tensors if t.name == "blk.7.ffn_down.weight")
    assert tensor.tensor_type == gguf.GGMLQuantizationType.Q8_0
    np.testing.assert_array_equal(gguf.quants.dequantize(tensor.data, tensor.tensor_type),
                                  linear_weight(ours.model.model.layers[7].mlp.down_proj).detach().numpy())
    source = gguf.GGUFReader(SMOLLM2)
    assert str(reader.fields["tokenizer.ggml.model"].contents()) == str(source.fields["tokenizer.ggml.model"].contents())
    assert len(reader.fields["tokenizer.ggml.tokens"].contents()) == len(source.fields["tokenizer.ggml.tokens"].contents())
    assert "--tensor-type blk.0.attn_k=q5_1" in report["llama_quantize_args"]


def test_gguf_export_refuses_what_gguf_cannot_hold(tmp_path):
    # stories260K's down_proj rows are 172 wide, no multiple of Q8_0's 32: refused before the
    # converter runs (this stand-in would leave a mark) and before anything is written.
    mark = tmp_path / "converter-ran"
    (tmp_path / "convert_hf_to_gguf.py").write_text(f"open({str(mark)!r}, 'w').close()\n")
    with pytest.raises(LayerwiseError, match="down_proj.*172"):
        run_export(STORIES, plan=Plan(QuantConfig("q8_0")), out=tmp_path / "x.gguf", converter=tmp_path,
                   progress=False)
    with pytest.raises(LayerwiseError, match="GGUF stores only its own block types"):
        run_export(STORIES, plan=Plan(QuantConfig("int", 4, None)), out=tmp_path / "x.gguf", converter=tmp_path,
                   progress=False)
    assert not (tmp_path / "x.gguf").exists() and not mark.exists()


@pytest.mark.slow
def test_export_cli_refuses_non_gguf_formats(tmp_path):
    plan = Plan(QuantConfig("int", 4, 64)).save(tmp_path / "plan.json")
    done = layerwise("export", SMOLLM2, "--plan", plan, "--out", tmp_path / "x.gguf", "--quiet")
    assert_one_line_error(done, "GGUF stores only its own block types")
    assert not (tmp_path / "x.gguf").exists()


def test_hf_export_of_a_quantized_directory_loads_with_plain_transformers(tmp_path):
    import torch
    from transformers import AutoModelForCausalLM

    done = layerwise("quantize", STORIES, "--bits", "4", "--group-size", "none", "--out", tmp_path / "q", "--quiet")
    assert done.returncode == 0, done.stderr
    report = run_export(STORIES, format="hf", quantized=tmp_path / "q", out=tmp_path / "hf", progress=False)
    assert (tmp_path / "hf" / "plan.json").exists() and report["file_bytes"] > 0
    ours = load_model(STORIES)
    from layerwise.apply.storage import apply_quantized, load_quantized

    apply_quantized(ours, *load_quantized(tmp_path / "q"))
    plain = AutoModelForCausalLM.from_pretrained(tmp_path / "hf")
    ids = torch.tensor([[1, 300, 301, 302, 303]])
    with torch.no_grad():
        torch.testing.assert_close(plain(input_ids=ids).logits, ours.model(input_ids=ids).logits)
    assert json.loads((tmp_path / "hf" / "plan.json").read_text())["default"]["bits"] == 4
