"""`layerwise quantize` and `layerwise eval` end to end on stories260K, and their bad inputs."""
from __future__ import annotations

import json

import pytest

from conftest import CALIBRATION_TEXT, EVALUATION_TEXT, SMOLLM2, STORIES
from test_cli import assert_one_line_error, layerwise


def test_quantize_then_eval(tmp_path):
    out = tmp_path / "q"
    done = layerwise("quantize", STORIES, "--method", "gptq", "--bits", "3", "--group-size", "32", "--allow-tail",
                     "--calib", CALIBRATION_TEXT, "--tokens", "2048", "--out", out, "--quiet")
    assert done.returncode == 0, done.stderr
    assert "bits per weight" in done.stdout
    assert sorted(p.name for p in out.iterdir()) == ["plan.json", "quant.json", "qweights.safetensors"]
    meta = json.loads((out / "quant.json").read_text())["meta"]
    assert meta["calibration"]["tokens"] == 2048 and meta["command"].startswith("layerwise quantize")
    done = layerwise("eval", STORIES, "--quantized", out, "--data", EVALUATION_TEXT, "--tokens", "4096",
                     "--json", tmp_path / "eval.json", "--quiet")
    assert done.returncode == 0, done.stderr
    report = json.loads((tmp_path / "eval.json").read_text())
    assert report["quantized"]["kl"] > 0 and report["quantized"]["perplexity"] > report["base"]["perplexity"]
    assert report["sizes"]["linear_bits_per_weight"] == meta["sizes"]["linear_bits_per_weight"]


@pytest.mark.parametrize("args, pattern", [
    (["--method", "magic"], "invalid choice: 'magic'"),
    (["--bits", "9", "--group-size", "none"], "bits=9 is outside format 'int'"),
    (["--format", "int9"], "unknown format 'int9'"),
    (["--group-size", "none", "--method", "gptq"], "need calibration text"),
    (["--group-size", "none", "--method", "gptq", "--calib", "SHORT"], "windows of 512"),
    (["--group-size", "128"], "needs rows that are a multiple of 128"),
])
def test_quantize_bad_input(args, pattern, tmp_path):
    short = tmp_path / "short.txt"
    short.write_text("Not nearly enough text for calibration.")
    args = [str(short) if a == "SHORT" else a for a in args]
    out = tmp_path / "out"
    done = layerwise("quantize", STORIES, *args, "--out", out, "--quiet")
    assert_one_line_error(done, pattern)
    assert not out.exists()


def test_plan_naming_a_missing_module(tmp_path):
    from layerwise.plan import Plan

    Plan.uniform(bits=4, group_size=None).override("model.layers.9.mlp.up_proj", bits=3).save(tmp_path / "plan.json")
    done = layerwise("quantize", STORIES, "--plan", tmp_path / "plan.json", "--out", tmp_path / "out", "--quiet")
    assert_one_line_error(done, "'model.layers.9.mlp.up_proj' matches no quantizable module")
    assert not (tmp_path / "out").exists()


def test_eval_refuses_calibration_text(tmp_path):
    out = tmp_path / "q"
    done = layerwise("quantize", STORIES, "--method", "gptq", "--group-size", "none", "--calib", CALIBRATION_TEXT,
                     "--tokens", "1024", "--out", out, "--quiet")
    assert done.returncode == 0, done.stderr
    done = layerwise("eval", STORIES, "--quantized", out, "--data", CALIBRATION_TEXT, "--quiet")
    assert_one_line_error(done, "is the text this model was calibrated on")


@pytest.mark.slow
def test_gptq_on_smollm2_as_in_the_issue(tmp_path):
    out = tmp_path / "smollm2-gptq3"
    done = layerwise("quantize", SMOLLM2, "--method", "gptq", "--bits", "3", "--group-size", "64",
                     "--calib", CALIBRATION_TEXT, "--tokens", "2048", "--out", out, "--quiet")
    assert done.returncode == 0, done.stderr
    meta = json.loads((out / "quant.json").read_text())["meta"]
    assert meta["sizes"]["linear_bits_per_weight"] == pytest.approx(3.25)
    done = layerwise("eval", SMOLLM2, "--quantized", out, "--data", EVALUATION_TEXT, "--tokens", "2048",
                     "--json", tmp_path / "eval.json", "--quiet")
    assert done.returncode == 0, done.stderr
    report = json.loads((tmp_path / "eval.json").read_text())
    assert 0.05 < report["quantized"]["kl"] < 3.0
