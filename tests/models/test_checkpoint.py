"""Reading a safetensors folder a block at a time (`read_model`) gives exactly what transformers'
`from_pretrained` gives, for every dense family; checkpoints it cannot map one to one are left to
transformers."""
from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import AutoConfig, AutoModelForCausalLM

from layerwise.models import ADAPTERS, load_model
from layerwise.models import loading
from layerwise.models.checkpoint import read_model
from conftest import STORIES
from test_adapters import tiny_model


def _same_as_transformers(folder, dtype=torch.float32):
    config = AutoConfig.from_pretrained(folder)
    ours = read_model(config, folder, dtype, "cpu")
    assert ours is not None
    theirs = AutoModelForCausalLM.from_pretrained(folder, dtype=dtype).eval()
    mine, reference = ours.state_dict(), theirs.state_dict()
    assert set(mine) == set(reference)
    for name, tensor in reference.items():
        assert mine[name].dtype == tensor.dtype, name
        assert torch.equal(mine[name], tensor), name
    ids = torch.randint(0, config.vocab_size, (2, 9), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.equal(ours(input_ids=ids).logits, theirs(input_ids=ids).logits)
    assert (ours.get_output_embeddings().weight is ours.get_input_embeddings().weight) == \
        (theirs.get_output_embeddings().weight is theirs.get_input_embeddings().weight)
    return ours


@pytest.mark.parametrize("model_type", sorted(name for name, adapter in ADAPTERS.items() if not adapter.experts))
def test_every_family_reads_as_transformers_loads_it(model_type, tmp_path):
    tiny_model(model_type).save_pretrained(tmp_path)
    _same_as_transformers(tmp_path)


@pytest.mark.parametrize("model_type", sorted(name for name, adapter in ADAPTERS.items() if adapter.experts))
def test_moe_checkpoints_load_as_transformers_loads_them(model_type, tmp_path):
    """Most MoE checkpoints keep one tensor per expert, which transformers fuses on loading: those
    are left to its loader (gpt-oss stores them fused, and is read directly). Either way,
    load_model's model (experts split) gives transformers' logits."""
    tiny_model(model_type).save_pretrained(tmp_path)
    direct = read_model(AutoConfig.from_pretrained(tmp_path), tmp_path, torch.float32, "cpu")
    assert (direct is None) == (model_type != "gpt_oss")
    theirs = AutoModelForCausalLM.from_pretrained(tmp_path, dtype=torch.float32).eval()
    ours = load_model(tmp_path, dtype="float32", tokenizer=object())  # the folder has no tokenizer
    ids = torch.randint(3, 128, (2, 9), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(ours.model(input_ids=ids).logits, theirs(input_ids=ids).logits,
                                   rtol=1e-5, atol=1e-5)


def test_float16_checkpoint_read_as_float32_and_bfloat16(tmp_path):
    tiny_model("llama").to(torch.float16).save_pretrained(tmp_path)
    assert next(_same_as_transformers(tmp_path).parameters()).dtype == torch.float32
    assert next(_same_as_transformers(tmp_path, torch.bfloat16).parameters()).dtype == torch.bfloat16


def test_checkpoints_that_need_transformers_are_left_to_it(tmp_path):
    tiny_model("llama").save_pretrained(tmp_path)
    weights = tmp_path / "model.safetensors"
    tensors = load_file(weights)
    config = AutoConfig.from_pretrained(tmp_path)
    # A tensor under a name the model does not use (transformers renames some; we do not guess).
    renamed = {name.replace("q_proj", "query"): tensor for name, tensor in tensors.items()}
    save_file(renamed, weights, metadata={"format": "pt"})
    assert read_model(config, tmp_path, torch.float32, "cpu") is None
    save_file(tensors, weights, metadata={"format": "pt"})
    assert read_model(config, tmp_path, torch.float32, "cpu") is not None
    # A quantized checkpoint.
    document = json.loads((tmp_path / "config.json").read_text())
    document["quantization_config"] = {"quant_method": "gptq", "bits": 4}
    (tmp_path / "config.json").write_text(json.dumps(document))
    assert read_model(AutoConfig.from_pretrained(tmp_path), tmp_path, torch.float32, "cpu") is None


def test_load_model_reads_a_folder_itself(monkeypatch):
    used = []

    def spy(*args, **kwargs):
        model = read_model(*args, **kwargs)
        used.append(model is not None)
        return model

    monkeypatch.setattr(loading, "read_model", spy)
    loaded = load_model(STORIES)
    assert used == [True]
    assert loaded.describe()["dtype"] == "float32"


def test_a_tied_head_stored_apart_is_left_to_transformers(tmp_path):
    """A checkpoint that stores a head unlike its tied embedding: transformers decides (it may
    leave them untied); reading the embedding alone and tying would give another model."""
    model = tiny_model("llama", tie_word_embeddings=True)
    model.save_pretrained(tmp_path)
    weights = tmp_path / "model.safetensors"
    tensors = load_file(weights)
    assert "lm_head.weight" not in tensors
    tensors["lm_head.weight"] = torch.randn_like(tensors["model.embed_tokens.weight"])
    save_file(tensors, weights, metadata={"format": "pt"})
    assert read_model(AutoConfig.from_pretrained(tmp_path), tmp_path, torch.float32, "cpu") is None
