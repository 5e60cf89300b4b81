"""Our mixed-precision GGUF of SmolLM2 against llama.cpp's own tools, measured by llama.cpp.

    python bench/export.py --llama-cpp /path/to/llama.cpp/build/bin [--chunks 20] [--budgets 5.0,5.5]

llama.cpp is not a dependency: build its `llama-quantize` and `llama-perplexity` (for example from
the sources vendored in the llama-cpp-python sdist; bench/README.md says how) and point
--llama-cpp at them. Steps, all from one base:

1. The base: the shared Q4_1 GGUF written as F16 by `llama-quantize --allow-requantize`.
2. llama.cpp's stock mixes Q4_0, Q4_1, Q5_0, Q8_0 of that base, by `llama-quantize`.
3. Our plans: a sensitivity table over q4_0/q5_0/q5_1/q8_0 per sublayer (WikiText-2 valid), the
   exact allocator at each of --budgets bits per weight of the block linears, token embeddings at
   q8_0 like llama.cpp's mixes; written by our GGUF export from the F16 base. Its time is
   compared with gguf-py alone reading that file and writing the same tensors again.
4. Perplexity of every file by `llama-perplexity` on wiki.test.raw (512-token chunks, the second
   half of each scored), and of our plan by our own evaluation under the same protocol.

Writes bench/results/export.json.
"""
from __future__ import annotations

import argparse
import math
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import CALIBRATION_TEXT, EVALUATION_TEXT, SMOLLM2, write_results  # noqa: E402

from layerwise import load_model, token_windows  # noqa: E402
from layerwise.apply.run import run_quantize  # noqa: E402
from layerwise.export.gguf import export_gguf  # noqa: E402
from layerwise.measure.run import plan_from_choice  # noqa: E402
from layerwise.measure.sensitivity import measure_sensitivity  # noqa: E402
from layerwise.plan import allocate  # noqa: E402
from layerwise.quant import QuantConfig  # noqa: E402

# Not q4_1: the shared weights already lie on a Q4_1 grid (../shared/README.md), so q4_1 would be
# nearly lossless here and the allocator would simply pick it everywhere.
OPTIONS = "q4_0,q5_0,q5_1,q8_0"
STOCK = ("Q4_0", "Q4_1", "Q5_0", "Q8_0")


def run(command: list[str]) -> tuple[str, float]:
    start = time.perf_counter()
    done = subprocess.run(command, capture_output=True, text=True)
    if done.returncode != 0:
        raise SystemExit(f"{' '.join(command)} failed:\n{done.stderr[-3000:]}")
    return done.stdout + done.stderr, time.perf_counter() - start


def llama_perplexity(binary: Path, model: Path, chunks: int) -> float:
    output, _ = run([str(binary / "llama-perplexity"), "-m", str(model), "-f", str(EVALUATION_TEXT), "-c", "512",
                     "-b", "512", "--chunks", str(chunks), "-t", "2"])
    match = re.search(r"Final estimate: PPL = ([0-9.]+)", output)
    if not match:
        raise SystemExit(f"no perplexity in llama-perplexity's output:\n{output[-2000:]}")
    return float(match.group(1))


@torch.no_grad()
def our_perplexity_llama_protocol(loaded, chunks: int, n_ctx: int = 512, add_bos: bool | None = None) -> float:
    """llama-perplexity's protocol: the whole file tokenized (with BOS where the tokenizer adds
    one, or as `add_bos` says: the GGUF's tokenizer.ggml.add_bos_token, which llama.cpp obeys),
    cut into n_ctx chunks, each chunk's first token then set to BOS, and only the second half of
    each chunk scored."""
    # Bytes as they are: read_text() would turn the file's CRLF line ends into LF, which
    # llama.cpp keeps, and the two would then score different token streams.
    text = EVALUATION_TEXT.read_bytes().decode("utf-8")
    tokens = loaded.tokenizer(text, add_special_tokens=False)["input_ids"]
    if add_bos is None:
        add_bos = getattr(loaded.tokenizer, "add_bos_token", False)
    bos = loaded.tokenizer.bos_token_id if add_bos else None
    if bos is not None:
        tokens = [bos] + tokens
    first = n_ctx // 2
    nll, count = 0.0, 0
    for chunk in range(min(chunks, len(tokens) // n_ctx)):
        ids = list(tokens[chunk * n_ctx:(chunk + 1) * n_ctx])
        if bos is not None:
            ids[0] = bos
        logits = loaded.model(input_ids=torch.tensor([ids]), use_cache=False).logits[0].double()
        logprobs = torch.log_softmax(logits[first:n_ctx - 1], dim=-1)
        targets = torch.tensor(ids[first + 1:n_ctx])
        nll -= logprobs.gather(1, targets[:, None]).sum().item()
        count += len(targets)
    return math.exp(nll / count)


def gguf_py_write_seconds(path: Path, out: Path) -> float:
    """gguf-py alone: read `path` (as our export reads its source) and write its tensors and
    metadata again."""
    import gguf

    start = time.perf_counter()
    reader = gguf.GGUFReader(path)
    writer = gguf.GGUFWriter(out, str(reader.fields["general.architecture"].contents()))
    for field in reader.fields.values():
        if field.name.startswith("GGUF.") or field.name == "general.architecture":
            continue
        value_type = field.types[0]
        sub_type = field.types[-1] if value_type == gguf.GGUFValueType.ARRAY else None
        writer.add_key_value(field.name, field.contents(), value_type, sub_type=sub_type)
    for tensor in reader.tensors:
        writer.add_tensor_info(tensor.name, tensor.data.shape, tensor.data.dtype, tensor.data.nbytes,
                               raw_dtype=tensor.tensor_type)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_ti_data_to_file()
    for tensor in reader.tensors:
        writer.write_tensor_data(tensor.data, tensor_endianess=reader.endianess)
    writer.close()
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--llama-cpp", required=True, help="folder with llama-quantize and llama-perplexity")
    parser.add_argument("--chunks", type=int, default=20)
    parser.add_argument("--budgets", default="5.0,5.5",
                        help="bits per weight of the block linears (4.5 = Q4_0's size, 5.5 = Q5_0's)")
    parser.add_argument("--table-tokens", type=int, default=1024)
    args = parser.parse_args()
    binary = Path(args.llama_cpp)
    budgets = [float(b) for b in args.budgets.split(",")]
    rows: list[dict] = []
    with tempfile.TemporaryDirectory() as scratch:
        scratch = Path(scratch)
        base = scratch / "smollm2-f16.gguf"
        run([str(binary / "llama-quantize"), "--allow-requantize", str(SMOLLM2), str(base), "F16"])
        for stock in STOCK:
            path = scratch / f"stock-{stock}.gguf"
            _, seconds = run([str(binary / "llama-quantize"), str(base), str(path), stock])
            rows.append({"name": f"llama.cpp {stock}", "path": path, "file_bytes": path.stat().st_size,
                         "quantize_seconds": seconds})

        loaded = load_model(base)
        windows = token_windows(loaded.tokenizer, CALIBRATION_TEXT, tokens=args.table_tokens, seed=0)
        table = measure_sensitivity(loaded, windows, OPTIONS, "sublayer")
        quantized_models = {}
        for budget in budgets:
            problem = table.problem(table.budget_bits(budget))
            allocation = allocate(problem, "exact")
            plan = plan_from_choice(table, allocation.choice).override(loaded.adapter.embed, QuantConfig("q8_0"))
            labels = allocation.labels(problem)
            ours = scratch / f"layerwise-{budget}.gguf"
            quantized, stored, sizes = run_quantize(load_model(base), plan, progress=False)
            start = time.perf_counter()
            report = export_gguf(quantized, stored, ours)
            export_seconds = time.perf_counter() - start
            name = f"layerwise exact plan at {budget} bpw"
            quantized_models[name] = quantized
            rows.append({"name": name, "path": ours, "file_bytes": report["file_bytes"],
                         "options_used": {o: labels.count(o) for o in table.options if o in labels},
                         "planned_tensor_bytes": report["planned_tensor_bytes"],
                         "predicted_tensor_bytes": sizes["linear_bytes"] + sizes["embeddings_and_head_bytes"],
                         "export_seconds": export_seconds,
                         "gguf_py_seconds": gguf_py_write_seconds(ours, scratch / "rewritten.gguf")})
        rows.append({"name": "F16 base", "path": base, "file_bytes": base.stat().st_size})
        quantized_models["F16 base"] = load_model(base)

        for row in rows:
            row["llama_perplexity"] = llama_perplexity(binary, row.pop("path"), args.chunks)
            if row["name"] in quantized_models:
                row["our_perplexity_same_protocol"] = our_perplexity_llama_protocol(quantized_models[row["name"]],
                                                                                    args.chunks)
            print(f"{row['name']:40s} {row['file_bytes']:>12,} bytes  llama.cpp PPL {row['llama_perplexity']:.3f}",
                  flush=True)

    write_results("export", {"model": str(SMOLLM2), "chunks": args.chunks, "budgets": budgets,
                             "options": OPTIONS, "rows": rows})
    print("\n| file | bytes | llama.cpp perplexity | layerwise perplexity (same protocol) | difference |")
    print("| --- | ---: | ---: | ---: | ---: |")
    for row in rows:
        ours_ppl = row.get("our_perplexity_same_protocol")
        gap = "" if ours_ppl is None else f"{ours_ppl / row['llama_perplexity'] - 1:+.2%}"
        print(f"| {row['name']} | {row['file_bytes']:,} | {row['llama_perplexity']:.3f} | "
              f"{'' if ours_ppl is None else f'{ours_ppl:.3f}'} | {gap} |")
    print("\n| plan | planned tensor bytes written | predicted | export s | gguf-py read + write s | options |")
    print("| --- | ---: | ---: | ---: | ---: | --- |")
    for row in rows:
        if "planned_tensor_bytes" in row:
            print(f"| {row['name']} | {row['planned_tensor_bytes']:,} | {row['predicted_tensor_bytes']:,} | "
                  f"{row['export_seconds']:.1f} | {row['gguf_py_seconds']:.1f} | {row['options_used']} |")


if __name__ == "__main__":
    main()
