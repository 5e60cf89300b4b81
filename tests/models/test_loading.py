from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch
import transformers
from transformers import AutoModelForCausalLM

from conftest import SMOLLM2, STORIES
from layerwise import LayerwiseError, load_model
from layerwise.models import resolve_source


def test_local_folder_loads_with_adapter(stories):
    assert stories.source.kind == "folder"
    assert stories.model_type == "llama"
    assert stories.n_blocks == 5
    assert stories.describe()["dtype"] == "float32"
    assert len(stories.fingerprint) == 64
    assert not stories.model.training


def test_gguf_file_and_folder_resolve_to_the_same_source():
    by_file = resolve_source(SMOLLM2)
    by_folder = resolve_source(SMOLLM2.parent)
    assert by_file == by_folder
    assert by_file.kind == "gguf" and by_file.gguf_file == SMOLLM2.name


def test_hub_ids_are_recognised_and_local_paths_are_not():
    assert resolve_source("HuggingFaceTB/SmolLM2-135M").kind == "hub"
    assert resolve_source("gpt2").kind == "hub"
    for missing in ("/no/such/model", "./missing", "models/a/b", "missing.gguf"):
        with pytest.raises(LayerwiseError, match="does not exist"):
            resolve_source(missing)


def test_hub_offline_is_a_clear_error():
    code = "from layerwise import load_model; load_model('someorg/no-such-model')"
    env = dict(os.environ, HF_HUB_OFFLINE="1")
    done = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode != 0
    assert "LayerwiseError: could not load 'someorg/no-such-model' from the Hugging Face hub" in done.stderr


def test_folder_without_model_is_rejected(tmp_path):
    (tmp_path / "notes.txt").write_text("hello")
    with pytest.raises(LayerwiseError, match="not a model folder"):
        load_model(tmp_path)
    with pytest.raises(LayerwiseError, match="not a .gguf"):
        load_model(tmp_path / "notes.txt")


def test_unknown_architecture_fails_before_loading_weights(tmp_path):
    config = transformers.BloomConfig(hidden_size=16, n_layer=1, n_head=2, vocab_size=64)
    AutoModelForCausalLM.from_config(config).save_pretrained(tmp_path)
    with pytest.raises(LayerwiseError, match=r"unknown architecture 'bloom'; supported: .*llama"):
        load_model(tmp_path)


def test_corrupt_config_is_a_clear_error(tmp_path):
    (tmp_path / "config.json").write_text("{ not json")
    with pytest.raises(LayerwiseError, match="cannot load the model config"):
        load_model(tmp_path)


def test_dtype_choice_is_applied_and_validated():
    loaded = load_model(STORIES, dtype="bfloat16")
    assert next(loaded.model.parameters()).dtype == torch.bfloat16
    with pytest.raises(LayerwiseError, match="unknown dtype"):
        load_model(STORIES, dtype="float8")


def test_asking_for_a_gpu_without_one_is_a_clear_error():
    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    with pytest.raises(LayerwiseError, match="no CUDA GPU"):
        load_model(STORIES, device="cuda")


@pytest.mark.slow
def test_gguf_loads_through_transformers(smollm2):
    assert smollm2.source.kind == "gguf"
    assert smollm2.n_blocks == 30
    # The shared README's sha256 of the file: the fingerprint of a GGUF is the file's hash.
    assert smollm2.fingerprint == "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"
    config = smollm2.model.config
    assert (config.hidden_size, config.num_attention_heads, config.num_key_value_heads) == (576, 9, 3)


def test_a_model_too_large_for_the_free_memory_is_streamed(monkeypatch, capsys):
    from layerwise.models import loading

    assert loading.weights_bytes(loading.resolve_source(STORIES), torch.float32) == 4 * sum(
        p.numel() for p in load_model(STORIES).model.parameters())
    monkeypatch.setattr(loading, "free_memory", lambda device: 10**12)
    assert load_model(STORIES, streaming=None).streamed is None
    monkeypatch.setattr(loading, "free_memory", lambda device: 10**5)
    streamed = load_model(STORIES, streaming=None)
    assert streamed.streamed is not None
    assert "streaming it" in capsys.readouterr().err
    assert load_model(STORIES, streaming=False).streamed is None  # asked for in memory: in memory


def test_cli_streams_a_model_too_large_unless_told_not_to(monkeypatch, tmp_path):
    from layerwise.cli import main
    from layerwise.models import loading

    monkeypatch.setattr(loading, "free_memory", lambda device: 10**5)
    chosen = []
    real = loading.load_model

    def spy(*args, **kwargs):
        loaded = real(*args, **kwargs)
        chosen.append(loaded.streamed is not None)
        return loaded

    monkeypatch.setattr("layerwise.profile.runner.load_model", spy)
    for flag, out in (([], "a"), (["--no-streaming"], "b")):
        assert main(["profile", str(STORIES), "--tokens", "256", "--out", str(tmp_path / out), "--quiet", *flag]) == 0
    assert chosen == [True, False]
