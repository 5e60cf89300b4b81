"""How many calibration tokens GPTQ onto GGUF grids should fit on, chosen on text no step of
bench/vs_llama_cpp.py uses.

The default Q5_K_M+imatrix plan of bench/vs_llama_cpp.py (its `plan-tensor-Q5_K_M+imatrix.json`:
the types and the GPTQ/rounding choice per tensor stay fixed) exported by `layerwise export` with
GPTQ fitted on each token count of the shipped mix (`--tokens`; the rest of the file is the
same), judged by `llama-perplexity --kl-divergence` against the f16 source on the second half of
WikiText-2 valid (`bench/vs_llama_cpp.py --domains wikitext2-valid-2nd-half`), 80 chunks of 512:
mean KLD with llama.cpp's +-, 99th and 99.9th percentile KLD, and the stock file on the same text.
This is what set `layerwise.apply.run.QUANTIZE_TOKENS` to 65536 (the mix's prose text holds 34
windows of 512, so 65536, 32 per domain, is about all of it). About 6 minutes per export and 3
per judgement on 2 cores; files are kept under bench/out/vs_llama_cpp (run bench/vs_llama_cpp.py
--references Q5_K_M+imatrix first: this reuses its source, plan, stock file and importance matrix).

    python bench/gptq_tokens.py [--tokens 16384,65536]
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import dithered_smollm2, write_results  # noqa: E402
from vs_llama_cpp import HELD_OUT_CHUNKS, OUT, VALID_FIRST_LINE, held_out_judge  # noqa: E402

from layerwise.export.run import run_export  # noqa: E402

REFERENCE = "Q5_K_M+imatrix"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", default="16384,65536")
    args = parser.parse_args()
    counts = [int(value) for value in args.tokens.split(",")]
    started = time.perf_counter()
    reference, plan = OUT / f"stock-{REFERENCE}.gguf", OUT / f"plan-tensor-{REFERENCE}.json"
    judge = held_out_judge([reference, plan], REFERENCE)
    rows = [{"file": f"llama-quantize {REFERENCE}", "tokens": None, "bytes": reference.stat().st_size}
            | judge(reference, "stock")]
    for tokens in counts:
        ours = OUT / f"tokens-{tokens}-{REFERENCE}.gguf"
        if not ours.exists():
            run_export(dithered_smollm2(), plan=plan, out=ours, tokens=tokens, progress=False)
        rows.append({"file": f"the default {REFERENCE} plan, GPTQ on --tokens", "tokens": tokens,
                     "bytes": ours.stat().st_size} | judge(ours, str(tokens)))
    write_results("gptq_tokens", {
        "model": "dithered SmolLM2-135M-Instruct, f16 GGUF by convert_hf_to_gguf.py",
        "plan": f"bench/vs_llama_cpp.py's default plan no larger than {REFERENCE}",
        "judge": f"llama-perplexity --kl-divergence, {HELD_OUT_CHUNKS} chunks of 512 of WikiText-2 valid from line "
                 f"{VALID_FIRST_LINE}",
        "seconds": time.perf_counter() - started, "rows": rows})


if __name__ == "__main__":
    main()
