"""GPTQ onto GGUF grids against llama-quantize's own rounding, with and without an importance matrix.

On the off-grid ("dithered") SmolLM2 of ../shared/README.md, every block linear takes one GGUF
type (K-quants where rows fit, llama.cpp's fallback where they do not: SmolLM2's 576-wide rows take
q5_0 for q4_k, q5_1 for q5_k, q8_0 for q6_k), quantized three ways:

- `rtn`: llama.cpp's reference quantizer, the bytes `llama-quantize` writes without an imatrix;
- `rtn+imatrix`: its importance-weighted quantizer with our importance matrix of the calibration
  windows, the bytes `llama-quantize --imatrix` writes with that file (tests/quant/
  test_llama_cpp_referee.py checks the bytes are equal);
- `gptq`: GPTQ's codes on grids llama.cpp's quantizer picks (quant/gptq.py), same bytes.

Calibration: 4096 tokens of WikiText-2 valid (8 windows of 512, seed 0); judged on WikiText-2 test
(20 windows of 512), KL to the float model with paired 95% intervals against `rtn+imatrix`.

    python bench/gptq_gguf.py [--types q4_0,q4_k,q5_0]    # about 6 minutes per type on 2 cores
"""
from __future__ import annotations

import argparse
import copy
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import CALIBRATION_TEXT, EVALUATION_TEXT, dithered_smollm2, paired_ratio, quality_row, write_results  # noqa: E402

from layerwise import load_model, token_windows  # noqa: E402
from layerwise.apply.quantize import plan_targets  # noqa: E402
from layerwise.evaluate import base_outputs, evaluate  # noqa: E402
from layerwise.plan import Plan  # noqa: E402
from layerwise.apply import quantize_  # noqa: E402
from layerwise.quant import QuantConfig  # noqa: E402
from layerwise.quant.imatrix import collect_imatrix, importance_for  # noqa: E402
from layerwise.quant.size import size_report  # noqa: E402

METHODS = ("rtn", "rtn+imatrix", "gptq")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--types", default="q4_0,q4_k,q5_0")
    parser.add_argument("--calib-tokens", type=int, default=4096)
    parser.add_argument("--eval-tokens", type=int, default=10240)
    parser.add_argument("--name", default="gptq_gguf")
    args = parser.parse_args()

    loaded = load_model(dithered_smollm2())
    calibration = token_windows(loaded.tokenizer, CALIBRATION_TEXT, tokens=args.calib_tokens, seq_len=512, seed=0)
    held_out = token_windows(loaded.tokenizer, EVALUATION_TEXT, tokens=args.eval_tokens, seq_len=512, seed=None)
    base = base_outputs(loaded, held_out, progress=False)
    imatrix = collect_imatrix(loaded, calibration, progress=False)
    rows = []
    for qtype in args.types.split(","):
        results = {}
        for method in METHODS:
            algorithm = "gptq" if method == "gptq" else "rtn"
            plan = Plan(QuantConfig(qtype, algorithm=algorithm, remainder="fallback"))
            model = copy.deepcopy(loaded)
            targets = plan_targets(model, plan)
            importance = importance_for(model, imatrix, list(targets)) if method == "rtn+imatrix" else None
            start = time.perf_counter()
            stored = quantize_(model, plan, calibration if algorithm == "gptq" else None, importance=importance,
                               progress=False)
            seconds = time.perf_counter() - start
            results[method] = quality_row(evaluate(model, base, progress=False)) | {
                "seconds": seconds, "linear_bytes": size_report(model, stored)["linear_bytes"],
                "types": sorted({q.config.format for q in stored.values()})}
            del model
        for method in METHODS:
            ratio, interval = paired_ratio(results[method], results["rtn+imatrix"])
            row = {"type": qtype, "method": method, **results[method], "ratio_to_imatrix": ratio,
                   "ratio_to_imatrix_ci": interval}
            rows.append(row)
            print(f"{qtype:5s} {method:12s} KL {row['kl']:.5f} [{row['kl_ci'][0]:.5f}, {row['kl_ci'][1]:.5f}]  "
                  f"ppl {row['perplexity']:.3f}  vs rtn+imatrix {ratio:.3f} [{interval[0]:.3f}, {interval[1]:.3f}]  "
                  f"{row['linear_bytes']:,} bytes  {row['seconds']:.0f} s", flush=True)
        write_results(args.name, {"command": "python bench/gptq_gguf.py " + " ".join(sys.argv[1:]),
                                  "model": "dithered SmolLM2-135M-Instruct (../shared/models/dither_smollm2.py)",
                                  "calibration": calibration.describe(), "evaluation": held_out.describe(),
                                  "rows": rows})
    print("\n| type | method | KL to float | vs rtn+imatrix (95% CI) | perplexity | linear bytes |")
    print("| --- | --- | ---: | ---: | ---: | ---: |")
    for row in rows:
        print(f"| {row['type']} | {row['method']} | {row['kl']:.4f} | {row['ratio_to_imatrix']:.3f} "
              f"[{row['ratio_to_imatrix_ci'][0]:.3f}, {row['ratio_to_imatrix_ci'][1]:.3f}] | "
              f"{row['perplexity']:.2f} | {row['linear_bytes']:,} |")


if __name__ == "__main__":
    main()
