"""The command line end to end, in a fresh process, in a temporary directory."""
from __future__ import annotations

import json
import subprocess
import sys

import pytest
import transformers
from transformers import AutoModelForCausalLM

from conftest import CALIBRATION_TEXT, SMOLLM2, STORIES

# End to end through the CLI or fresh processes: left out of the quick tier (-m "not slow").
pytestmark = pytest.mark.slow


def layerwise(*args: str, env: dict | None = None, cwd=None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "layerwise", *map(str, args)], capture_output=True, text=True,
                          timeout=600, env=env, cwd=cwd)


def assert_one_line_error(done: subprocess.CompletedProcess, pattern: str) -> None:
    """README: bad input ends with one line `layerwise: error: ...` on stderr and exit code 2."""
    assert done.returncode == 2, f"exit code {done.returncode}, expected 2; stderr: {done.stderr}"
    lines = [line for line in done.stderr.splitlines() if "error" in line]
    assert len(lines) == 1, done.stderr
    assert pattern in lines[0], lines[0]
    assert "Traceback" not in done.stderr


def test_profile_stories_end_to_end(tmp_path):
    out = tmp_path / "run"
    done = layerwise("profile", STORIES, "--data", CALIBRATION_TEXT, "--tokens", "1024", "--seq-len", "256",
                     "--ablation", "all", "--out", out, "--quiet")
    assert done.returncode == 0, done.stderr
    assert "LIM/BI" in done.stdout and "KL -blk" in done.stdout
    profile = json.loads((out / "profile.json").read_text())
    assert len(profile["blocks"]) == 5
    assert profile["meta"]["command"].startswith("layerwise profile")
    assert profile["meta"]["settings"]["ablation"] == ["block", "attn", "mlp"]
    assert sorted(p.name for p in out.iterdir()) == ["blocks.csv", "linears.csv", "profile.json"]


def test_model_argument_alone_is_enough(tmp_path):
    done = layerwise("profile", STORIES, "--quiet", cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    assert "wikitext2_valid_excerpt" in done.stdout
    assert list(tmp_path.iterdir()) == []  # no --out: nothing written


def test_list_commands():
    done = layerwise("list", "architectures")
    assert done.returncode == 0 and "gpt_neox" in done.stdout and "gemma3_text" in done.stdout
    done = layerwise("list", "metrics")
    assert done.returncode == 0 and "lim" in done.stdout and "effective_rank" in done.stdout
    done = layerwise("list", "formats")
    assert done.returncode == 0 and "mxfp4" in done.stdout and "q4_k" in done.stdout


@pytest.fixture(scope="module")
def bloom_folder(tmp_path_factory):
    folder = tmp_path_factory.mktemp("bloom")
    config = transformers.BloomConfig(hidden_size=16, n_layer=1, n_head=2, vocab_size=64)
    AutoModelForCausalLM.from_config(config).save_pretrained(folder)
    return folder


def bad_inputs(tmp_path, bloom_folder):
    short = tmp_path / "short.txt"
    short.write_text("Too little text to fill one window.")
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    return {
        "missing path": (["profile", tmp_path / "no-such-model"], "does not exist"),
        "unknown architecture": (["profile", bloom_folder], "unknown architecture 'bloom'"),
        "too little text": (["profile", STORIES, "--data", short], "windows of 512"),
        "tokens 0": (["profile", STORIES, "--tokens", "0"], "must be a positive number"),
        "unwritable output": (["profile", STORIES, "--out", "/proc/layerwise-out"], "is not writable"),
        "output under a file": (["profile", STORIES, "--out", blocker / "run"], "is not a directory"),
        "bad ablation kind": (["profile", STORIES, "--ablation", "heads"], "unknown ablation kind"),
    }


@pytest.mark.parametrize("case", ["missing path", "unknown architecture", "too little text", "tokens 0",
                                  "unwritable output", "output under a file", "bad ablation kind"])
def test_bad_input_gives_one_line_and_no_output(case, tmp_path, bloom_folder):
    args, pattern = bad_inputs(tmp_path, bloom_folder)[case]
    out = tmp_path / "out"
    extra = [] if "--out" in args else ["--out", out]
    done = layerwise(*args, *extra, "--quiet")
    assert_one_line_error(done, pattern)
    assert not out.exists()


@pytest.mark.slow
def test_profile_smollm2_gguf_as_in_the_readme(tmp_path):
    out = tmp_path / "smollm2"
    done = layerwise("profile", SMOLLM2, "--data", CALIBRATION_TEXT, "--tokens", "4096", "--out", out, "--quiet")
    assert done.returncode == 0, done.stderr
    profile = json.loads((out / "profile.json").read_text())
    assert len(profile["blocks"]) == 30
    assert profile["meta"]["data"]["tokens"] == 4096
    assert all(value is not None for row in profile["blocks"] for value in row.values())
    assert len(profile["linears"]) == 30 * 7
