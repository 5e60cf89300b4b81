"""The compressed-tensors (pack-quantized) export, loaded by transformers' standard loader."""
import json
import subprocess
import sys

import pytest
import torch

from conftest import CALIBRATION_TEXT, STORIES
from layerwise import load_model
from layerwise.apply.run import run_quantize
from layerwise.errors import LayerwiseError
from layerwise.export.run import run_export
from layerwise.plan import Plan
from layerwise.quant import QuantConfig
from test_cli import assert_one_line_error, layerwise

# End to end through the CLI or fresh processes: left out of the quick tier (-m "not slow").
pytestmark = pytest.mark.slow

MIXED = Plan(QuantConfig("int", 4, 32)).override("re:.*mlp.down_proj", QuantConfig("int", 8, 4)).override(
    "re:.*layers.0.self_attn.*", QuantConfig("int", 3, None))
PROMPT = [[1, 50, 60, 70, 80, 90, 100, 7, 9]]

LOAD_IN_A_FRESH_PROCESS = """
import json, sys, torch
from transformers import AutoModelForCausalLM
model = AutoModelForCausalLM.from_pretrained(sys.argv[1], dtype=torch.float32)
packed = str(model.model.layers[1].mlp.down_proj.weight_packed.dtype)  # as loaded, before any forward
with torch.no_grad():
    logits = model(torch.tensor(json.loads(sys.argv[2]))).logits
print(json.dumps({"logits": logits.flatten().tolist(), "packed": packed}))
"""


def _logits_in_a_fresh_process(folder) -> tuple[torch.Tensor, str]:
    done = subprocess.run([sys.executable, "-c", LOAD_IN_A_FRESH_PROCESS, str(folder), json.dumps(PROMPT)],
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads(done.stdout.strip().splitlines()[-1])
    return torch.tensor(result["logits"]), result["packed"]


@pytest.mark.parametrize("method", ["rtn", "gptq"])
def test_packed_checkpoint_loads_with_transformers_and_gives_our_logits(method, tmp_path):
    plan = Plan(MIXED.default.replace(algorithm=method), tuple((pattern, config.replace(algorithm=method))
                                                               for pattern, config in MIXED.rules))
    report = run_export(STORIES, format="compressed-tensors", plan=plan, calib=CALIBRATION_TEXT, tokens=2048,
                        out=tmp_path / "packed", progress=False)
    assert report["planned_tensor_bytes"] == report["predicted_sizes"]["linear_bytes"]
    config = json.loads((tmp_path / "packed" / "config.json").read_text())["quantization_config"]
    assert config["quant_method"] == "compressed-tensors" and len(config["config_groups"]) == 3

    ours, _, _ = run_quantize(load_model(STORIES), plan, calib=CALIBRATION_TEXT, tokens=2048, progress=False)
    with torch.no_grad():
        expected = ours.model(torch.tensor(PROMPT)).logits.flatten()
    theirs, packed_dtype = _logits_in_a_fresh_process(tmp_path / "packed")
    assert packed_dtype == "torch.int32"  # loaded packed: transformers ran compressed-tensors' path
    assert torch.equal(theirs, expected)


@pytest.mark.parametrize("config, message", [
    (QuantConfig("int", 4, 4, symmetric=False), "has no compressed-tensors pack-quantized form"),
    (QuantConfig("nf4", group_size=4), "has no compressed-tensors pack-quantized form"),
    (QuantConfig("int", 4, 4, algorithm="awq"), "AWQ's per-channel input scales"),
])
def test_formats_it_cannot_hold_are_refused_by_module(config, message, tmp_path):
    with pytest.raises(LayerwiseError, match=message):
        run_export(STORIES, format="compressed-tensors", plan=Plan(config), out=tmp_path / "x", progress=False)
    assert not (tmp_path / "x").exists()


def test_cli_compressed_tensors_export(tmp_path):
    plan = MIXED.save(tmp_path / "plan.json")
    done = layerwise("export", STORIES, "--plan", plan, "--format", "compressed-tensors", "--out", tmp_path / "p",
                     "--quiet")
    assert done.returncode == 0, done.stderr
    assert (tmp_path / "p" / "model.safetensors").exists()
    done = layerwise("export", STORIES, "--plan", plan, "--format", "compressed-tensors", "--out", tmp_path / "p",
                     "--quiet")
    assert_one_line_error(done, "already exists")
