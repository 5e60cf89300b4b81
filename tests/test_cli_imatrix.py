"""`layerwise imatrix` and `--imatrix` on quantize and export, end to end on stories260K."""
from __future__ import annotations

import pytest

import json

from conftest import CALIBRATION_TEXT, STORIES
from layerwise.plan import Plan
from layerwise.quant import QuantConfig
from layerwise.quant.imatrix import Imatrix
from test_cli import assert_one_line_error, layerwise

# End to end through the CLI or fresh processes: left out of the quick tier (-m "not slow").
pytestmark = pytest.mark.slow


def test_imatrix_then_quantize_with_it(tmp_path):
    out = tmp_path / "imatrix.gguf"
    done = layerwise("imatrix", STORIES, "--data", CALIBRATION_TEXT, "--ctx", "128", "--chunks", "4", "--out", out,
                     "--quiet")
    assert done.returncode == 0, done.stderr
    assert "35 entries from 4 chunks of 128 tokens" in done.stdout
    assert Imatrix.load(out).counts["blk.0.attn_q.weight"].tolist() == [512.0]
    done = layerwise("quantize", STORIES, "--format", "q4_0", "--imatrix", out, "--out", tmp_path / "q", "--quiet")
    # stories260K's down_proj rows (172) take no GGUF type: the uniform plan is refused before the imatrix is read.
    assert_one_line_error(done, "down_proj")
    plan = Plan(None).override("re:.*(q|k|v|o|gate|up)_proj", QuantConfig("q4_0")).save(tmp_path / "plan.json")
    done = layerwise("quantize", STORIES, "--plan", plan, "--imatrix", out, "--out", tmp_path / "q", "--quiet")
    assert done.returncode == 0, done.stderr
    record = json.loads((tmp_path / "q" / "quant.json").read_text())["meta"]["imatrix"]
    assert record["file"] == str(out) and record["modules"] == 30 and record["chunk_size"] == 128


def test_imatrix_bad_input(tmp_path):
    done = layerwise("imatrix", STORIES, "--data", tmp_path / "missing.txt", "--out", tmp_path / "i.gguf", "--quiet")
    assert_one_line_error(done, "missing.txt")
    (tmp_path / "short.txt").write_text("Once upon a time.")
    done = layerwise("imatrix", STORIES, "--data", tmp_path / "short.txt", "--out", tmp_path / "i.gguf", "--quiet")
    assert_one_line_error(done, "needs at least 1024")
    assert not (tmp_path / "i.gguf").exists()
    done = layerwise("quantize", STORIES, "--format", "int", "--group-size", "none", "--imatrix",
                     tmp_path / "none.gguf", "--out", tmp_path / "q", "--quiet")
    assert_one_line_error(done, "GGUF block types")
