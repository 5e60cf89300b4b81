"""llama.cpp's own tools as referees: llama-quantize takes our importance matrix and writes, for
every importance-weighted GGUF type, the bytes our quantizers write; llama-imatrix's sums agree with
ours on the same text and chunking. The tools come from .ci/llama_cpp_tools (LAYERWISE_LLAMA_CPP_BIN)."""
from __future__ import annotations

import subprocess

import numpy as np
import pytest

from conftest import CALIBRATION_TEXT, EVALUATION_TEXT, SMOLLM2, llama_perplexity
from layerwise.quant import gguf_blocks
from layerwise.quant.imatrix import Imatrix, run_imatrix

# Importance-weighted types (Q8_0 ignores an imatrix in llama.cpp as here). SmolLM2's 576-wide
# rows take only the 32-weight types; its ffn_down (1536 wide) takes every K-quant.
SIMPLE_TYPES = ["Q4_0", "Q4_1", "Q5_0", "Q5_1"]
K_TYPES = ["Q2_K", "Q3_K", "Q4_K", "Q5_K", "Q6_K"]
CHECKED = {"Q4_0": ["blk.0.attn_q.weight", "blk.13.ffn_gate.weight"], "K": ["blk.1.ffn_down.weight",
                                                                            "blk.28.ffn_down.weight"]}
CTX, CHUNKS = 128, 4
pytestmark = pytest.mark.slow  # SmolLM2 and llama.cpp runs: minutes
# The shared SmolLM2 sits on a Q4_1 grid: Q4_1 finds it exactly with or without importance.
ON_GRID = {"Q4_1"}


def _run(command: list) -> subprocess.CompletedProcess:
    done = subprocess.run([str(part) for part in command], capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-4000:]
    return done


@pytest.fixture(scope="module")
def text(tmp_path_factory):
    path = tmp_path_factory.mktemp("text") / "calibration.txt"
    path.write_text(CALIBRATION_TEXT.read_text()[:40_000])
    return path


@pytest.fixture(scope="module")
def ours(smollm2, text, tmp_path_factory):
    out = tmp_path_factory.mktemp("imatrix") / "ours.gguf"
    return run_imatrix(smollm2, data=text, out=out, ctx=CTX, chunks=CHUNKS, progress=False), out


@pytest.fixture(scope="module")
def source_tensors():
    import gguf

    return {t.name: t for t in gguf.GGUFReader(SMOLLM2).tensors}


def _float_rows(tensor) -> np.ndarray:
    shape = tuple(int(n) for n in reversed(tensor.shape))
    return gguf_blocks.dequantize(np.asarray(tensor.data), tensor.tensor_type.name, shape).numpy()


@pytest.mark.parametrize("qtype", SIMPLE_TYPES + K_TYPES)
def test_llama_quantize_takes_our_imatrix_and_writes_our_bytes(llama_cpp_bin, ours, source_tensors, qtype, tmp_path):
    import gguf

    imatrix, path = ours
    out = tmp_path / f"{qtype}.gguf"
    done = _run([llama_cpp_bin / "llama-quantize", "--allow-requantize", "--pure", "--imatrix", path, SMOLLM2, out,
                 qtype, "2"])
    assert f"loaded {len(imatrix.sums)} importance matrix entries" in done.stdout + done.stderr
    written = {t.name: t for t in gguf.GGUFReader(out).tensors}
    for name in CHECKED["K" if qtype.endswith("_K") else "Q4_0"]:
        theirs = written[name]
        assert theirs.tensor_type.name == qtype, name
        mine = gguf_blocks.quantize(_float_rows(source_tensors[name]), qtype, imatrix.importance(name))
        assert np.array_equal(mine.reshape(-1), np.asarray(theirs.data).view(np.uint8).reshape(-1)), (qtype, name)
        if qtype not in ON_GRID:
            plain = gguf_blocks.quantize(_float_rows(source_tensors[name]), qtype)
            assert not np.array_equal(plain, mine), "the importance matrix changed nothing: the test proves nothing"


def test_llama_imatrix_sums_agree_with_ours(llama_cpp_bin, ours, text, tmp_path):
    imatrix, _ = ours
    out = tmp_path / "theirs.gguf"
    _run([llama_cpp_bin / "llama-imatrix", "-m", SMOLLM2, "-f", text, "-c", CTX, "-b", CTX, "--chunks", CHUNKS,
          "-o", out, "-t", "2", "--no-ppl"])
    theirs = Imatrix.load(out)
    assert set(theirs.sums) == set(imatrix.sums) and theirs.chunk_size == CTX and theirs.chunk_count == CHUNKS
    for name in imatrix.sums:
        assert theirs.counts[name].tolist() == imatrix.counts[name].tolist() == [CTX * CHUNKS], name
        a, b = imatrix.importance(name), theirs.importance(name)
        # llama.cpp multiplies Q4_1 weights by activations rounded to 8 bits (Q8_1) and keeps K/V in
        # float16, we compute in float32: the activations drift a little, block after block. Measured
        # on this text: sum|ours - theirs| / sum|theirs| at most 2.4% per tensor (attn_output; 1.3% for
        # ffn_down, under 0.5% for the rest), the median column's relative difference at most 2.3%.
        assert np.abs(a - b).sum() / np.abs(b).sum() < IMATRIX_TOLERANCE, name
        assert np.median(np.abs(a - b) / np.maximum(np.abs(b), 1e-12)) < IMATRIX_TOLERANCE, name


IMATRIX_TOLERANCE = 0.04


def test_legacy_files_both_ways(llama_cpp_bin, ours, text, source_tensors, tmp_path):
    """llama-quantize reads our .dat as it reads our GGUF; we read llama-imatrix's .dat as its GGUF."""
    import gguf

    imatrix, _ = ours
    legacy = imatrix.save(tmp_path / "ours.dat")
    _run([llama_cpp_bin / "llama-quantize", "--allow-requantize", "--pure", "--imatrix", legacy, SMOLLM2,
          tmp_path / "q.gguf", "Q4_0", "2"])
    name = "blk.7.attn_v.weight"
    theirs = next(t for t in gguf.GGUFReader(tmp_path / "q.gguf").tensors if t.name == name)
    # The .dat holds mean * chunks in float32; both sides divide it back in float32.
    mine = gguf_blocks.quantize(_float_rows(source_tensors[name]), "Q4_0", Imatrix.load(legacy).importance(name))
    assert np.array_equal(mine.reshape(-1), np.asarray(theirs.data).view(np.uint8).reshape(-1))
    for output_format in ("gguf", "dat"):
        _run([llama_cpp_bin / "llama-imatrix", "-m", SMOLLM2, "-f", text, "-c", CTX, "-b", CTX, "--chunks", 2,
              "-o", tmp_path / f"theirs.{output_format}", "--output-format", output_format, "-t", "2", "--no-ppl"])
    from_gguf, from_dat = Imatrix.load(tmp_path / "theirs.gguf"), Imatrix.load(tmp_path / "theirs.dat")
    assert set(from_gguf.sums) == set(from_dat.sums) and from_dat.chunk_count == 2
    for name in from_gguf.sums:
        np.testing.assert_allclose(from_dat.importance(name), from_gguf.importance(name), rtol=1e-6)


def test_llama_cpp_runs_gptq_on_gguf_grids_and_finds_it_better(llama_cpp_bin, text, tmp_path):
    """stories260K with GPTQ's codes on llama.cpp's Q4_0 grids (through llama.cpp's converter) runs
    in llama.cpp, whose perplexity for it, on text neither saw, is lower than for the same plan
    rounded to nearest (same bytes). down_proj's 172-wide rows take no GGUF type and stay f32."""
    import os

    from conftest import STORIES, require_tool
    from layerwise.export.convert import CONVERTER_ENV
    from layerwise.export.run import run_export
    from layerwise.plan import Plan
    from layerwise.quant import QuantConfig

    converter = require_tool("llama.cpp's convert_hf_to_gguf.py", os.environ.get(CONVERTER_ENV),
                             f"{CONVERTER_ENV} is not set; .ci/run sets it to the converter it unpacks")
    held_out = tmp_path / "held_out.txt"
    held_out.write_text(EVALUATION_TEXT.read_text()[:60_000])
    results = {}
    for algorithm in ("rtn", "gptq"):
        plan = Plan(None).override(r"re:.*(q|k|v|o|gate|up)_proj", QuantConfig("q4_0", algorithm=algorithm))
        out = tmp_path / f"{algorithm}.gguf"
        report = run_export(STORIES, plan=plan, out=out, calib=CALIBRATION_TEXT if algorithm == "gptq" else None,
                            tokens=4096, converter=converter, progress=False)
        results[algorithm] = llama_perplexity(llama_cpp_bin, out, held_out, "-c", 256, "-b", 256, "--chunks", 20)
        results[algorithm + " bytes"] = report["file_bytes"]
    assert results["gptq bytes"] == results["rtn bytes"]
    assert results["gptq"] < results["rtn"], results


