"""The bad-input suite: each case is one line on stderr naming the problem, exit code 2, and no
output written. The README's "Failure modes" section lists the same cases."""
from __future__ import annotations

import json
import os
import shutil
import struct

import pytest
import torch
import transformers
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM

from conftest import CALIBRATION_TEXT, SMOLLM2, STORIES
from test_cli import assert_one_line_error, layerwise

# End to end through the CLI or fresh processes: left out of the quick tier (-m "not slow").
pytestmark = pytest.mark.slow


def copy_of_stories(tmp_path, name: str):
    folder = tmp_path / name
    shutil.copytree(STORIES, folder)
    for path in folder.iterdir():
        path.chmod(0o644)
    return folder


def with_weight(tmp_path, name: str, value: float):
    folder = copy_of_stories(tmp_path, name)
    weights = load_file(folder / "model.safetensors")
    weights["model.layers.2.mlp.up_proj.weight"][3, 5] = value
    save_file(weights, folder / "model.safetensors", metadata={"format": "pt"})
    return folder


def truncated_safetensors(tmp_path):
    folder = copy_of_stories(tmp_path, "truncated")
    data = (folder / "model.safetensors").read_bytes()
    (folder / "model.safetensors").write_bytes(data[:len(data) // 2])
    return folder


def corrupt_safetensors_header(tmp_path):
    folder = copy_of_stories(tmp_path, "corrupt")
    data = bytearray((folder / "model.safetensors").read_bytes())
    (header_length,) = struct.unpack_from("<Q", data)
    data[8 + header_length // 2] = ord("}")
    (folder / "model.safetensors").write_bytes(bytes(data))
    return folder


def gguf_prefix(tmp_path, name: str, length: int):
    path = tmp_path / name
    with open(SMOLLM2, "rb") as source:
        path.write_bytes(source.read(length))
    return path


def gguf_with_unknown_tensor_type(tmp_path):
    data = bytearray(SMOLLM2.read_bytes())
    name = b"blk.0.attn_q.weight"
    at = data.index(struct.pack("<Q", len(name)) + name) + 8 + len(name)
    (n_dims,) = struct.unpack_from("<I", data, at)
    struct.pack_into("<I", data, at + 4 + 8 * n_dims, 77)
    path = tmp_path / "bad-type.gguf"
    path.write_bytes(bytes(data))
    return path


def pickle_that_runs_code(tmp_path):
    folder = tmp_path / "pickled"
    folder.mkdir()
    for name in ("config.json", "tokenizer.json", "tokenizer.model", "tokenizer_config.json"):
        shutil.copy(STORIES / name, folder / name)
    weights = load_file(STORIES / "model.safetensors")

    class Payload:
        def __reduce__(self):
            return (shutil.copy, (str(STORIES / "config.json"), str(tmp_path / "PAYLOAD_RAN")))

    weights["payload"] = Payload()
    torch.save(weights, folder / "pytorch_model.bin")
    return folder


def plan_for_another_model(tmp_path):
    from layerwise.plan import Plan
    from layerwise.quant import QuantConfig

    plan = Plan(QuantConfig("int", 4, None), model_fingerprint="f" * 64)
    return plan.save(tmp_path / "other-plan.json")


def bloom_folder(tmp_path):
    config = transformers.BloomConfig(hidden_size=16, n_layer=1, n_head=2, vocab_size=64)
    AutoModelForCausalLM.from_config(config).save_pretrained(tmp_path / "bloom")
    return tmp_path / "bloom"


def text_file(tmp_path, name: str, text: str):
    (tmp_path / name).write_text(text)
    return tmp_path / name


def not_a_model_folder(tmp_path):
    (tmp_path / "notes").mkdir()
    (tmp_path / "notes" / "README.txt").write_text("no model here")
    return tmp_path / "notes"


# case -> (function of tmp_path giving the arguments after the command, the message it must name)
CASES = {
    "missing model": (lambda t: ["profile", t / "no-such-model"], "does not exist"),
    "hub id that cannot be fetched": (lambda t: ["profile", "someone/model-that-does-not-exist"],
                                      "could not load 'someone/model-that-does-not-exist' from the Hugging Face hub"),
    "not a model folder": (lambda t: ["profile", not_a_model_folder(t)], "is not a model folder"),
    "truncated safetensors": (lambda t: ["profile", truncated_safetensors(t)], "is truncated or corrupt"),
    "corrupt safetensors header": (lambda t: ["profile", corrupt_safetensors_header(t)], "is truncated or corrupt"),
    "GGUF truncated in the header": (lambda t: ["profile", gguf_prefix(t, "h.gguf", 1000)], "GGUF header of"),
    "GGUF truncated in the tensor table": (lambda t: ["profile", gguf_prefix(t, "t.gguf", 1_780_000)],
                                           "GGUF tensor table of"),
    "GGUF truncated in the data": (lambda t: ["profile", gguf_prefix(t, "d.gguf", 60_000_000)],
                                   "lies beyond the end of the 60,000,000-byte file"),
    "GGUF with a corrupt tensor type": (lambda t: ["profile", gguf_with_unknown_tensor_type(t)], "unknown type 77"),
    "not a GGUF": (lambda t: ["profile", text_file(t, "fake.gguf", "hello")], "is not a GGUF file"),
    "pickle that runs code": (lambda t: ["profile", pickle_that_runs_code(t)], "refusing to unpickle"),
    "unknown architecture": (lambda t: ["profile", bloom_folder(t)], "unknown architecture 'bloom'"),
    "NaN weights": (lambda t: ["profile", with_weight(t, "nan", float("nan"))], "has 1 NaN or Inf values"),
    "Inf weights": (lambda t: ["profile", with_weight(t, "inf", float("inf"))], "has 1 NaN or Inf values"),
    "empty text": (lambda t: ["profile", STORIES, "--data", text_file(t, "empty.txt", "")], "is empty"),
    "text shorter than one window": (lambda t: ["profile", STORIES, "--data", text_file(t, "s.txt", "Too short.")],
                                     "windows of 512"),
    "impossible budget": (lambda t: ["plan", STORIES, "--budget", "1.0", "--options", "int2pc,int4pc",
                                     "--tokens", "512"], "below the smallest plan"),
    "plan for a different model": (lambda t: ["quantize", STORIES, "--plan", plan_for_another_model(t)],
                                   "the plan was made for a model with fingerprint"),
    "unwritable output directory": (lambda t: ["profile", STORIES, "--out", "/proc/layerwise-out"], "is not writable"),
    "output under a file": (lambda t: ["profile", STORIES, "--out", text_file(t, "a-file", "") / "run"],
                            "is not a directory"),
}


@pytest.mark.parametrize("case", list(CASES))
def test_bad_input(case, tmp_path):
    make_args, pattern = CASES[case]
    args = make_args(tmp_path)
    out = tmp_path / "out"
    extra = [] if "--out" in args else ["--out", out]
    before = sorted(p.name for p in tmp_path.iterdir())
    # Offline, so that the hub case never reaches the network (and no case depends on it).
    done = layerwise(*args, *extra, "--quiet", env=dict(os.environ, HF_HUB_OFFLINE="1"))
    assert_one_line_error(done, pattern)
    assert not out.exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == before  # nothing written, nothing left behind
    assert not (tmp_path / "PAYLOAD_RAN").exists()


@pytest.mark.parametrize("command", [
    ["profile", STORIES, "--tokens", "512", "--seq-len", "128", "--no-weights"],
    ["pareto", "TABLE"],
    ["eval", STORIES, "--data", CALIBRATION_TEXT, "--tokens", "512", "--seq-len", "128", "--json"],
])
def test_an_existing_output_is_refused_unless_overwrite(command, tmp_path):
    target = tmp_path / ("old.json" if command[-1] == "--json" else "old")
    if command[-1] == "--json":
        target.write_text("{}")
    else:
        target.mkdir()
        (target / "keep.txt").write_text("older run")
    if "TABLE" in command:
        table = tmp_path / "table.json"
        done = layerwise("plan", STORIES, "--budget", "4", "--options", "int2pc,int4pc", "--tokens", "512",
                         "--fitness-tokens", "512", "--allocator", "exact", "--table", table, "--quiet")
        assert done.returncode == 0, done.stderr
        command = [table if part == "TABLE" else part for part in command]
    out_flag = [] if command[-1] == "--json" else ["--out"]
    quiet = [] if command[0] == "pareto" else ["--quiet"]
    done = layerwise(*command, *out_flag, target, *quiet)
    assert_one_line_error(done, "already exists; pass --overwrite")
    assert (target.read_text() == "{}") if target.is_file() else (target / "keep.txt").exists()
    done = layerwise(*command, *out_flag, target, "--overwrite", *quiet)
    assert done.returncode == 0, done.stderr
    if target.is_file():
        assert "base" in json.loads(target.read_text())
