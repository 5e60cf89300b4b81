"""`layerwise plan` and `layerwise pareto` end to end on stories260K, and their bad inputs."""
from __future__ import annotations

import json

import pytest

from conftest import CALIBRATION_TEXT, EVALUATION_TEXT, STORIES
from test_cli import assert_one_line_error, layerwise

# End to end through the CLI or fresh processes: left out of the quick tier (-m "not slow").
pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def measured(tmp_path_factory):
    """One `plan` run that measures and saves the table, shared by the tests below."""
    out = tmp_path_factory.mktemp("plan")
    done = layerwise("plan", STORIES, "--budget", "4.5", "--options", "int2pc,int4pc,int8pc", "--calib",
                     CALIBRATION_TEXT, "--tokens", "1024", "--fitness-tokens", "512", "--generations", "3",
                     "--table", out / "sens.json", "--out", out / "plan.json", "--quiet")
    assert done.returncode == 0, done.stderr
    return out, done


def test_plan_writes_a_plan_that_quantize_and_eval_accept(measured, tmp_path):
    out, done = measured
    assert "bits per weight" in done.stdout and "KL on held-out calibration windows" in done.stdout
    assert "against uniform int4pc on the same held-out windows" in done.stdout
    report = json.loads((out / "plan.report.json").read_text())
    assert report["bits_per_weight"] <= 4.5 and report["command"].startswith("layerwise plan")
    done = layerwise("quantize", STORIES, "--plan", out / "plan.json", "--out", tmp_path / "q", "--quiet")
    assert done.returncode == 0, done.stderr
    sizes = json.loads((tmp_path / "q" / "quant.json").read_text())["meta"]["sizes"]
    assert sizes["linear_bits_per_weight"] == pytest.approx(report["bits_per_weight"])
    done = layerwise("eval", STORIES, "--quantized", tmp_path / "q", "--data", EVALUATION_TEXT, "--tokens", "2048",
                     "--quiet")
    assert done.returncode == 0, done.stderr


def test_pareto_from_the_saved_table(measured, tmp_path):
    out, _ = measured
    done = layerwise("pareto", out / "sens.json", "--budgets", "3:6:1", "--out", tmp_path / "p")
    assert done.returncode == 0, done.stderr
    rows = json.loads((tmp_path / "p" / "pareto.json").read_text())["rows"]
    assert [row["budget_bits_per_weight"] for row in rows] == [3.0, 4.0, 5.0, 6.0]
    assert (tmp_path / "p" / "pareto.png").exists()


@pytest.mark.parametrize("args, pattern", [
    (["--budget", "1.0"], "below the smallest plan"),
    (["--budget", "9.5"], "above the largest plan"),
    (["--budget", "4", "--granularity", "block"], "was measured per sublayer"),
    (["--budget", "4", "--allocator", "magic"], "unknown allocator"),
    (["--budget", "4", "--sensitivity", "magic"], "unknown sensitivity estimator 'magic'"),
    (["--budget", "4", "--sensitivity", "auto"], "filled by the 'measured' estimator, not 'fisher'"),
    (["--budget", "4", "--sensitivity", "auto", "--refine", "2"], r"refine=2.0: give the share"),
    ([], "give exactly one budget"),
    (["--budget", "4", "--budget-like", "x.gguf"], "give exactly one budget"),
    (["--budget-like", "missing.gguf"], "reference file missing.gguf not found"),
    (["--budget", "-2"], "must be a positive number"),
    (["--budget", "4", "--tail-weight", "-1"], "tail weight -1.0 must be a finite number >= 0"),
])
def test_plan_bad_input(measured, args, pattern, tmp_path):
    out, _ = measured
    done = layerwise("plan", STORIES, "--table", out / "sens.json", *args, "--out", tmp_path / "plan.json", "--quiet")
    assert_one_line_error(done, pattern)
    assert not (tmp_path / "plan.json").exists()


def test_a_tail_weighted_plan_from_the_saved_table_and_a_table_without_tails(measured, tmp_path):
    out, _ = measured
    done = layerwise("plan", STORIES, "--budget", "4.5", "--table", out / "sens.json", "--calib", CALIBRATION_TEXT,
                     "--tokens", "1024", "--tail-weight", "0.5", "--out", tmp_path / "plan.json", "--quiet")
    assert done.returncode == 0, done.stderr
    report = json.loads((tmp_path / "plan.report.json").read_text())
    plain = json.loads((out / "plan.report.json").read_text())
    assert report["tail_weight"] == 0.5 and plain["tail_weight"] == 0.0
    # A plan that weighs tails predicts no heavier a tail (and no lighter a mean) than the plain one.
    assert report["predicted_tail_kl"] <= plain["predicted_tail_kl"] + 1e-12
    assert report["predicted_kl"] >= plain["predicted_kl"] - 1e-12
    data = json.loads((out / "sens.json").read_text())
    del data["tail_kl"]
    (tmp_path / "old.json").write_text(json.dumps(data))
    done = layerwise("plan", STORIES, "--budget", "4.5", "--table", tmp_path / "old.json", "--calib",
                     CALIBRATION_TEXT, "--tail-weight", "0.5", "--quiet")
    assert_one_line_error(done, "this sensitivity table has no tail KL")


def test_plan_with_an_empty_option_list_or_another_models_table(tmp_path, measured):
    done = layerwise("plan", STORIES, "--budget", "4", "--options", ",", "--table", tmp_path / "new.json", "--quiet")
    assert_one_line_error(done, "option list is empty")
    out, _ = measured
    data = json.loads((out / "sens.json").read_text())
    data["model_fingerprint"] = "f" * 64
    (tmp_path / "other.json").write_text(json.dumps(data))
    done = layerwise("plan", STORIES, "--budget", "4", "--table", tmp_path / "other.json", "--quiet")
    assert_one_line_error(done, "measured on another model")
    done = layerwise("pareto", tmp_path / "missing.json")
    assert_one_line_error(done, "no sensitivity table at")


def test_drop_then_eval_a_schedule(tmp_path):
    done = layerwise("drop", STORIES, "--blocks", "1", "--by", "ablation", "--data", CALIBRATION_TEXT, "--tokens",
                     "1024", "--out", tmp_path / "d", "--quiet")
    assert done.returncode == 0, done.stderr
    record = json.loads((tmp_path / "d" / "layerwise_drop.json").read_text())
    assert record["kind"] == "block" and len(record["dropped"]) == 1 and len(record["kept_original_indices"]) == 4
    done = layerwise("eval", tmp_path / "d", "--data", EVALUATION_TEXT, "--tokens", "1024", "--quiet")
    assert done.returncode == 0, done.stderr
    done = layerwise("eval", STORIES, "--data", EVALUATION_TEXT, "--tokens", "1024", "--schedule", "0,1,1,2,3,4",
                     "--quiet")
    assert done.returncode == 0 and "scheduled: perplexity" in done.stdout, done.stderr


@pytest.mark.parametrize("args, pattern", [
    (["--indices", "0,1,2,3,4"], "would leave none"),
    (["--indices", "2,9"], "block index 9 is out of range"),
    (["--blocks", "5"], "at least one block must remain"),
    (["--blocks", "1", "--attn", "1"], "give one of --blocks, --attn, --mlp"),
    ([], "give either a number"),
])
def test_drop_bad_input(args, pattern, tmp_path):
    done = layerwise("drop", STORIES, *args, "--out", tmp_path / "d", "--quiet")
    assert_one_line_error(done, pattern)
    assert not (tmp_path / "d").exists()


def test_schedule_naming_a_missing_block():
    done = layerwise("eval", STORIES, "--data", EVALUATION_TEXT, "--tokens", "1024", "--schedule", "0,7", "--quiet")
    assert_one_line_error(done, "schedule names block 7")


def test_plan_with_several_calibration_files_reports_every_domain(tmp_path):
    (tmp_path / "other.txt").write_text(EVALUATION_TEXT.read_text()[:60000])
    done = layerwise("plan", STORIES, "--budget", "4.5", "--options", "int2pc,int4pc,int8pc", "--calib",
                     CALIBRATION_TEXT, "--calib", tmp_path / "other.txt", "--objective", "worst", "--tokens", "1024",
                     "--check-tokens", "1024", "--out", tmp_path / "plan.json", "--quiet")
    assert done.returncode == 0, done.stderr
    assert "per domain, against its best uniform plan: valid " in done.stdout and "; other " in done.stdout
    report = json.loads((tmp_path / "plan.report.json").read_text())
    assert report["objective"] == "worst" and report["domains"] == ["valid", "other"]
    assert set(report["check"]["domains"]) == {"valid", "other"}
    done = layerwise("list", "objectives")
    assert "mean (default)" in done.stdout and "cautious" in done.stdout
    done = layerwise("plan", STORIES, "--budget", "4.5", "--objective", "median", "--quiet")
    assert_one_line_error(done, "invalid choice: 'median'")
