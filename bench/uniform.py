"""Uniform quantization of SmolLM2 in every format layerwise has, judged on WikiText-2 test.

    python bench/uniform.py [--eval-tokens 10240] [--calib-tokens 16384] [--only LABEL ...]
                            [--peer-python /tmp/peer/bin/python] [--peer-bits 3,4] [--name uniform]

Perplexity, KL(base || quantized) and top-1 agreement on the first eval-tokens of wiki.test.raw
(non-overlapping 512-token windows), bits per weight of the block linears with every scale and
zero point counted, and the time each quantizer took. GPTQ and AWQ calibrate on WikiText-2 valid.
The base model's outputs are computed once and reused for every row. With --peer-python, an
established GPTQ from PyPI (llm-compressor, run in its own environment: bench/peer_quantizers.md)
quantizes the same model at the same bits, and its weights are judged by the same evaluation.

Caveat (../shared/README.md): SmolLM2's shared weights already lie on a Q4_1 grid (4-bit,
asymmetric, groups of 32), so formats that coincide with it look lossless. The rows here use
groups of 64 or whole rows, symmetric grids, or other types, which do not coincide with it.
"""
from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from rich.console import Console
from rich.table import Table
from safetensors.torch import load_file

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import CALIBRATION_TEXT, EVALUATION_TEXT, SMOLLM2, write_results  # noqa: E402

from layerwise import load_model, token_windows  # noqa: E402
from layerwise.evaluate import base_outputs, evaluate  # noqa: E402
from layerwise.models.layout import block_linears, linear_weight, set_linear_weight  # noqa: E402
from layerwise.models.saving import save_plain  # noqa: E402
from layerwise.plan import Plan  # noqa: E402
from layerwise.apply import quantize_  # noqa: E402
from layerwise.quant import QuantConfig  # noqa: E402
from layerwise.quant.size import size_report  # noqa: E402


def configurations() -> dict[str, QuantConfig]:
    rows: dict[str, QuantConfig] = {}
    for algorithm in ("rtn", "gptq"):
        for bits in (2, 3, 4, 8):
            for group in (64, None):
                config = QuantConfig("int", bits, group, True, algorithm)
                rows[config.label] = config
    for bits in (3, 4):
        config = QuantConfig("int", bits, 64, True, "awq")
        rows[config.label] = config
    for config in (QuantConfig("nf4", group_size=64), QuantConfig("fp4", group_size=64), QuantConfig("mxfp4"),
                   QuantConfig("fp8", group_size=None), QuantConfig("q4_0"), QuantConfig("q5_0"),
                   QuantConfig("q8_0"), QuantConfig("int", 8, 16), QuantConfig("int", 8, 32, symmetric=False)):
        rows[config.label] = config
    return rows


def run_peer(peer_python: str, model_dir: Path, windows: Path, bits: int, group_size: int, out: Path) -> float:
    script = Path(__file__).resolve().parent / "peers" / "llmcompressor_gptq.py"
    start = time.perf_counter()
    subprocess.run([peer_python, str(script), "--model", str(model_dir), "--windows", str(windows),
                    "--bits", str(bits), "--group-size", str(group_size), "--out", str(out)], check=True)
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--eval-tokens", type=int, default=20 * 512)
    parser.add_argument("--calib-tokens", type=int, default=32 * 512)
    parser.add_argument("--only", nargs="*", default=None, help="labels to run (default: all)")
    parser.add_argument("--peer-python", default=None, help="python of an environment with llm-compressor")
    parser.add_argument("--peer-bits", default="3,4", help="bit widths the peer quantizes (groups of 64)")
    parser.add_argument("--name", default="uniform", help="results file name (bench/results/NAME.json), so that a "
                        "partial run (--only) does not replace the full table")
    args = parser.parse_args()

    loaded = load_model(SMOLLM2)
    evaluation = token_windows(loaded.tokenizer, EVALUATION_TEXT, tokens=args.eval_tokens, seed=None)
    calibration = token_windows(loaded.tokenizer, CALIBRATION_TEXT, tokens=args.calib_tokens, seed=0)
    base = base_outputs(loaded, evaluation, progress=False)
    linears = {name: module for _, name, module in block_linears(loaded.model, loaded.adapter)}
    original = {name: linear_weight(module).detach().clone() for name, module in linears.items()}
    rows = [{"label": "float (Q4_1 GGUF dequantized)", "algorithm": "-", "bits_per_weight": 16.0,
             "total_bytes": size_report(loaded, {})["total_bytes"], **base.quality.to_dict(), "seconds": 0.0}]

    def save(rows: list[dict]) -> Path:
        """Written after every row, so that an interrupted run keeps what it measured."""
        return write_results(args.name, {"model": loaded.describe(), "evaluation": evaluation.describe(),
                                         "calibration": calibration.describe(), "rows": rows})

    def restore() -> None:
        for name, module in linears.items():
            set_linear_weight(module, original[name])

    for label, config in configurations().items():
        if args.only and label not in args.only:
            continue
        restore()
        start = time.perf_counter()
        stored = quantize_(loaded, Plan(config), calibration if config.algorithm != "rtn" else None, progress=False)
        seconds = time.perf_counter() - start
        sizes = size_report(loaded, stored)
        quality = evaluate(loaded, base, progress=False)
        rows.append({"label": label, "algorithm": config.algorithm, "config": config.to_dict(),
                     "bits_per_weight": sizes["linear_bits_per_weight"], "total_bytes": sizes["total_bytes"],
                     **quality.to_dict(), "seconds": seconds})
        print(f"{label}: ppl {quality.perplexity:.2f} KL {quality.kl:.4f} ({seconds:.0f} s)", flush=True)
        save(rows)

    if args.peer_python:
        with tempfile.TemporaryDirectory() as scratch:
            folder = Path(scratch) / "smollm2-plain"
            windows = Path(scratch) / "calibration.npy"
            restore()
            save_plain(loaded, folder)
            np.save(windows, calibration.input_ids.numpy())
            for bits in (int(b) for b in args.peer_bits.split(",")):
                out = Path(scratch) / f"peer-{bits}.safetensors"
                seconds = run_peer(args.peer_python, folder, windows, bits, 64, out)
                weights = load_file(str(out))
                for name, module in linears.items():
                    set_linear_weight(module, weights[name].float())
                quality = evaluate(loaded, base, progress=False)
                config = QuantConfig("int", bits, 64, True, "gptq")
                rows.append({"label": f"llm-compressor gptq int{bits} g64 sym", "algorithm": "peer-gptq",
                             "config": config.to_dict(), "bits_per_weight": config.bits + 16 / 64,
                             "total_bytes": None, **quality.to_dict(), "seconds": seconds})
                print(f"peer int{bits}: ppl {quality.perplexity:.2f} KL {quality.kl:.4f}", flush=True)
                save(rows)

    table = Table(title=f"SmolLM2-135M, uniform quantization: wiki.test.raw, {base.quality.tokens} predicted tokens")
    for column in ("quantizer", "bits/weight", "perplexity", "KL", "top-1", "seconds"):
        table.add_column(column, justify="right")
    for row in rows:
        table.add_row(row["label"], f"{row['bits_per_weight']:.3f}", f"{row['perplexity']:.2f}",
                      f"{row['kl']:.4f}", f"{row['top1']:.3f}", f"{row['seconds']:.0f}")
    Console(width=110).print(table)
    print(f"wrote {save(rows)}")


if __name__ == "__main__":
    main()
