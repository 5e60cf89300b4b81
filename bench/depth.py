"""Removing depth from SmolLM2, judged on wiki.test.raw: which blocks, which sublayers, and
whether dropping ever beats quantizing at equal bytes.

1. Drop 1..8 whole blocks chosen by Block Influence (one pass), by ablation KL (each block alone)
   and by search (KL re-measured after every drop), on WikiText-2 valid.
2. Drop 1..8 attention sublayers or 1..8 MLP sublayers (by ablation KL).
3. At 60% and 45% of the 16-bit model's bytes: quantization only (exact allocation over int2..int8
   with groups of 64), dropping only (whole blocks in ablation order, the rest kept in 16 bits) and
   joint plans (the same allocation with "drop" as one more option per sublayer).

    python bench/depth.py [--table bench/results/allocate_sensitivity.json]

Dropped units are silenced (output projections zeroed), which gives exactly the outputs of the
model with those blocks deleted (tests/prune/test_depth.py). Writes bench/results/depth.json.
"""
from __future__ import annotations

import argparse
import math
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import CALIBRATION_TEXT, EVALUATION_TEXT, SMOLLM2, write_results  # noqa: E402

from layerwise import load_model, token_windows  # noqa: E402
from layerwise.evaluate import base_outputs, evaluate  # noqa: E402
from layerwise.measure.fitness import KLFitness  # noqa: E402
from layerwise.measure.sensitivity import measure_sensitivity  # noqa: E402
from layerwise.plan.allocate import allocate  # noqa: E402
from layerwise.plan.table import SensitivityTable  # noqa: E402
from layerwise.prune import choose_drops, silence_  # noqa: E402
from layerwise.prune.depth import out_projections  # noqa: E402
from layerwise.quant.size import size_report  # noqa: E402

OPTIONS = "int2g64,int3g64,int4g64,int5g64,int6g64,int8g64"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--counts", type=int, default=8)
    parser.add_argument("--choice-tokens", type=int, default=2048)
    parser.add_argument("--eval-tokens", type=int, default=10240)
    parser.add_argument("--table", default=None, help="a sensitivity table of int2..int8 g64 per sublayer to reuse")
    parser.add_argument("--fractions", default="0.6,0.45")
    args = parser.parse_args()

    loaded = load_model(SMOLLM2)
    calibration = token_windows(loaded.tokenizer, CALIBRATION_TEXT, tokens=args.choice_tokens, seed=0)
    evaluation = token_windows(loaded.tokenizer, EVALUATION_TEXT, tokens=args.eval_tokens, seed=None)
    base = base_outputs(loaded, evaluation)
    saved = out_projections(loaded)
    rows: list[dict] = []

    def judge(section: str, label: str, kind: str, indices: list[int], extra: dict | None = None) -> dict:
        loaded.model.load_state_dict(saved, strict=False)
        silence_(loaded, kind, indices)
        quality = evaluate(loaded, base, progress=False)
        loaded.model.load_state_dict(saved, strict=False)
        row = {"section": section, "label": label, "kind": kind, "dropped": indices, "count": len(indices),
               **quality.to_dict(), **(extra or {})}
        rows.append(row)
        print(f"{section:6s} {label:28s} {kind:5s} n={len(indices):2d} ppl {quality.perplexity:9.2f} "
              f"KL {quality.kl:.4f}", flush=True)
        write_results("depth", {"model": str(SMOLLM2), "rows": rows})
        return row

    # 1. whole blocks by criterion
    choices = {}
    for by in ("bi", "ablation", "search"):
        start = time.perf_counter()
        choices[by] = choose_drops(loaded, calibration, "block", args.counts, by)
        seconds = time.perf_counter() - start
        for count in range(1, args.counts + 1):
            judge("blocks", f"by {by}", "block", choices[by].order[:count],
                  {"choice_seconds": seconds, "choice_forward_equivalents": choices[by].forward_equivalents})

    # 2. attention-only against MLP-only
    for kind in ("attn", "mlp"):
        choice = choose_drops(loaded, calibration, kind, args.counts, "ablation")
        for count in range(1, args.counts + 1):
            judge("sublayers", "by ablation", kind, choice.order[:count])

    # 3. quantization only, dropping only, joint, at equal bytes
    if args.table and Path(args.table).exists():
        table = SensitivityTable.load(args.table)
    else:
        table = measure_sensitivity(loaded, calibration, OPTIONS, "sublayer")
        if args.table:
            table.save(args.table)
    drops = measure_sensitivity(loaded, token_windows(loaded.tokenizer, CALIBRATION_TEXT,
                                                      tokens=table.calibration["tokens"], seed=0), ["drop"], "sublayer")
    joint = _with_column(table, drops)
    float_bytes = size_report(loaded, {})["total_bytes"]
    block_order = choose_drops(loaded, calibration, "block", loaded.n_blocks - 1, "ablation", progress=False).order
    fitness_windows = token_windows(loaded.tokenizer, CALIBRATION_TEXT, tokens=1024, seed=1)
    for fraction in (float(f) for f in args.fractions.split(",")):
        budget_bytes = fraction * float_bytes
        # dropping only: whole blocks, least harmful first, until the 16-bit model fits
        per_block = 16 * table.unit_weights.reshape(-1, 2).sum(axis=1)
        total_bits, dropped = 8 * float_bytes, []
        for index in block_order:
            if total_bits <= 8 * budget_bytes:
                break
            total_bits -= per_block[index]
            dropped.append(index)
        judge(f"{fraction:.0%}", "drop only (blocks, ablation order)", "block", sorted(dropped),
              {"total_bytes": math.ceil(total_bits / 8), "budget_bytes": budget_bytes})
        for name, source in (("quantize only (exact)", table), ("joint: quantize or drop (exact)", joint)):
            problem = source.problem(source.budget_bits(total_bytes=budget_bytes))
            allocation = allocate(problem, "exact")
            with KLFitness(loaded, source, fitness_windows, batch_size=1) as fitness:
                fitness.apply(allocation.choice)
                quality = evaluate(loaded, base, progress=False)
            labels = allocation.labels(problem)
            row = {"section": f"{fraction:.0%}", "label": name, "kind": "plan",
                   "dropped": [u.name for u, label in zip(source.units, labels) if label == "drop"],
                   "count": labels.count("drop"), **quality.to_dict(),
                   "total_bytes": math.ceil((allocation.total_cost + source.other_bits) / 8),
                   "budget_bytes": budget_bytes,
                   "bits_per_weight": allocation.total_cost / source.total_weights,
                   "options_used": {o: labels.count(o) for o in source.options if o in labels}}
            rows.append(row)
            print(f"{fraction:.0%}  {name:34s} ppl {quality.perplexity:9.2f} KL {quality.kl:.4f} "
                  f"{row['options_used']}", flush=True)
            write_results("depth", {"model": str(SMOLLM2), "rows": rows})

    write_results("depth", {"model": str(SMOLLM2), "float16_bytes": float_bytes, "rows": rows,
                            "choices": {by: {"order": c.order, "scores": c.scores,
                                             "forward_equivalents": c.forward_equivalents}
                                        for by, c in choices.items()}})
    print("\n| section | plan | dropped | perplexity | KL | top-1 |\n| --- | --- | ---: | ---: | ---: | ---: |")
    for r in rows:
        print(f"| {r['section']} | {r['label']} ({r['kind']}) | {r['count']} | {r['perplexity']:.2f} | {r['kl']:.4f} | "
              f"{r['top1']:.3f} |")


def _with_column(table: SensitivityTable, extra: SensitivityTable) -> SensitivityTable:
    """`table` with the options of `extra` (same model, units and calibration) appended."""
    if [u.name for u in table.units] != [u.name for u in extra.units] or \
            table.calibration["text_sha256"] != extra.calibration["text_sha256"]:
        raise SystemExit("the two tables do not describe the same units and calibration")
    return SensitivityTable(table.model_fingerprint, table.granularity, table.units, table.options + extra.options,
                            np.hstack([table.cost_bits, extra.cost_bits]), np.hstack([table.kl, extra.kl]),
                            table.unit_weights, table.other_bits, table.calibration,
                            {k: table.cost.get(k, 0) + extra.cost.get(k, 0) for k in ("seconds", "forward_equivalents")},
                            table.skipped | extra.skipped)


if __name__ == "__main__":
    main()
