"""`layerwise compress` on stories260K: every artifact in one folder, resumable, settings kept."""
from __future__ import annotations

import json

import pytest

from conftest import EVALUATION_TEXT, STORIES
from test_cli import assert_one_line_error, layerwise

# End to end through the CLI or fresh processes: left out of the quick tier (-m "not slow").
pytestmark = pytest.mark.slow

ARGS = ["--budget", "4.5", "--format", "hf", "--options", "int2pc,int4pc,int8pc", "--eval-data", EVALUATION_TEXT,
        "--tokens", "1024"]


@pytest.fixture(scope="module")
def compressed(tmp_path_factory):
    out = tmp_path_factory.mktemp("compress") / "run"
    done = layerwise("compress", STORIES, *ARGS, "--out", out)
    assert done.returncode == 0, done.stderr
    return out, done


def test_compress_leaves_every_artifact(compressed):
    out, done = compressed
    for name in ("compress.json", "profile/profile.json", "sensitivity.json", "plan.json", "plan.report.json",
                 "model/config.json", "eval.json", "report.html"):
        assert (out / name).is_file(), name
        assert str(out / name.split("/")[0]) in done.stdout or name in ("compress.json", "sensitivity.json",
                                                                          "plan.report.json")
    plan = json.loads((out / "plan.json").read_text())
    assert plan["meta"]["provenance"]["estimator"] == "fisher"  # compress's default, auto
    report = json.loads((out / "eval.json").read_text())
    assert report["quantized"]["kl"] > 0 and report["sizes"]["linear_bits_per_weight"] <= 4.5 + 1e-9
    assert "layerwise report" in (out / "report.html").read_text()


def test_compress_resumes_and_refuses_other_settings(compressed, tmp_path):
    out, _ = compressed
    (out / "eval.json").unlink()
    done = layerwise("compress", STORIES, *ARGS, "--out", out, "--quiet")
    assert done.returncode == 0, done.stderr
    kept = [line.split()[0] for line in done.stdout.splitlines() if "kept from an earlier run" in line]
    assert kept == ["profile", "plan", "export"]  # the report is made again from the new evaluation
    assert (out / "eval.json").is_file() and (out / "report.html").is_file()
    other = [a if a != "4.5" else "5" for a in ARGS]
    assert_one_line_error(layerwise("compress", STORIES, *other, "--out", out), "other settings (bits_per_weight)")


@pytest.mark.parametrize("args, pattern", [
    (["--budget", "4", "--budget-like", "x.gguf"], "give exactly one budget"),
    (["--budget-like", "x.gguf", "--format", "hf"], "needs --format gguf"),
    (["--budget", "4", "--sensitivity", "magic"], "unknown sensitivity estimator"),
    (["--budget", "4", "--eval-data", "missing.txt"], "evaluation text missing.txt not found"),
    (["--budget", "4", "--refine", "-0.5"], r"refine=-0.5: give the share"),
])
def test_compress_bad_input(args, pattern, tmp_path):
    done = layerwise("compress", STORIES, *args, "--out", tmp_path / "run")
    assert_one_line_error(done, pattern)
    assert not (tmp_path / "run").exists()


def test_a_streamed_compress_writes_what_one_in_memory_writes(tmp_path):
    """Every step streamed (the profile, fisher's table and the entries the plan refines, the
    plan's check, the export and the evaluation): the same plan, model and evaluation."""
    from layerwise.compress import run_compress

    settings = dict(bits_per_weight=4.5, format="hf", options="int2pc,int4pc,int8pc", eval_data=EVALUATION_TEXT,
                    eval_tokens=2048, tokens=1024, check_tokens=1024, refine=1.0, progress=False)
    runs = {streaming: run_compress(STORIES, out=tmp_path / str(streaming), streaming=streaming, **settings)
            for streaming in (False, True)}
    whole, streamed = (json.loads((tmp_path / name / "plan.json").read_text()) for name in ("False", "True"))
    assert streamed["rules"] == whole["rules"] and streamed["drop"] == whole["drop"]
    assert whole["meta"]["allocation"]["refinement"]["entries"]
    assert (tmp_path / "True" / "model" / "model.safetensors").read_bytes() == \
        (tmp_path / "False" / "model" / "model.safetensors").read_bytes()
    evaluated = [json.loads((tmp_path / name / "eval.json").read_text())["quantized"] for name in ("False", "True")]
    assert evaluated[1]["kl"] == pytest.approx(evaluated[0]["kl"], abs=1e-6)
    assert set(runs[True].artifacts) == set(runs[False].artifacts)
