"""Projected memory and time of each command for 1B, 8B and 70B Llama shapes, from what each
command holds (a component model) checked against bench/memory.py's measured SmolLM2 peaks.

Nothing here runs a large model: a command's peak above the floor (imports and code, which do not
grow with the model) is the sum of the tensors it holds at once, counted from the model's shape:

- model: every parameter in the working dtype (in memory only);
- block: one block's parameters (streamed: only the current block is read);
- head slice: streamed, the head is read and applied `models.streaming.HEAD_SLICE_ELEMENTS` rows x h
  at a time for each application (the embedding reads only its tokens' rows), so commands that
  apply it hold one slice, 4M entries, instead of the V x h matrix; the compressed-tensors export
  writes the embedding and an untied head a slice at a time too (its packed output goes to a
  scratch file a module at a time, in memory or streamed);
- tokenizer: its resident vocabulary, 13.5 MiB for SmolLM2's 49k entries (what loading it adds
  to a process that has the floor's imports; the 73 MiB counted before included transformers'
  tokenizer code, which the floor imports), scaled by V;
- head work: the head applied a chunk of positions at a time (`engine.replay.HEAD_CHUNK_ELEMENTS`
  logits, their log-softmax and the KL's float64 pieces): about 50 MB whatever the model;
- codes: the stored codes of every quantized linear, one byte per weight (`QTensor.compact`), in
  memory; streamed, one block's (the others wait on disk: `apply.storage.StoredModules`);
- bank: none for the measured `plan` (the default allocator measures each plan once); a searching
  allocator (`hybrid`, `evolutionary`) adds 1.25 bytes per planned weight (`measure.fitness`);
- base: eval's base next-token distributions, float16, tokens x V (in memory only);
- activations: a block's inputs and outputs for every calibration token (tokens x h, twice; a
  streamed plan's check: the plan's states and the base model's last ones);
- ablation states: the profile's ablation carries a wave of eight ablations' states, the base
  model's input and its last output (tokens x h each);
- hessians: GPTQ's input statistics of one block, float32, one per distinct input (linears handed
  the same tensor share one): q/k/v's, o's and gate/up's are h-wide (h x h each), down's i-wide
  (i x i); and, while the widest is factored, two float64 copies of it (i x i x 8 each).

The same sums for SmolLM2 are printed beside its measured peaks (bench/results/memory.json), so
the model's error is visible; then the projection for Llama 3.2 1B and Llama 3.1 8B and 70B shapes
in float32 (the CPU default) and bfloat16 (the GPU default), and whether the peak fits a 24 GB GPU
(23 GB usable). Time: SmolLM2's measured seconds on this machine, less the floor's (imports),
scaled by parameters (the work per token is proportional to them; for the ablation, which runs
every block's ablations through the later blocks, by parameters times depth), so hours on 2 CPU
cores; a GPU was not measured. `load` is left out (its streamed peak is the loader's bookkeeping alone).

    python bench/project.py
"""
from __future__ import annotations

import argparse
import json
import sys
from dataclasses import dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import RESULTS, write_results  # noqa: E402

MB = 1e6
GPU_USABLE = 23e9  # a 24 GB card less the CUDA context
TOKENIZER_BYTES_PER_ENTRY = 13.5 * 2**20 / 49152  # SmolLM2's tokenizer, measured resident
HEAD_WORK = 50 * MB
HEAD_SLICE_ELEMENTS = 1 << 22  # layerwise.models.streaming.HEAD_SLICE_ELEMENTS
# Tokens each command of bench/memory.py runs on (profile 1024, quantize and eval 4096).
TOKENS = {"profile": 1024, "profile (ablation)": 1024, "quantize (gptq)": 4096, "eval": 4096,
          "plan (table reused)": 4096, "export (compressed-tensors)": 0}
# States the profile's ablation holds beside the forward's: a wave of ablations
# (`profile.ablation._VARIANTS_AT_ONCE`), the base model's carried input and its last output.
ABLATION_STATES = 8 + 2


@dataclass(frozen=True)
class Shape:
    hidden: int
    layers: int
    intermediate: int
    heads: int
    kv_heads: int
    vocab: int
    tied: bool

    @property
    def block_linear_params(self) -> int:
        head_dim = self.hidden // self.heads
        attention = 2 * self.hidden * self.hidden + 2 * self.hidden * self.kv_heads * head_dim
        return attention + 3 * self.hidden * self.intermediate

    @property
    def block_params(self) -> int:
        return self.block_linear_params + 2 * self.hidden  # two norms

    @property
    def edge_params(self) -> int:
        return self.vocab * self.hidden

    @property
    def params(self) -> int:
        return self.layers * self.block_params + self.edge_params * (1 if self.tied else 2) + self.hidden

    @property
    def planned(self) -> int:
        return self.layers * self.block_linear_params


SHAPES = {
    "SmolLM2-135M": Shape(576, 30, 1536, 9, 3, 49152, True),
    "Llama-3.2-1B": Shape(2048, 16, 8192, 32, 8, 128256, True),
    "Llama-3.1-8B": Shape(4096, 32, 14336, 32, 8, 128256, False),
    "Llama-3.1-70B": Shape(8192, 80, 28672, 64, 8, 128256, False),
}


def components(shape: Shape, command: str, mode: str, dtype_bytes: int) -> dict[str, float]:
    """The tensors `command` holds at its peak, in bytes, by what they are."""
    tokens = TOKENS[command]
    held = {"tokenizer": TOKENIZER_BYTES_PER_ENTRY * shape.vocab}
    if mode == "memory":
        held["model"] = shape.params * dtype_bytes
    else:
        held["block"] = shape.block_params * dtype_bytes
        if command in ("profile", "profile (ablation)", "eval", "plan (table reused)", "export (compressed-tensors)"):
            held["head slice"] = min(shape.edge_params, HEAD_SLICE_ELEMENTS) * dtype_bytes
    if command in ("profile", "profile (ablation)", "eval", "plan (table reused)"):
        held["head work"] = HEAD_WORK
    if command in ("quantize (gptq)", "eval", "export (compressed-tensors)"):
        held["codes"] = shape.planned * 1.0 if mode == "memory" else shape.planned / shape.layers
    if command == "eval" and mode == "memory":
        held["base"] = tokens * shape.vocab * 2
    if command in ("profile", "profile (ablation)", "quantize (gptq)", "eval") or (
            command == "plan (table reused)" and mode == "streaming"):
        held["activations"] = 2 * tokens * shape.hidden * dtype_bytes
    if command == "profile (ablation)":
        held["ablation states"] = ABLATION_STATES * tokens * shape.hidden * dtype_bytes
    if command == "quantize (gptq)":
        held["hessians"] = 4 * (3 * shape.hidden ** 2 + shape.intermediate ** 2) + 2 * 8 * shape.intermediate ** 2
    return held


def measured_rows() -> tuple[dict[tuple[str, str], dict], float]:
    """SmolLM2's measured rows of the projected commands, and the floor's seconds."""
    document = json.loads((RESULTS / "memory.json").read_text())
    rows = {(row["command"], row["mode"]): row for row in document["rows"] if row["model"] == "SmolLM2-135M"}
    return {key: row for key, row in rows.items() if key[0] in TOKENS}, rows["floor", "memory"]["seconds"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--name", default="projection")
    args = parser.parse_args()
    measured, floor_seconds = measured_rows()
    smol = SHAPES["SmolLM2-135M"]
    check = []
    for (command, mode), row in measured.items():
        predicted = sum(components(smol, command, mode, 4).values())
        check.append({"command": command, "mode": mode, "measured_above_floor_bytes": row["above_floor_bytes"],
                      "predicted_bytes": predicted, "predicted_x_measured": predicted / row["above_floor_bytes"]})
    print("SmolLM2-135M, float32: component model against bench/memory.py (above the floor)")
    print(f"{'command':30} {'mode':9} {'measured MB':>11} {'predicted MB':>12} {'ratio':>6}")
    for row in check:
        print(f"{row['command']:30} {row['mode']:9} {row['measured_above_floor_bytes'] / MB:11.0f} "
              f"{row['predicted_bytes'] / MB:12.0f} {row['predicted_x_measured']:6.2f}")

    rows = []
    for name, shape in SHAPES.items():
        if name == "SmolLM2-135M":
            continue
        for (command, mode), row in measured.items():
            # The ablation runs each block's variants through every later block: its work grows
            # with depth as well as with the parameters.
            scale = shape.params / smol.params * (shape.layers / smol.layers if command == "profile (ablation)" else 1)
            for dtype, size in (("float32", 4), ("bfloat16", 2)):
                held = components(shape, command, mode, size)
                peak = sum(held.values())
                rows.append({"model": name, "params": shape.params, "command": command, "mode": mode,
                             "dtype": dtype, "peak_bytes": peak, "x_fp32_model": peak / (4 * shape.params),
                             "largest": max(held, key=held.get), "components": held,
                             "fits_24gb_gpu": peak <= GPU_USABLE,
                             "cpu_hours": (row["seconds"] - floor_seconds) * scale / 3600})
    print("\nprojected peak above the floor (GB), float32 | bfloat16, and CPU hours on this machine")
    commands = list(dict.fromkeys(row["command"] for row in rows))
    for name in dict.fromkeys(row["model"] for row in rows):
        print(f"\n{name} ({SHAPES[name].params / 1e9:.2f}B parameters)")
        for command in commands:
            for mode in ("memory", "streaming"):
                pair = [r for r in rows if (r["model"], r["command"], r["mode"]) == (name, command, mode)]
                if not pair:
                    continue
                fp32, bf16 = pair
                fits = "fits 24 GB" if bf16["fits_24gb_gpu"] else "too large for 24 GB"
                print(f"  {command:30} {mode:9} {fp32['peak_bytes'] / 1e9:7.1f} | {bf16['peak_bytes'] / 1e9:6.1f} GB "
                      f"({fits} in bf16; largest: {bf16['largest']})  {fp32['cpu_hours']:8.1f} h")
    write_results(args.name, {"assumptions": __doc__, "shapes": {k: vars(v) for k, v in SHAPES.items()},
                              "check_against_smollm2": check, "rows": rows})


if __name__ == "__main__":
    main()
