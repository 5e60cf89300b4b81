"""How much memory each command holds at its peak, as a multiple of the float32 model.

Each command runs in a child process of its own (a small wrapper that starts the `layerwise` CLI
and reads its peak resident set size from the kernel once it has exited), on stories260K and on
SmolLM2 (the off-grid copy of ../shared/README.md, loaded from its float16 folder as float32, the
model bench/robust.py's saved table belongs to), with settings a new user would pick. Python, torch,
transformers and the model family's code (its config read and its modules built on the meta device,
no weights) take a few hundred MB before any weight is read; the `floor` row measures that in the
same way, and `above_floor_bytes` is a command's peak less it, which is what scales with the model. Each command
but the floor (all of them stream: `--streaming`) runs again in mode "streaming", its time
also given as a ratio to the in-memory run of the same command (`seconds_x_memory`), and set
against issue 17's target (`target_bytes`, `meets_target`): above the floor at most 0.3x the
float32 model plus the hidden states of the command's tokens at one block (float32).

    python bench/memory.py                     # both models, about 50 minutes on 2 cores
    python bench/memory.py --models SmolLM2-135M --skip "plan,plan (table reused)"    # the rest: about 10 minutes
    python bench/memory.py --models stories260K    # 4 minutes
"""
from __future__ import annotations

import argparse
import json
import resource
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import DITHERED_SMOLLM2, EVALUATION_TEXT, RESULTS, STORIES, dithered_smollm2, write_results  # noqa: E402

OUT = Path(__file__).resolve().parent / "out" / "memory"
MODELS = {"stories260K": STORIES, "SmolLM2-135M": DITHERED_SMOLLM2}
# SmolLM2's plan also runs from the saved four-domain table of bench/robust.py (a copy), so the plan
# search and never-worse check are measured without the table's 40 minutes.
REUSED_TABLE = {"SmolLM2-135M": RESULTS / "robust_sensitivity.json"}
# stories260K's MLP rows (172 columns) split into no group of 64: its plan takes whole-row options.
# SmolLM2's fresh plan measures a small table (whole blocks, two options): with the defaults (sublayers,
# six options) the table takes about an hour here, in memory or streamed, too long to repeat.
PLAN_SETTINGS = {"stories260K": ["--options", "int2pc,int3pc,int4pc,int6pc,int8pc"],
                 "SmolLM2-135M": ["--options", "int4g64,int8g64", "--granularity", "block"]}
LAYERWISE = [sys.executable, "-m", "layerwise.cli"]
PROMPTS = Path(__file__).resolve().parent.parent / "tests" / "data" / "story_prompts.txt"


FLOOR = ("peak of a process that imports torch, transformers and layerwise, reads the model's config and "
         "builds its modules on the meta device (no weights): code and fixed costs, which do not grow with the model")

# Commands that take --streaming (all of them now).
STREAMING = ("load", "profile", "profile (ablation)", "plan", "plan (table reused)", "plan (like a GGUF file)",
             "quantize (gptq)", "eval", "export (compressed-tensors)", "export (hf)", "drop", "diverge")
# Tokens each command runs at once (as in `commands`; a plan's never-worse check runs 4096 by
# default, more than its table's 1024): the streaming target allows 0.3x the float32 model
# plus "the calibration activations of one block", read here strictly as those tokens' hidden
# states at one block's input, in float32 (not the block's working memory on a batch).
TOKENS = {"profile": 1024, "profile (ablation)": 1024, "plan": 4096, "plan (table reused)": 4096,
          "plan (like a GGUF file)": 4096, "quantize (gptq)": 4096, "eval": 4096,
          "export (compressed-tensors)": 0, "export (hf)": 0,  # the plan rounds to nearest: no calibration text
          "drop": 1024, "diverge": 0}  # diverge: a few short prompts
# The GGUF file SmolLM2's plan is made no larger than (--budget-like, which makes the embedding a unit
# too): our export of it at Q5_0 with the embedding at Q8_0, as llama-quantize's files keep it.
LIKE_A_FILE = {"SmolLM2-135M": ["--options", "q4_0,q5_0,q8_0", "--granularity", "block"]}
TARGET_X_FP32 = 0.3


def streaming_argv(command: str, argv: list[str]) -> list[str]:
    if command == "load":
        return [*argv[:-1], argv[-1].replace(")", ", streaming=True)")]
    return [*argv, "--streaming"]


def commands(name: str, work: Path) -> dict[str, list[str]]:
    """The commands measured, in order (later ones read what earlier ones wrote)."""
    model = MODELS[name]
    quiet = ["--quiet", "--overwrite"]
    options = PLAN_SETTINGS.get(name, [])
    exported = "plan-reused.json" if name in REUSED_TABLE else "plan.json"
    return {
        "floor": [sys.executable, "-c", "import torch, layerwise.cli; from layerwise.models.checkpoint import skeleton; "
                  "from layerwise.models.loading import load_config, resolve_source; "
                  f"skeleton(load_config(resolve_source({str(model)!r})), torch.float32)"],
        "load": [sys.executable, "-c", f"from layerwise import load_model; load_model({str(model)!r})"],
        "profile": [*LAYERWISE, "profile", str(model), "--tokens", "1024", "--out", str(work / "profile"), *quiet],
        # The KL of the model without each block (the profile's ablation: waves of blocks' variants
        # carried through the later blocks, compared at the head a slice of rows at a time).
        "profile (ablation)": [*LAYERWISE, "profile", str(model), "--tokens", "1024", "--ablation", "block",
                               "--out", str(work / "profile-ablation"), *quiet],
        "plan": [*LAYERWISE, "plan", str(model), "--budget", "4.25", "--tokens", "1024",
                 *options, "--out", str(work / "plan.json"), *quiet],
        **({"plan (table reused)": [*LAYERWISE, "plan", str(model), "--budget", "4.25", "--table",
                                    str(work / "table.json"), "--out", str(work / "plan-reused.json"), *quiet]}
           if name in REUSED_TABLE else {}),
        "quantize (gptq)": [*LAYERWISE, "quantize", str(model), "--method", "gptq", "--bits", "4", "--group-size",
                            "64" if name == "SmolLM2-135M" else "none", "--tokens", "4096", "--out", str(work / "gptq"), *quiet],
        "eval": [*LAYERWISE, "eval", str(model), "--quantized", str(work / "gptq"), "--data", str(EVALUATION_TEXT),
                 "--tokens", "4096", *quiet],
        **({"plan (like a GGUF file)": [*LAYERWISE, "plan", str(model), "--budget-like", str(work / "reference.gguf"),
                                        "--tokens", "1024", *LIKE_A_FILE[name], "--out", str(work / "plan-like.json"),
                                        *quiet]}
           if name in LIKE_A_FILE else {}),
        # The plan's int options are not GGUF types: compressed-tensors stores them as they are.
        "export (compressed-tensors)": [*LAYERWISE, "export", str(model), "--plan", str(work / exported),
                                        "--format", "compressed-tensors", "--out", str(work / "export"), *quiet],
        "export (hf)": [*LAYERWISE, "export", str(model), "--plan", str(work / exported), "--format", "hf",
                        "--out", str(work / "export-hf"), *quiet],
        # The KL of the model without each block, measured (not the one-pass block influence).
        "drop": [*LAYERWISE, "drop", str(model), "--blocks", "2", "--by", "ablation", "--tokens", "1024",
                 "--out", str(work / "drop"), *quiet],
        "diverge": [*LAYERWISE, "diverge", str(model), str(work / "gptq"), "--prompts", str(PROMPTS), "--quiet"],
    }


def reference_file(model: Path, out: Path) -> None:
    """The GGUF file a plan "like a GGUF file" is made no larger than (llama.cpp's converter:
    LAYERWISE_CONVERT_HF_TO_GGUF, as for bench/vs_llama_cpp.py)."""
    if out.exists():
        return
    from layerwise.export.run import run_export
    from layerwise.plan import Plan
    from layerwise.quant import QuantConfig

    run_export(model, plan=Plan(QuantConfig("q5_0")).override("model.embed_tokens", QuantConfig("q8_0")), out=out,
               progress=False)


def child(argv: list[str]) -> None:
    """Run `argv` and print its peak resident bytes and seconds as JSON (Linux: ru_maxrss in kB)."""
    started = time.perf_counter()
    completed = subprocess.run(argv, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    seconds = time.perf_counter() - started
    if completed.returncode != 0:
        sys.exit(f"{' '.join(argv)} failed:\n{completed.stderr[-3000:]}")
    peak = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * 1024
    print(json.dumps({"peak_bytes": peak, "seconds": seconds}))


def measure(argv: list[str]) -> dict:
    """One command in a wrapper process of its own, so the peak is that command's alone."""
    completed = subprocess.run([sys.executable, __file__, "--child", json.dumps(argv)], capture_output=True, text=True)
    if completed.returncode != 0:
        raise SystemExit(completed.stderr)
    return json.loads(completed.stdout.strip().splitlines()[-1])


def fp32_bytes(model: Path) -> tuple[int, int]:
    """The float32 model's bytes, and its hidden size."""
    from layerwise import load_model

    loaded = load_model(model)
    return 4 * sum(parameter.numel() for parameter in loaded.model.parameters()), loaded.model.config.hidden_size


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default=",".join(MODELS))
    parser.add_argument("--skip", default="", help="commands not to run, comma-separated (e.g. plan: about 40 min "
                                                   "on SmolLM2 in both modes; export then needs a plan.json left by "
                                                   "an earlier run)")
    parser.add_argument("--modes", default="memory,streaming", help="memory, streaming or both")
    parser.add_argument("--repeats", type=int, default=3,
                        help="runs of each command: a row keeps the highest peak (peaks vary between runs of the "
                             "same command by up to ~0.2x the model) and the median time; every peak is recorded")
    parser.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child is not None:
        child(json.loads(args.child))
        return
    # Rows of other models (or skipped commands) from an earlier run are kept; measured ones replaced.
    earlier = RESULTS / "memory.json"
    rows = json.loads(earlier.read_text())["rows"] if earlier.exists() else []
    rows = [row for row in rows if row["command"] != "import"]  # the floor before it included the model code
    for name in args.models.split(","):
        model = MODELS[name]
        work = OUT / name
        if not args.skip:
            shutil.rmtree(work, ignore_errors=True)
        work.mkdir(parents=True, exist_ok=True)
        if model == DITHERED_SMOLLM2:
            dithered_smollm2()  # written once by ../shared/models/dither_smollm2.py
        if name in REUSED_TABLE:
            shutil.copyfile(REUSED_TABLE[name], work / "table.json")
        if name in LIKE_A_FILE and "plan (like a GGUF file)" not in args.skip.split(","):
            reference_file(model, work / "reference.gguf")
        size, hidden_size = fp32_bytes(model)
        floor = None
        for command, argv in commands(name, work).items():
            if command in args.skip.split(","):
                continue
            # The floor is the same either way, and every row needs it.
            for mode in ["memory"] if command == "floor" else args.modes.split(","):
                if mode == "streaming" and command not in STREAMING:
                    continue
                runs = [measure(streaming_argv(command, argv) if mode == "streaming" else argv)
                        for _ in range(args.repeats)]
                peaks = [run["peak_bytes"] for run in runs]
                # The floor is subtracted from every row: its median; a command's row: its highest peak.
                peak = int(np.median(peaks)) if command == "floor" else max(peaks)
                floor = peak if command == "floor" else floor
                row = {"command": command, "model": name, "mode": mode, "peak_bytes": peak, "peaks": peaks,
                       "model_fp32_bytes": size, "seconds": float(np.median([run["seconds"] for run in runs])),
                       "above_floor_bytes": peak - floor, "above_floor_x_fp32": (peak - floor) / size}
                in_memory = [r for r in rows if (r["model"], r["command"], r.get("mode", "memory")) ==
                             (name, command, "memory")]
                if mode == "streaming" and in_memory:
                    row["seconds_x_memory"] = row["seconds"] / in_memory[0]["seconds"]
                if mode == "streaming" and command in TOKENS:
                    row["one_block_hidden_bytes"] = 4 * TOKENS[command] * hidden_size
                    row["target_bytes"] = int(TARGET_X_FP32 * size) + row["one_block_hidden_bytes"]
                    row["meets_target"] = row["above_floor_bytes"] <= row["target_bytes"]
                rows = [r for r in rows if (r["model"], r["command"], r.get("mode", "memory")) !=
                        (name, command, mode)] + [row]
                ratio = f"  {row['seconds_x_memory']:5.2f}x in-memory time" if "seconds_x_memory" in row else ""
                if "target_bytes" in row:
                    ratio += f"  target {row['target_bytes'] / size:.3f}x: {'met' if row['meets_target'] else 'missed'}"
                spread = "/".join(f"{(p - floor) / size:.2f}" for p in peaks)
                print(f"{name:13s} {command:28s} {mode:9s} peak {row['peak_bytes'] / 2**20:8.0f} MiB  above the "
                      f"floor {row['above_floor_bytes'] / 2**20:8.0f} MiB = {row['above_floor_x_fp32']:6.2f}x fp32 "
                      f"model ({size / 2**20:.0f} MiB; runs {spread})  {row['seconds']:6.0f} s{ratio}", flush=True)
                recorded = {other: {c: " ".join(a) for c, a in commands(other, OUT / other).items()}
                            for other in MODELS}
                write_results("memory", {"commands": recorded, "floor": FLOOR,
                                         "repeats": "each row's `peaks` has one entry per run (--repeats of that run)",
                                         "target": f"streaming: above the floor at most {TARGET_X_FP32}x the float32 "
                                                   "model plus one block's hidden states for the command's tokens "
                                                   "(float32)",
                                         "streaming": {"commands": list(STREAMING), "adds": "--streaming"},
                                         "rows": rows})


if __name__ == "__main__":
    main()
