"""The plain Hugging Face folder (`save_plain`, the "hf" export): what transformers' own
save_pretrained writes, from a model in memory or streamed from disk a part at a time."""
import json

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

from conftest import CALIBRATION_TEXT, SMOLLM2, STORIES
from layerwise import load_model
from layerwise.apply.run import run_quantize
from layerwise.export.run import run_export
from layerwise.models.saving import save_plain
from layerwise.plan import Plan
from layerwise.quant import QuantConfig

GPTQ_MIXED = Plan(QuantConfig("int", 4, 32, algorithm="gptq")).override(
    "re:.*mlp.down_proj", QuantConfig("int", 8, 4, algorithm="gptq"))


def _save_pretrained_as_before(loaded, folder):
    """What save_plain wrote before it wrote tensors a part at a time: transformers' save_pretrained
    (a GGUF-read model rebuilt without its quantization_config first)."""
    import copy

    config, model = copy.deepcopy(loaded.model.config), loaded.model
    if getattr(config, "quantization_config", None) is not None:
        del config.quantization_config
        model = AutoModelForCausalLM.from_config(config, dtype=next(loaded.model.parameters()).dtype)
        model.load_state_dict(loaded.model.state_dict())
    model.save_pretrained(folder)


@pytest.mark.parametrize("source", [STORIES, SMOLLM2], ids=["folder", "gguf"])
def test_save_plain_writes_what_save_pretrained_writes(source, tmp_path):
    loaded = load_model(source)
    _save_pretrained_as_before(loaded, tmp_path / "theirs")
    save_plain(loaded, tmp_path / "ours")
    theirs, ours = (load_file(tmp_path / name / "model.safetensors") for name in ("theirs", "ours"))
    assert sorted(ours) == sorted(theirs) and "lm_head.weight" not in ours  # the tied head written once
    for key, value in theirs.items():
        assert ours[key].dtype == value.dtype and torch.equal(ours[key], value), key
    for name in ("config.json", "generation_config.json"):
        assert json.loads((tmp_path / "ours" / name).read_text()) == json.loads((tmp_path / "theirs" / name).read_text())
    assert (tmp_path / "ours" / "tokenizer.json").exists()


@pytest.mark.slow  # GPTQ twice, and a third quantization to compare with
@pytest.mark.parametrize("drop", [(), ("model.layers.2.mlp",)])
def test_streamed_hf_export_writes_the_same_folder(drop, tmp_path):
    """Streamed, each part is held with its quantized weights (and a dropped unit's silenced
    projection) while its tensors are written: the same model.safetensors, byte for byte, which
    transformers loads to the quantized model's logits."""
    plan = Plan(GPTQ_MIXED.default, GPTQ_MIXED.rules, drop=drop)
    for name, streaming in (("whole", False), ("streamed", True)):
        run_export(STORIES, format="hf", plan=plan, calib=CALIBRATION_TEXT, tokens=1024, out=tmp_path / name,
                   streaming=streaming, progress=False)
    whole = (tmp_path / "whole" / "model.safetensors").read_bytes()
    assert (tmp_path / "streamed" / "model.safetensors").read_bytes() == whole
    assert json.loads((tmp_path / "streamed" / "plan.json").read_text()) == plan.to_dict()

    ours, _, _ = run_quantize(load_model(STORIES), plan, calib=CALIBRATION_TEXT, tokens=1024, progress=False)
    ids = torch.tensor([[1, 300, 301, 302, 303, 40, 41]])
    with torch.no_grad():
        expected = ours.model(input_ids=ids).logits
        theirs = AutoModelForCausalLM.from_pretrained(tmp_path / "streamed").eval()(input_ids=ids).logits
    torch.testing.assert_close(theirs, expected, rtol=0, atol=0)
