"""`layerwise quantize` and `layerwise eval` end to end on stories260K, and their bad inputs."""
from __future__ import annotations

import json

import pytest

from conftest import CALIBRATION_TEXT, EVALUATION_TEXT, SMOLLM2, STORIES
from test_cli import assert_one_line_error, layerwise

# End to end through the CLI or fresh processes: left out of the quick tier (-m "not slow").
pytestmark = pytest.mark.slow


def rtn_on_the_same_windows(model, gptq_out, eval_args: list, tmp_path) -> dict:
    """`layerwise eval` of plain rounding (RTN) with the config GPTQ used (the plan it wrote,
    algorithm swapped), on the evaluation windows GPTQ's eval used."""
    from layerwise.plan import Plan

    gptq_plan = Plan.load(gptq_out / "plan.json")
    assert gptq_plan.default.algorithm == "gptq" and not gptq_plan.rules
    Plan(gptq_plan.default.replace(algorithm="rtn")).save(tmp_path / "rtn-plan.json")
    done = layerwise("eval", model, "--plan", tmp_path / "rtn-plan.json", *eval_args, "--json", tmp_path / "rtn.json",
                     "--quiet")
    assert done.returncode == 0, done.stderr
    return json.loads((tmp_path / "rtn.json").read_text())


def assert_gptq_beats_rtn(gptq: dict, rtn: dict, ratio: float) -> None:
    # The same windows (the base scores identically) and the same storage: only the rounding differs.
    assert gptq["base"]["perplexity"] == rtn["base"]["perplexity"] and gptq["base"]["tokens"] == rtn["base"]["tokens"]
    assert gptq["sizes"]["linear_bits_per_weight"] == rtn["sizes"]["linear_bits_per_weight"]
    assert gptq["quantized"]["kl"] < ratio * rtn["quantized"]["kl"], (gptq["quantized"], rtn["quantized"])


def test_quantize_then_eval(tmp_path):
    out = tmp_path / "q"
    done = layerwise("quantize", STORIES, "--method", "gptq", "--bits", "3", "--group-size", "32", "--allow-tail",
                     "--calib", CALIBRATION_TEXT, "--tokens", "2048", "--out", out, "--quiet")
    assert done.returncode == 0, done.stderr
    assert "bits per weight" in done.stdout
    assert sorted(p.name for p in out.iterdir()) == ["plan.json", "quant.json", "qweights.safetensors"]
    meta = json.loads((out / "quant.json").read_text())["meta"]
    assert meta["calibration"]["tokens"] == 2048 and meta["command"].startswith("layerwise quantize")
    eval_args = ["--data", EVALUATION_TEXT, "--tokens", "4096"]
    done = layerwise("eval", STORIES, "--quantized", out, *eval_args, "--json", tmp_path / "eval.json", "--quiet")
    assert done.returncode == 0, done.stderr
    report = json.loads((tmp_path / "eval.json").read_text())
    assert report["quantized"]["kl"] > 0 and report["quantized"]["perplexity"] > report["base"]["perplexity"]
    assert report["sizes"]["linear_bits_per_weight"] == meta["sizes"]["linear_bits_per_weight"]
    # KL 0.65 against RTN's 0.95 (measured): GPTQ must beat plain rounding clearly, not just be "small".
    assert_gptq_beats_rtn(report, rtn_on_the_same_windows(STORIES, out, eval_args, tmp_path), ratio=0.85)


@pytest.mark.parametrize("args, pattern", [
    (["--method", "magic"], "invalid choice: 'magic'"),
    (["--bits", "9", "--group-size", "none"], "bits=9 is outside format 'int'"),
    (["--format", "int9"], "unknown format 'int9'"),
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


def test_gptq_without_calib_fits_on_the_shipped_mix(tmp_path):
    from layerwise.data.windows import CALIBRATION_FOLDER

    out = tmp_path / "q"
    done = layerwise("quantize", STORIES, "--method", "gptq", "--group-size", "none", "--tokens", "8192",
                     "--out", out, "--quiet")
    assert done.returncode == 0, done.stderr
    calibration = json.loads((out / "quant.json").read_text())["meta"]["calibration"]
    assert sorted(calibration["domains"]) == ["code", "prose", "tables", "verse"]
    assert all(part["windows"] >= 1 for part in calibration["domains"].values())
    # What GPTQ was fitted on is known to eval: a shipped excerpt as evaluation text is refused.
    done = layerwise("eval", STORIES, "--quantized", out, "--data", CALIBRATION_FOLDER / "tables_excerpt.txt",
                     "--tokens", "65536", "--quiet")
    assert_one_line_error(done, "used for the quantization statistics")


@pytest.mark.slow
def test_gptq_on_smollm2_as_in_the_issue(tmp_path):
    out = tmp_path / "smollm2-gptq3"
    done = layerwise("quantize", SMOLLM2, "--method", "gptq", "--bits", "3", "--group-size", "64",
                     "--calib", CALIBRATION_TEXT, "--tokens", "2048", "--out", out, "--quiet")
    assert done.returncode == 0, done.stderr
    meta = json.loads((out / "quant.json").read_text())["meta"]
    assert meta["sizes"]["linear_bits_per_weight"] == pytest.approx(3.25)
    eval_args = ["--data", EVALUATION_TEXT, "--tokens", "2048"]
    done = layerwise("eval", SMOLLM2, "--quantized", out, *eval_args, "--json", tmp_path / "eval.json", "--quiet")
    assert done.returncode == 0, done.stderr
    report = json.loads((tmp_path / "eval.json").read_text())
    assert 0.05 < report["quantized"]["kl"] < 3.0
    # KL 1.31 against RTN's 1.50 (measured; top-1 0.44 against 0.41): the test costs one more eval.
    assert_gptq_beats_rtn(report, rtn_on_the_same_windows(SMOLLM2, out, eval_args, tmp_path), ratio=0.95)
