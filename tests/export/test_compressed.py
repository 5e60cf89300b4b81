"""The compressed-tensors (pack-quantized) export, loaded by transformers' standard loader."""
import json
import subprocess
import sys

import pytest
import torch
from transformers import AutoModelForCausalLM

from conftest import CALIBRATION_TEXT, STORIES
from layerwise import load_model
from layerwise.apply.run import run_quantize
from layerwise.errors import LayerwiseError
from layerwise.export.run import run_export
from layerwise.plan import Plan
from layerwise.quant import QuantConfig
from test_cli import assert_one_line_error, layerwise
from tiny_families import MOE_FAMILIES, save_tiny

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


@pytest.mark.parametrize("drop", [(), ("model.layers.2.mlp",)])
def test_streamed_export_writes_the_same_folder(drop, tmp_path):
    """Streamed, each part is read and written in turn and the codes come from the scratch file:
    the same model.safetensors, byte for byte (a dropped unit's silenced projection included)."""
    plan = Plan(MIXED.default.replace(algorithm="gptq"), tuple((pattern, config.replace(algorithm="gptq"))
                                                               for pattern, config in MIXED.rules), drop=drop)
    reports = [run_export(STORIES, format="compressed-tensors", plan=plan, calib=CALIBRATION_TEXT, tokens=1024,
                          out=tmp_path / name, streaming=streaming, progress=False)
               for name, streaming in (("whole", False), ("streamed", True))]
    whole, streamed = ((tmp_path / name / "model.safetensors").read_bytes() for name in ("whole", "streamed"))
    assert streamed == whole
    assert reports[0]["planned_tensor_bytes"] == reports[1]["planned_tensor_bytes"]
    assert json.loads((tmp_path / "streamed" / "config.json").read_text()) == \
        json.loads((tmp_path / "whole" / "config.json").read_text())


def test_streamed_export_of_an_untied_head_writes_the_same_file(tmp_path):
    """An untied head, like the embedding, is read and written a slice of rows at a time."""
    import shutil

    shutil.copytree(STORIES, tmp_path / "m")  # the tokenizer
    model = AutoModelForCausalLM.from_pretrained(STORIES)
    model.config.tie_word_embeddings = False
    model.lm_head.weight = torch.nn.Parameter(model.lm_head.weight.detach() * 0.5)
    model.save_pretrained(tmp_path / "m")
    plan = Plan(QuantConfig("int", 4, 4))
    for name, streaming in (("whole", False), ("streamed", True)):
        run_export(tmp_path / "m", format="compressed-tensors", plan=plan, out=tmp_path / name, streaming=streaming,
                   progress=False)
    whole = (tmp_path / "whole" / "model.safetensors").read_bytes()
    assert b"lm_head.weight" in whole and (tmp_path / "streamed" / "model.safetensors").read_bytes() == whole


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


@pytest.mark.parametrize("model_type", [family for family in MOE_FAMILIES if family != "gpt_oss"] + ["qwen3_next"])
def test_moe_checkpoint_stores_experts_per_matrix_and_transformers_reads_them(model_type, tmp_path):
    """Routed experts stored one packed matrix per expert under the family's checkpoint names (for
    Mixtral `block_sparse_moe.experts.<e>.w1`), in a config group of their own; transformers reads
    them back into its fused experts and gives our quantized model's logits. Attention, shared
    experts and dense MLPs at another width check that the groups are not mixed up."""
    from layerwise.models import load_model as load

    save_tiny(model_type, tmp_path / "m")
    plan = Plan(QuantConfig("int", 4, 32)).override("re:.*\\.mlp\\..*proj$", QuantConfig("int", 8, 32))
    run_export(tmp_path / "m", format="compressed-tensors", plan=plan, out=tmp_path / "packed", progress=False)
    from safetensors import safe_open

    with safe_open(tmp_path / "packed" / "model.safetensors", "pt") as stored:
        keys = set(stored.keys())
    expert = "block_sparse_moe.experts.3.w2" if model_type == "mixtral" else "mlp.experts.3.down_proj"
    assert f"model.layers.2.{expert}.weight_packed" in keys and f"model.layers.2.{expert}.weight" not in keys

    ours, _, _ = run_quantize(load(tmp_path / "m"), plan, progress=False)
    with torch.no_grad():
        expected = ours.model(torch.tensor(PROMPT)).logits
        theirs = AutoModelForCausalLM.from_pretrained(tmp_path / "packed", dtype=torch.float32).eval()(
            torch.tensor(PROMPT)).logits
    torch.testing.assert_close(theirs, expected, rtol=1e-4, atol=1e-4)


def test_moe_experts_must_share_one_scheme_and_fused_checkpoints_are_refused(tmp_path):
    save_tiny("qwen2_moe", tmp_path / "q")
    mixed = Plan(QuantConfig("int", 4, 32)).override("re:.*experts\\.1\\..*", QuantConfig("int", 8, 32))
    with pytest.raises(LayerwiseError, match="one scheme"):
        run_export(tmp_path / "q", format="compressed-tensors", plan=mixed, out=tmp_path / "x", progress=False)
    save_tiny("gpt_oss", tmp_path / "g")
    with pytest.raises(LayerwiseError, match="keep the routed experts fused"):
        run_export(tmp_path / "g", format="compressed-tensors", plan=Plan(QuantConfig("int", 4, 32)),
                   out=tmp_path / "x", progress=False)
    assert not (tmp_path / "x").exists()
