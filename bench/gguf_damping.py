"""How GPTQ onto GGUF grids does as it damps its Hessian more (layerwise's GPTQ adds 1% of the
Hessian's mean diagonal, the reference implementation's choice), on text no step of
bench/vs_llama_cpp.py uses.

On the dithered SmolLM2 of bench/vs_llama_cpp.py, one file per damping: every tensor at the type
llama-quantize's Q5_K_M+imatrix file gives it, the Q5_1/Q5_0 tensors by GPTQ onto those grids (16384
tokens of the shipped mix, `layerwise export`'s default when this was measured; it is 65536 now), the rest (Q8_0, the down projections'
K-quants, the embedding) rounded with our importance matrix as llama-quantize rounds them. Judged
by `llama-perplexity --kl-divergence` against the f16 file on the second half of WikiText-2 valid
(`bench/vs_llama_cpp.py --domains wikitext2-valid-2nd-half`), 80 chunks of 512: mean KLD with
llama.cpp's +-, 99th and 99.9th percentile KLD, and the stock file on the same text. Then the counterpoint of tests/quant/test_llama_cpp_referee.py:
stories260K with q/k/v/o/gate/up at Q4_0, GPTQ on 4096 tokens of WikiText-2 valid at each damping
against rounding to nearest, llama-perplexity on the first 60,000 characters of WikiText-2 test
(20 chunks of 256). About 30 minutes on 2 cores; files are kept under
bench/out/vs_llama_cpp (run bench/vs_llama_cpp.py first: it makes the source, stock file and
importance matrix this reuses).

    python bench/gguf_damping.py [--damping 0.01,0.1,0.5,2.0]
"""
from __future__ import annotations

import argparse
import contextlib
import re
import sys
import time
from pathlib import Path
from typing import Iterator

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import CALIBRATION_TEXT, EVALUATION_TEXT, STORIES, dithered_smollm2, write_results  # noqa: E402
from vs_llama_cpp import HELD_OUT_CHUNKS, OUT, VALID_FIRST_LINE, cached, held_out_judge, run, tool  # noqa: E402

import layerwise.quant.gptq as gptq  # noqa: E402
from layerwise import load_model  # noqa: E402
from layerwise.export.run import run_export  # noqa: E402
from layerwise.models.gguf_reference import read_reference  # noqa: E402
from layerwise.plan.plan import Plan  # noqa: E402
from layerwise.plan.units import units_of  # noqa: E402
from layerwise.quant import QuantConfig  # noqa: E402

REFERENCE = "Q5_K_M+imatrix"


def stock_types_plan(folder: Path, reference: Path) -> Plan:
    """The reference file's type for every planned tensor; GPTQ where it is a 32-weight grid GPTQ
    improves on (Q5_1, Q5_0, Q4_0), rounding elsewhere."""
    loaded = load_model(folder)
    modules = ["model.embed_tokens"] + [name for unit in units_of(loaded.adapter, loaded.n_blocks, "tensor")
                                        for name in unit.modules]
    types = read_reference(loaded, reference, modules).tensor_types
    plan = Plan(None)
    for module in modules:
        qtype = types[module].lower()
        fitted = qtype in ("q5_1", "q5_0", "q4_0") and module != "model.embed_tokens"
        plan = plan.override(module, QuantConfig(qtype, algorithm="gptq" if fitted else "rtn"))
    return plan


@contextlib.contextmanager
def damped(damping: float) -> Iterator[None]:
    """GPTQ with `damping` (a share of the Hessian's mean diagonal) in place of its own 1%."""
    original = gptq.inverse_hessian_factor
    gptq.inverse_hessian_factor = lambda hessian, damp: original(hessian, damping)
    try:
        yield
    finally:
        gptq.inverse_hessian_factor = original


def stories_perplexity(damping: float | None) -> float:
    """llama-perplexity of stories260K with Q4_0 block linears: rounded (None) or GPTQ at `damping`."""
    held_out = cached(OUT / "wikitext2-test-60k.txt", lambda tmp: tmp.write_text(
        EVALUATION_TEXT.read_text(encoding="utf-8")[:60_000], encoding="utf-8"))
    algorithm = "rtn" if damping is None else "gptq"
    out = OUT / f"stories260K-q4_0-{algorithm}{'' if damping is None else f'-damping-{damping:g}'}.gguf"
    if not out.exists():
        plan = Plan(None).override(r"re:.*(q|k|v|o|gate|up)_proj", QuantConfig("q4_0", algorithm=algorithm))
        with contextlib.nullcontext() if damping is None else damped(damping):
            run_export(STORIES, plan=plan, out=out, calib=CALIBRATION_TEXT if damping is not None else None,
                       tokens=4096, progress=False)
    output = run([tool("llama-perplexity"), "-m", str(out), "-f", str(held_out), "-t", "2", "-c", "256", "-b", "256",
                  "--chunks", "20"], out.with_suffix(".log"))
    found = re.search(r"Final estimate: PPL = ([0-9.]+)", output)
    if not found:
        sys.exit(f"no final perplexity in {out.with_suffix('.log')}")
    return float(found[1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--damping", default="0.01,0.1,0.5,2.0")
    args = parser.parse_args()
    dampings = [float(value) for value in args.damping.split(",")]
    started = time.perf_counter()
    folder = dithered_smollm2()
    reference, imatrix = OUT / f"stock-{REFERENCE}.gguf", OUT / "imatrix-ours-output.gguf"
    judge = held_out_judge([reference, imatrix], REFERENCE)
    plan = stock_types_plan(folder, reference)
    rows = [{"file": "llama-quantize Q5_K_M+imatrix", "damping": None, "bytes": reference.stat().st_size}
            | judge(reference, "stock")]
    for damping in dampings:
        ours = OUT / f"damping-{damping:g}-Q5_K_M-types.gguf"
        if not ours.exists():
            with damped(damping):
                run_export(folder, plan=plan, out=ours, imatrix=imatrix, tokens=16384, progress=False)
        rows.append({"file": "Q5_K_M+imatrix's types, GPTQ onto Q5_1/Q5_0", "damping": damping,
                     "bytes": ours.stat().st_size} | judge(ours, f"{damping:g}"))
    stories = {"round to nearest": stories_perplexity(None)}
    for damping in dampings:
        stories[f"gptq damping {damping:g}"] = stories_perplexity(damping)
    for name, value in stories.items():
        print(f"stories260K Q4_0 {name:>20}: perplexity {value:.4f}", flush=True)
    write_results("gguf_damping", {
        "model": "dithered SmolLM2-135M-Instruct (../shared/models/dither_smollm2.py)",
        "judge": f"llama-perplexity --kl-divergence against the f16 file, WikiText-2 valid from line {VALID_FIRST_LINE}, "
                 f"{HELD_OUT_CHUNKS} chunks of 512",
        "stories260K": {"judge": "llama-perplexity, WikiText-2 test's first 60,000 characters, 20 chunks of 256",
                        "perplexity": stories},
        "seconds": time.perf_counter() - started, "rows": rows})


if __name__ == "__main__":
    main()
