"""GGUF export of a Hugging Face model, through llama.cpp's own convert_hf_to_gguf.py.

The converter is not a dependency: .ci/run unpacks it from the llama-cpp-python sdist and points
LAYERWISE_CONVERT_HF_TO_GGUF at it. The refusals below need no converter.
"""
import os
import stat

import numpy as np
import pytest
import torch

from conftest import STORIES, require_tool
from layerwise import load_model
from layerwise.apply.run import run_quantize
from layerwise.errors import LayerwiseError
from layerwise.export.convert import CONVERTER_ENV
from layerwise.export.run import run_export
from layerwise.models.layout import block_linears, linear_weight
from layerwise.plan import Plan
from layerwise.quant import QuantConfig
from test_cli import assert_one_line_error, layerwise

# End to end through the CLI or fresh processes: left out of the quick tier (-m "not slow").
pytestmark = pytest.mark.slow

# stories260K's rows are 64 wide except down_proj's 172, which no GGUF block type divides: it stays f32.
MIXED = (Plan(None).override("re:.*(q|v|o|gate|up)_proj", QuantConfig("q8_0"))
         .override("re:.*k_proj", QuantConfig("q4_0")).override("re:.*layers\\.[34]\\.mlp\\.(gate|up)_proj",
                                                                 QuantConfig("q5_1")))


@pytest.fixture(scope="module")
def converter():
    return require_tool("llama.cpp's convert_hf_to_gguf.py", os.environ.get(CONVERTER_ENV),
                        f"{CONVERTER_ENV} is not set; .ci/run sets it to the converter it unpacks")


@pytest.fixture(scope="module")
def exported(converter, tmp_path_factory):
    out = tmp_path_factory.mktemp("hf-gguf") / "stories-mixed.gguf"
    report = run_export(STORIES, plan=MIXED, out=out, converter=converter, progress=False)
    ours = load_model(STORIES)
    _, stored, _ = run_quantize(ours, MIXED, progress=False)
    return out, report, ours, stored


def test_streamed_export_writes_the_same_file(exported, converter, tmp_path):
    out, report, _, _ = exported
    streamed = run_export(STORIES, plan=MIXED, out=tmp_path / "streamed.gguf", converter=converter, streaming=True,
                          progress=False)
    assert (tmp_path / "streamed.gguf").read_bytes() == out.read_bytes()
    assert streamed["tensors_by_type"] == report["tensors_by_type"]


def test_gguf_from_hf_reads_back_as_the_weights_we_evaluated(exported):
    out, report, ours, stored = exported
    back = load_model(out)  # transformers' GGUF loader (it un-permutes q and k)
    pairs = zip(block_linears(ours.model, ours.adapter), block_linears(back.model, back.adapter))
    for (_, name, mine), (_, _, theirs) in pairs:
        assert np.array_equal(linear_weight(mine).detach().numpy(), linear_weight(theirs).detach().numpy()), name
    for (name, mine), theirs in zip(ours.model.state_dict().items(), back.model.state_dict().values()):
        assert torch.equal(mine, theirs), name  # norms and embeddings too: the converter kept float32
    ids = torch.tensor([[1, 300, 301, 302, 303, 40, 41]])
    with torch.no_grad():
        torch.testing.assert_close(back.model(input_ids=ids).logits, ours.model(input_ids=ids).logits,
                                   rtol=0, atol=0)
    assert report["planned_tensor_bytes"] == sum(q.n_bits for q in stored.values()) // 8
    assert report["tensors_by_type"] == {"Q8_0": 21, "Q4_0": 5, "Q5_1": 4, "F32": 17}


def test_gguf_from_hf_matches_gguf_py_and_keeps_the_tokenizer(exported):
    import gguf

    out, report, ours, _ = exported
    reader = gguf.GGUFReader(out)
    tensors = {t.name: t for t in reader.tensors}
    for gguf_name, module, kind in (("blk.3.ffn_up.weight", ours.model.model.layers[3].mlp.up_proj, "Q5_1"),
                                    ("blk.0.attn_v.weight", ours.model.model.layers[0].self_attn.v_proj, "Q8_0")):
        tensor = tensors[gguf_name]
        assert tensor.tensor_type == getattr(gguf.GGMLQuantizationType, kind)
        np.testing.assert_array_equal(gguf.quants.dequantize(tensor.data, tensor.tensor_type),
                                      linear_weight(module).detach().numpy())
    assert str(reader.fields["general.architecture"].contents()) == "llama"
    assert str(reader.fields["tokenizer.ggml.model"].contents()) == "llama"  # SentencePiece, as llama.cpp names it
    assert len(reader.fields["tokenizer.ggml.tokens"].contents()) == 512
    assert "--tensor-type blk.0.attn_k=q4_0" in report["llama_quantize_args"]
    assert report["converted_by"].endswith("convert_hf_to_gguf.py")


def test_export_cli_converts_a_hugging_face_folder(converter, tmp_path):
    plan = MIXED.save(tmp_path / "plan.json")
    done = layerwise("export", STORIES, "--plan", plan, "--out", tmp_path / "s.gguf", "--converter", converter,
                     "--quiet")
    assert done.returncode == 0, done.stderr
    assert "converted the Hugging Face model with" in done.stdout and (tmp_path / "s.gguf").stat().st_size > 0


def test_gguf_from_hf_without_a_converter_is_refused_before_any_work(tmp_path, monkeypatch):
    monkeypatch.delenv(CONVERTER_ENV, raising=False)
    monkeypatch.setenv("PATH", str(tmp_path))  # no convert_hf_to_gguf.py on PATH either
    with pytest.raises(LayerwiseError, match="no GGUF converter found"):
        run_export(STORIES, plan=MIXED, out=tmp_path / "x.gguf", progress=False)
    with pytest.raises(LayerwiseError, match="converter .* not found"):
        run_export(STORIES, plan=MIXED, out=tmp_path / "x.gguf", converter=tmp_path / "nowhere", progress=False)
    assert not (tmp_path / "x.gguf").exists()


def test_a_failing_converter_leaves_nothing_behind(tmp_path):
    broken = tmp_path / "convert_hf_to_gguf.py"
    broken.write_text("import sys\nprint('ERROR:hf-to-gguf:Model FancyForCausalLM is not supported', "
                      "file=sys.stderr)\nsys.exit(1)\n")
    broken.chmod(broken.stat().st_mode | stat.S_IXUSR)
    old = tmp_path / "old.gguf"
    old.write_bytes(b"an older export")
    with pytest.raises(LayerwiseError, match="could not convert .*FancyForCausalLM is not supported"):
        run_export(STORIES, plan=MIXED, out=old, converter=tmp_path, overwrite=True, progress=False)
    assert old.read_bytes() == b"an older export"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["convert_hf_to_gguf.py", "old.gguf"]
    done = layerwise("export", STORIES, "--plan", MIXED.save(tmp_path / "plan.json"), "--out", tmp_path / "n.gguf",
                     "--converter", broken, "--quiet")
    assert_one_line_error(done, "FancyForCausalLM is not supported")
    assert not (tmp_path / "n.gguf").exists()
