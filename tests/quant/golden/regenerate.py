"""Regenerate the golden digests of tests/quant/test_gguf_blocks.py from llama.cpp's own C code.

Compiles quantize_rows.c against ggml-quants.c of a llama.cpp source tree (the one .ci/llama_cpp_tools
keeps beside the tools it builds, or any checkout), quantizes golden_input() to every GGUF type
without and with golden_importance(), and prints the GOLDEN table to paste into the test.

    python tests/quant/golden/regenerate.py --llama-cpp build/llama.cpp-tools/src
"""
from __future__ import annotations

import argparse
import hashlib
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))
from test_gguf_blocks import golden_importance, golden_input  # noqa: E402

TYPES = ("Q8_0", "Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q2_K", "Q3_K", "Q4_K", "Q5_K", "Q6_K")


def compile_quantizer(llama_cpp: Path, out: Path) -> Path:
    """The quantize_rows program, built with the flags the digests were first made with."""
    ggml = llama_cpp / "ggml"
    subprocess.run(["gcc", "-O2", "-ffp-contract=off", "-I", str(ggml / "include"), "-I", str(ggml / "src"),
                    str(HERE / "quantize_rows.c"), str(ggml / "src" / "ggml-quants.c"), "-lm", "-o", str(out)],
                   check=True, capture_output=True, text=True)
    return out


def llama_cpp_bytes(program: Path, qtype: str, x: np.ndarray, importance: np.ndarray | None, scratch: Path) -> bytes:
    (scratch / "x.f32").write_bytes(np.ascontiguousarray(x, dtype="<f4").tobytes())
    weights = "-"
    if importance is not None:
        weights = str(scratch / "w.f32")
        Path(weights).write_bytes(np.ascontiguousarray(importance, dtype="<f4").tobytes())
    subprocess.run([str(program), qtype, str(x.shape[0]), str(x.shape[1]), str(scratch / "x.f32"), weights,
                    str(scratch / "out.bin")], check=True, capture_output=True, text=True)
    return (scratch / "out.bin").read_bytes()


def golden_digests(llama_cpp: Path) -> dict[str, tuple[str, str]]:
    x, importance = golden_input(), golden_importance()
    with tempfile.TemporaryDirectory() as scratch:
        program = compile_quantizer(llama_cpp, Path(scratch) / "quantize_rows")
        return {qtype: tuple(hashlib.sha256(llama_cpp_bytes(program, qtype, x, weights, Path(scratch))).hexdigest()[:16]
                             for weights in (None, importance)) for qtype in TYPES}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--llama-cpp", required=True, type=Path, help="a llama.cpp source tree (holding ggml/)")
    args = parser.parse_args()
    print("GOLDEN = {")
    for qtype, (plain, weighted) in golden_digests(args.llama_cpp).items():
        print(f'    "{qtype}": ("{plain}", "{weighted}"),')
    print("}")


if __name__ == "__main__":
    main()
