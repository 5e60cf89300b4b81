from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parent.parent
SHARED = ROOT.parent / "shared"
STORIES = SHARED / "models" / "stories260K"
SMOLLM2 = SHARED / "models" / "smollm2-135m-instruct" / "SmolLM2-135M-Instruct.Q4_1.gguf"
CALIBRATION_TEXT = SHARED / "data" / "wikitext-2" / "valid.txt"
EVALUATION_TEXT = SHARED / "data" / "wikitext-2-raw" / "wiki.test.raw"

# Set by .ci/run, which installs every external tool the tests use: there a missing tool fails
# the test instead of skipping it, so CI cannot pass by quietly testing less.
REQUIRE_TOOLS_ENV = "LAYERWISE_REQUIRE_TOOLS"


def require_tool(name: str, found, how_to_get: str):
    """Return `found` (a path, or anything true) when the external tool `name` is there; otherwise
    skip the test, or fail it when LAYERWISE_REQUIRE_TOOLS=1."""
    if found:
        return found
    message = f"{name} is not available ({how_to_get})"
    if os.environ.get(REQUIRE_TOOLS_ENV, "") not in ("", "0"):
        pytest.fail(f"{message}, and {REQUIRE_TOOLS_ENV} is set: the test cannot be skipped", pytrace=False)
    pytest.skip(message)


# Set by .ci/run to the folder holding llama.cpp's llama-quantize, llama-imatrix and
# llama-perplexity (built by .ci/llama_cpp_tools): the referees for GGUF bytes and imatrices.
LLAMA_CPP_BIN_ENV = "LAYERWISE_LLAMA_CPP_BIN"
LLAMA_CPP_TOOLS = ("llama-quantize", "llama-imatrix", "llama-perplexity")


@pytest.fixture(scope="session")
def llama_cpp_bin() -> Path:
    folder = os.environ.get(LLAMA_CPP_BIN_ENV)
    found = folder and all((Path(folder) / tool).is_file() for tool in LLAMA_CPP_TOOLS)
    return Path(require_tool("llama.cpp's " + ", ".join(LLAMA_CPP_TOOLS), folder if found else None,
                             f"{LLAMA_CPP_BIN_ENV} names no folder holding them; bash .ci/llama_cpp_tools DIR builds "
                             "them into DIR/bin"))


def llama_perplexity(llama_cpp_bin: Path, model, text, *options) -> float:
    """llama-perplexity's final estimate for `model` on `text`. Its logger writes from a thread, and
    now and then (2 runs in 6 here) the process exits with status 0 before the last lines reach the
    pipe: run again, up to three times."""
    import re
    import subprocess

    for _ in range(3):
        done = subprocess.run([str(part) for part in (llama_cpp_bin / "llama-perplexity", "-m", model, "-f", text,
                                                      "-t", "2", *options)],
                              capture_output=True, text=True, timeout=600)
        assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-4000:]
        found = re.search(r"Final estimate: PPL = ([0-9.]+)", done.stdout + done.stderr)
        if found:
            return float(found[1])
    raise AssertionError("llama-perplexity printed no final estimate in 3 runs:\n" + (done.stdout + done.stderr)[-3000:])


if os.environ.get("PYTEST_XDIST_WORKER"):
    # One thread per pytest-xdist worker: the workers share the cores rather than each taking all.
    # Processes a test starts inherit it, so a fresh process sums in the same order as the test
    # (tests compare their logits exactly).
    os.environ["OMP_NUM_THREADS"] = "1"
    torch.set_num_threads(1)


@pytest.fixture(autouse=True)
def _deterministic():
    torch.manual_seed(0)


@pytest.fixture(scope="session")
def stories():
    from layerwise import load_model

    return load_model(STORIES)


@pytest.fixture(scope="session")
def smollm2():
    from layerwise import load_model

    return load_model(SMOLLM2)


@pytest.fixture
def resident_parameters(monkeypatch):
    """Filled as a streamed model loads parts: the parameters in memory after each load."""
    from layerwise.models.streaming import StreamedWeights

    counts = []
    real_load = StreamedWeights._load

    def counting_load(self, part, only=None):
        real_load(self, part, only)
        counts.append(self.resident_parameters())

    monkeypatch.setattr(StreamedWeights, "_load", counting_load)
    return counts
