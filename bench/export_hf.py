"""GGUF export of a Hugging Face model (stories260K) through llama.cpp's converter, run by llama.cpp.

    python bench/export_hf.py --llama-cpp /path/to/llama.cpp/build/bin --converter /path/to/llama.cpp [--chunks 20]

`layerwise export MODEL_FOLDER --format gguf` converts the folder with llama.cpp's
convert_hf_to_gguf.py (metadata, tokenizer, float tensors), then writes our quantized codes
for every tensor the plan names. Each plan's file is scored by `llama-perplexity` on
wiki.test.raw (512-token chunks, the second half of each scored), next to our own evaluation of
the same plan under the same protocol (bench/export.py's). stories260K knows children's stories,
not Wikipedia (perplexity about 130 on it): the numbers show agreement, not quality.
Writes bench/results/export_hf.json.
"""
from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import STORIES, write_results  # noqa: E402
from export import llama_perplexity, our_perplexity_llama_protocol  # noqa: E402

from layerwise import load_model  # noqa: E402
from layerwise.apply.run import run_quantize  # noqa: E402
from layerwise.export.run import run_export  # noqa: E402
from layerwise.plan import Plan  # noqa: E402
from layerwise.quant import QuantConfig  # noqa: E402

# stories260K's down_proj rows are 172 wide, which no GGUF block type divides: they stay float.
PLANS = {
    "converted, nothing quantized": Plan(None),
    "q8_0 (down_proj float)": Plan(None).override("re:.*(q|k|v|o|gate|up)_proj", QuantConfig("q8_0")),
    "mixed q8_0 / q5_1 / q4_0": (Plan(None).override("re:.*(q|v|o|gate|up)_proj", QuantConfig("q8_0"))
                                 .override("re:.*k_proj", QuantConfig("q4_0"))
                                 .override("re:.*layers\\.[34]\\.mlp\\.(gate|up)_proj", QuantConfig("q5_1"))),
}


def _adds_bos(reader) -> bool:
    """Whether llama.cpp prepends BOS: the file's tokenizer.ggml.add_bos_token, else its default
    for the vocabulary type (on for SentencePiece, "llama")."""
    field = reader.fields.get("tokenizer.ggml.add_bos_token")
    if field is not None:
        return bool(field.contents())
    return str(reader.fields["tokenizer.ggml.model"].contents()) == "llama"


def main() -> None:
    import gguf

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--llama-cpp", required=True, help="folder with llama-perplexity")
    parser.add_argument("--converter", required=True, help="convert_hf_to_gguf.py or its llama.cpp folder")
    parser.add_argument("--chunks", type=int, default=20)
    args = parser.parse_args()
    rows = []
    with tempfile.TemporaryDirectory() as scratch:
        for name, plan in PLANS.items():
            path = Path(scratch) / f"stories-{len(rows)}.gguf"
            start = time.perf_counter()
            report = run_export(STORIES, plan=plan, out=path, converter=args.converter, progress=False)
            export_seconds = time.perf_counter() - start
            reader = gguf.GGUFReader(path)
            add_bos = _adds_bos(reader)
            quantized, stored, _ = run_quantize(load_model(STORIES), plan, progress=False)
            row = {"name": name, "file_bytes": report["file_bytes"], "tensors_by_type": report["tensors_by_type"],
                   "planned_tensor_bytes": report["planned_tensor_bytes"],
                   "predicted_tensor_bytes": sum(q.n_bits for q in stored.values()) // 8,
                   "export_seconds": export_seconds, "add_bos": add_bos,
                   "llama_perplexity": llama_perplexity(Path(args.llama_cpp), path, args.chunks),
                   "our_perplexity_same_protocol": our_perplexity_llama_protocol(quantized, args.chunks,
                                                                                add_bos=add_bos)}
            rows.append(row)
            print(f"{name:32s} {row['file_bytes']:>10,} bytes  llama.cpp PPL {row['llama_perplexity']:.3f}  "
                  f"ours {row['our_perplexity_same_protocol']:.3f}", flush=True)
    write_results("export_hf", {"model": str(STORIES), "chunks": args.chunks, "converter": args.converter,
                                "rows": rows})
    print("\n| plan | file bytes | planned tensor bytes (predicted) | llama.cpp perplexity | layerwise perplexity "
          "(same protocol) | difference | export s |")
    print("| --- | ---: | ---: | ---: | ---: | ---: | ---: |")
    for row in rows:
        gap = row["our_perplexity_same_protocol"] / row["llama_perplexity"] - 1
        print(f"| {row['name']} | {row['file_bytes']:,} | {row['planned_tensor_bytes']:,} "
              f"({row['predicted_tensor_bytes']:,}) | {row['llama_perplexity']:.3f} | "
              f"{row['our_perplexity_same_protocol']:.3f} | {gap:+.2%} | {row['export_seconds']:.1f} |")


if __name__ == "__main__":
    main()
