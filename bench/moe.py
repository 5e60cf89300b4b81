"""Mixture-of-experts on a small trained MoE (bench/train_tiny_moe.py: Mixtral-style, 6 blocks,
8 experts, 2 per token): expert load and sensitivity from the profile, plans at uniform int4's size
against uniform int4 (sublayer units, which GGUF can store, and expert units), and dropping
experts by measured KL against dropping the least-loaded ones. Judged by KL to the float model on
WikiText-2 test and on Python code, with 95% intervals over windows and paired ratios.

With llama.cpp's tools (LAYERWISE_LLAMA_CPP_BIN, as bench/vs_llama_cpp.py) it also exports GGUF
files with llama.cpp's merged expert tensors: a plan no larger than llama-quantize's Q4_0 with an
importance matrix (the same llama-imatrix file for both), judged by `llama-perplexity
--kl-divergence` against the float GGUF on WikiText-2 test, beside stock Q4_0 with and without it.

    python bench/moe.py        # trains the model first if bench/out/tiny-moe is missing (~15 min)
    python bench/moe.py --only reload   # just the dropped-experts checkpoint, reloaded elsewhere

The checkpoint with experts dropped by ablation is saved and read back by plain transformers in a
fresh process, whose logits must be the pruned model's. Writes bench/results/moe.json. The model is small and trained here: the numbers describe it, not
published MoE models.
"""
from __future__ import annotations

import argparse
import copy
import json
import os
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import (CALIBRATION_TEXT, EVALUATION_TEXT, evaluation_domains, paired_ratio, quality_row,  # noqa: E402
                     write_results)
from train_tiny_moe import tiny_moe  # noqa: E402

import torch  # noqa: E402

from layerwise import load_model  # noqa: E402
from layerwise.apply.quantize import quantize_  # noqa: E402
from layerwise.data.domains import calibration_windows  # noqa: E402
from layerwise.evaluate import base_outputs, evaluate  # noqa: E402
from layerwise.measure.run import run_plan  # noqa: E402
from layerwise.profile import profile_model  # noqa: E402
from layerwise.prune.experts import choose_experts, drop_experts_  # noqa: E402

OPTIONS = "int2g64,int3g64,int4g64,int5g64,int6g64,int8g64"
UNIFORM = "int4g64"
# GGUF types whose blocks fit its rows: 32-wide everywhere, K-quants (256) only on down_proj.
GGUF_OPTIONS = "q4_0,q5_0,q8_0,q2_k,q3_k,q4_k,q5_k,q6_k"
GGUF_OUT = Path(__file__).resolve().parent / "out" / "moe-gguf"
GGUF_CHUNKS = 40


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--budget", type=float, default=4.25, help="bits per weight (default: uniform int4g64's)")
    parser.add_argument("--eval-tokens", type=int, default=16384)
    parser.add_argument("--drop", type=int, default=2, help="experts dropped per block (default 2 of 8)")
    parser.add_argument("--name", default="moe")
    parser.add_argument("--only", choices=["all", "reload"], default="all",
                        help="reload: only drop experts by ablation and read the checkpoint back in a fresh process")
    args = parser.parse_args()

    folder = tiny_moe()
    loaded = load_model(folder)
    if args.only == "reload":
        pruned = copy.deepcopy(loaded)
        choice = choose_experts(pruned, calibration_windows(loaded.tokenizer, None, tokens=2048, seed=1), args.drop,
                                "ablation", progress=False)
        drop_experts_(pruned, choice.dropped)
        check = reload_check(pruned)
        print(f"dropped {args.drop}/block by ablation, reloaded by plain transformers in a fresh process: "
              f"max |logit difference| {check['max_abs_logit_diff']:.2e}", flush=True)
        write_results(f"{args.name}_reload", {"model": str(folder), "dropped": choice.dropped} | check)
        return
    calibration = calibration_windows(loaded.tokenizer, None, tokens=4096, seed=0)  # the shipped mix
    start = time.perf_counter()
    profile = profile_model(loaded, calibration, ablation=["expert"], weights=False, progress=False)
    profile_seconds = time.perf_counter() - start
    print(f"profile with expert ablation: {profile_seconds:.0f} s", flush=True)

    domains = evaluation_domains(loaded.tokenizer, args.eval_tokens)
    bases = {name: base_outputs(loaded, windows, progress=False) for name, windows in domains.items()}
    rows: list[dict] = []

    def judge(name: str, model, extra: dict) -> None:
        for domain, base in bases.items():
            quality = evaluate(model, base, progress=False)
            rows.append({"variant": name, "domain": domain} | quality_row(quality) | extra)
            print(f"{name:34s} {domain:15s} KL {quality.kl:.4f} [{quality.kl_ci[0]:.4f}, {quality.kl_ci[1]:.4f}] "
                  f"ppl {quality.perplexity:.2f}", flush=True)

    judge("float", loaded, {})
    scratch = Path(tempfile.mkdtemp(prefix="layerwise-moe-"))
    plans = {}
    for granularity, allocator in (("sublayer", "uniform"), ("sublayer", None), ("expert", None)):
        start = time.perf_counter()
        kwargs = {"allocator": allocator} if allocator else {}
        outcome = run_plan(loaded, bits_per_weight=args.budget, options=OPTIONS, granularity=granularity,
                           table=scratch / f"{granularity}.json", progress=False, **kwargs)
        name = f"uniform {UNIFORM}" if allocator == "uniform" else f"plan ({granularity} units)"
        plans[name] = outcome
        labels = outcome.allocation.labels(outcome.table.problem(outcome.table.budget_bits(args.budget)))
        quantized = copy.deepcopy(loaded)
        quantize_(quantized, outcome.plan, progress=False)
        judge(name, quantized, {"bits_per_weight": outcome.allocation.total_cost / outcome.table.total_weights,
                                "options_used": {o: labels.count(o) for o in outcome.table.options if o in labels},
                                "plan_seconds": time.perf_counter() - start,
                                "returned": outcome.report.get("returned")})

    windows = calibration_windows(loaded.tokenizer, None, tokens=2048, seed=1)
    for by in ("ablation", "load"):
        pruned = copy.deepcopy(loaded)
        choice = choose_experts(pruned, windows, args.drop, by, progress=False)
        drop_experts_(pruned, choice.dropped)
        weights = sum(p.numel() for p in pruned.model.parameters())
        judge(f"drop {args.drop}/expert-block by {by}", pruned,
              {"dropped": {str(b): e for b, e in choice.dropped.items()}, "parameters": weights,
               "parameters_before": sum(p.numel() for p in loaded.model.parameters()),
               "forward_equivalents": choice.forward_equivalents}
              | (reload_check(pruned) if by == "ablation" else {}))

    _add_ratios(rows)
    gguf = gguf_rows(folder, loaded) if os.environ.get("LAYERWISE_LLAMA_CPP_BIN") else []
    if not gguf:
        print("LAYERWISE_LLAMA_CPP_BIN is not set: the GGUF comparison was skipped")
    payload = {"model": str(folder), "training": json.loads((folder / "training.json").read_text()),
               "options": OPTIONS, "budget": args.budget, "eval_tokens": args.eval_tokens,
               "profile": {"blocks": profile.blocks, "experts": profile.experts, "seconds": profile_seconds},
               "rows": rows, "gguf_options": GGUF_OPTIONS, "gguf_rows": gguf}
    write_results(args.name, payload)
    _print_table(rows, profile)
    for row in gguf:
        print(f"GGUF {row['file']:28s} {row['bytes']:>10,d} bytes  mean KLD {row['mean_kld']:.5f} "
              f"± {row['mean_kld_pm']:.5f}  99.9% {row['kld_p999']:.4f}  same top {row['same_top']:.2f}%")


RELOAD = """
import json, sys, torch
from transformers import AutoModelForCausalLM
model = AutoModelForCausalLM.from_pretrained(sys.argv[1], dtype=torch.float32).eval()
with torch.no_grad():
    logits = model(input_ids=torch.tensor(json.loads(sys.argv[2]))).logits
print(json.dumps({"logits": logits.flatten().tolist(), "experts": model.config.num_local_experts}))
"""


def reload_check(pruned) -> dict:
    """Save the pruned model as a plain checkpoint, read it back with plain transformers in a fresh
    process, and compare its logits on one window with the pruned model's."""
    import subprocess

    from layerwise.models.saving import save_plain

    ids = calibration_windows(pruned.tokenizer, None, tokens=256, seed=2).input_ids[:1]
    with tempfile.TemporaryDirectory(prefix="layerwise-moe-dropped-") as folder:
        save_plain(pruned, Path(folder) / "model")
        done = subprocess.run([sys.executable, "-c", RELOAD, str(Path(folder) / "model"), json.dumps(ids.tolist())],
                              capture_output=True, text=True, check=True)
    theirs = json.loads(done.stdout.strip().splitlines()[-1])
    with torch.no_grad():
        ours = pruned.model(input_ids=ids).logits.flatten()
    difference = (torch.tensor(theirs["logits"]) - ours).abs().max().item()
    if difference > 1e-4:
        raise SystemExit(f"the dropped checkpoint reloads to different logits (max |difference| {difference:.2e})")
    return {"reloaded_experts": theirs["experts"], "max_abs_logit_diff": difference}


def gguf_rows(folder: Path, loaded) -> list[dict]:
    """Stock Q4_0 (with and without an importance matrix) and a plan no larger than the one with it,
    each scored by llama-perplexity against the float GGUF's logits on wiki.test.raw."""
    from vs_llama_cpp import cached, kl_divergence, run, tool

    from layerwise.export.convert import convert_to_gguf
    from layerwise.export.run import run_export
    from layerwise.models.loading import resolve_source

    GGUF_OUT.mkdir(parents=True, exist_ok=True)
    f32 = cached(GGUF_OUT / "f32.gguf", lambda tmp: convert_to_gguf(resolve_source(folder), tmp, torch.float32))
    # llama-imatrix picks its output format by the file name: it must end in .gguf while written.
    imatrix = GGUF_OUT / "imatrix.gguf"
    if not imatrix.exists():
        partial = GGUF_OUT / "imatrix.partial.gguf"
        run([tool("llama-imatrix"), "-m", str(f32), "-f", str(CALIBRATION_TEXT), "-c", "512", "--chunks", "100",
             "-o", str(partial), "-t", "2", "--no-ppl"], GGUF_OUT / "imatrix.log")
        partial.rename(imatrix)
    base = cached(GGUF_OUT / "base.kld", lambda tmp: run(
        [tool("llama-perplexity"), "-m", str(f32), "-f", str(EVALUATION_TEXT), "--chunks", str(GGUF_CHUNKS),
         "-c", "512", "-t", "2", "--kl-divergence-base", str(tmp)], GGUF_OUT / "base.log"))
    files = {}
    for name, extra in (("Q4_0", []), ("Q4_0+imatrix", ["--imatrix", str(imatrix)])):
        files[name] = cached(GGUF_OUT / f"stock-{name}.gguf", lambda tmp, extra=extra, name=name: run(
            [tool("llama-quantize"), *extra, str(f32), str(tmp), "Q4_0", "2"], GGUF_OUT / f"stock-{name}.log"))
    plan_path = GGUF_OUT / "plan-like-Q4_0+imatrix.json"
    run_plan(loaded, budget_like=files["Q4_0+imatrix"], options=GGUF_OPTIONS, imatrix=imatrix, out=plan_path,
             overwrite=True, progress=False)
    ours = GGUF_OUT / "ours-like-Q4_0+imatrix.gguf"
    run_export(folder, plan=plan_path, format="gguf", imatrix=imatrix, out=ours, overwrite=True, progress=False)
    files["layerwise plan, no larger than Q4_0+imatrix"] = ours
    rows = []
    for name, path in files.items():
        kl = kl_divergence(path, base, EVALUATION_TEXT, GGUF_CHUNKS, GGUF_OUT / f"kld-{path.stem}.log")
        rows.append({"file": name, "bytes": path.stat().st_size} | kl)
    return rows


def _add_ratios(rows: list[dict]) -> None:
    """Each quantized row's KL over uniform int4's on the same windows; each drop row's over the
    other criterion's."""
    by_key = {(row["variant"], row["domain"]): row for row in rows}
    for row in rows:
        baseline = None
        if row["variant"].startswith("plan"):
            baseline = by_key[(f"uniform {UNIFORM}", row["domain"])]
        elif row["variant"].endswith("by ablation"):
            baseline = by_key[(row["variant"].replace("ablation", "load"), row["domain"])]
        if baseline is not None:
            row["ratio"], row["ratio_ci"] = paired_ratio(row, baseline)
            row["ratio_to"] = baseline["variant"]


def _print_table(rows: list[dict], profile) -> None:
    print("\nexpert load (share of routed choices) and ablation KL per block:")
    for block in profile.blocks:
        experts = [row for row in profile.experts if row["block"] == block["block"]]
        loads = " ".join(f"{row['load_share']:.2f}" for row in experts)
        kls = " ".join(f"{row['ablation_kl']:.3f}" for row in experts)
        print(f"  block {block['block']}: load entropy {block['expert_load_entropy']:.3f}, "
              f"max/mean {block['expert_load_max']:.2f}; loads {loads}; KL {kls}")
    print(f"\n{'variant':34s} {'domain':15s} {'KL':>8s} {'95% CI':>19s} {'ratio':>7s} {'ratio CI':>17s}")
    for row in rows:
        ratio = f"{row['ratio']:7.3f} [{row['ratio_ci'][0]:.3f}, {row['ratio_ci'][1]:.3f}]" if "ratio" in row else ""
        print(f"{row['variant']:34s} {row['domain']:15s} {row['kl']:8.4f} [{row['kl_ci'][0]:.4f}, "
              f"{row['kl_ci'][1]:.4f}] {ratio}")


if __name__ == "__main__":
    main()
