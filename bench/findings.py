"""The papers' findings, re-measured on SmolLM2-135M (30 blocks) with WikiText-2.

    python bench/findings.py [--calib-tokens 2048] [--table-tokens 1024] [--eval-tokens 4096]

(a) The LWQ knee: KL on wiki.test as a growing share of blocks goes from int4 to int2 (groups of 64),
    lowest first by LIM, by ZD, at random and by index ("Layer-Wise Quantization").
(b) Later blocks change the residual stream less than earlier ones ("Do Language Models Use Their
    Depth Efficiently?", "The Curse of Depth"): relative update |dh|/|h| by depth.
(c) Attention sublayers are more droppable than MLP sublayers ("What Matters in Transformers?"):
    single-sublayer ablation KL by depth, and KL after dropping the k least harmful of each.
(d) Quantization errors are not additive across blocks: the sum of single-block KLs against the
    KL of the combination, for random sets of blocks at int3 and int2.
(e) Which importance statistic best predicts measured sensitivity: Spearman's rho across blocks
    between each profile statistic and the KL of quantizing that block alone.
(f) Quantizing against pruning at equal size: every block at b bits against dropping blocks and
    keeping the rest at more bits, at the same bytes of block linears.

Calibration (profile, sensitivity table) is WikiText-2 valid; every quality number is KL (and
perplexity) on the first --eval-tokens of wiki.test.raw, never the calibration text. Writes
bench/results/findings.json and bench/results/findings/*.png.
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import CALIBRATION_TEXT, EVALUATION_TEXT, RESULTS, SMOLLM2, write_results  # noqa: E402

from layerwise import load_model, token_windows  # noqa: E402
from layerwise.evaluate import base_outputs, evaluate  # noqa: E402
from layerwise.measure.fitness import KLFitness  # noqa: E402
from layerwise.measure.sensitivity import measure_sensitivity  # noqa: E402
from layerwise.plan.allocate import allocate  # noqa: E402
from layerwise.plan.problem import AllocationProblem  # noqa: E402
from layerwise.profile import profile_model  # noqa: E402
from layerwise.prune import silence_  # noqa: E402
from layerwise.prune.depth import out_projections  # noqa: E402
from layerwise.report.figures import pyplot, readability_problems  # noqa: E402
from layerwise.report.plots import save_figure  # noqa: E402
from layerwise.report.run import metric_ranking  # noqa: E402

OPTIONS = ["int2g64", "int3g64", "int4g64", "int8g64", "drop"]
FIGURES = RESULTS / "findings"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--calib-tokens", type=int, default=2048, help="profile (with ablation) tokens")
    parser.add_argument("--table-tokens", type=int, default=1024, help="sensitivity-table tokens")
    parser.add_argument("--eval-tokens", type=int, default=4096, help="wiki.test tokens every plan is judged on")
    parser.add_argument("--steps", type=int, default=10, help="points on the LWQ knee curve")
    args = parser.parse_args()
    started = time.perf_counter()
    timings: dict[str, float] = {}

    def lap(name: str, since: float) -> float:
        timings[name] = round(time.perf_counter() - since, 1)
        print(f"[{name}: {timings[name]:.0f} s]", flush=True)
        return time.perf_counter()

    loaded = load_model(SMOLLM2)
    n_blocks = loaded.n_blocks
    calibration = token_windows(loaded.tokenizer, CALIBRATION_TEXT, tokens=args.calib_tokens, seed=0)
    table_windows = token_windows(loaded.tokenizer, CALIBRATION_TEXT, tokens=args.table_tokens, seed=0)
    evaluation = token_windows(loaded.tokenizer, EVALUATION_TEXT, tokens=args.eval_tokens, seed=None)
    base = base_outputs(loaded, evaluation, progress=False)
    now = lap("load and base outputs", started)

    profile = profile_model(loaded, calibration, ablation=True, progress=False)
    profile_data = {"blocks": profile.blocks, "linears": profile.linears, "meta": profile.meta}
    now = lap("profile with ablation", now)
    table = measure_sensitivity(loaded, table_windows, OPTIONS, "block", progress=False)
    table_data = table.to_dict()
    now = lap("sensitivity table (blocks x options)", now)
    option = {name: index for index, name in enumerate(table.options)}
    results: dict = {"model": str(SMOLLM2), "settings": vars(args), "timings": timings,
                     "table_cost": table.cost}

    with KLFitness(loaded, table, table_windows, batch_size=2) as fitness:
        def judge(choice: list[int]) -> dict:
            fitness.apply(choice)
            quality = evaluate(loaded, base, progress=False)
            return {"kl": quality.kl, "perplexity": quality.perplexity, "top1": quality.top1}

        results["a_lwq_knee"] = lwq_knee(profile.blocks, option, n_blocks, judge, args.steps)
        now = lap("(a) LWQ knee", now)
        results["d_additivity"] = additivity(table, option, fitness, n_blocks)
        now = lap("(d) additivity", now)
        results["f_quantize_or_prune"] = quantize_or_prune(table, option, profile.blocks, judge, n_blocks)
        now = lap("(f) quantize or prune", now)
        fitness.restore()
    results["c_sublayers"] = sublayer_drops(loaded, base, profile.blocks)
    now = lap("(c) attention against MLP drops", now)
    results["b_depth"] = {"rel_update": profile.column("rel_update"),
                          "attn_rel_update": profile.column("attn_rel_update"),
                          "mlp_rel_update": profile.column("mlp_rel_update"), "lim": profile.column("lim")}
    header, rows = metric_ranking(profile_data, table_data)
    results["e_metric_ranking"] = {"header": header, "rows": rows}
    results["base_perplexity"] = base.quality.perplexity
    timings["total"] = round(time.perf_counter() - started, 1)
    write_results("findings", results)
    draw(results, n_blocks)
    summarize(results)


def lwq_knee(blocks: list[dict], option: dict[str, int], n_blocks: int, judge, steps: int) -> dict:
    """KL as the share of blocks at int2 (the rest int4) grows, for four orders of going low."""
    lim = np.array([row["lim"] for row in blocks])
    zd = np.array([row["zd"] for row in blocks])
    orders = {"LIM (least important first)": list(np.argsort(lim, kind="stable")),
              "ZD (least important first)": list(np.argsort(zd, kind="stable")),
              "random": list(np.random.default_rng(0).permutation(n_blocks)),
              "by index (last blocks first)": list(range(n_blocks - 1, -1, -1))}
    counts = sorted({round(n_blocks * i / steps) for i in range(steps + 1)})
    curves = {}
    for name, order in orders.items():
        points = []
        for count in counts:
            choice = [option["int4g64"]] * n_blocks
            for block in order[:count]:
                choice[int(block)] = option["int2g64"]
            points.append({"low_blocks": count, "share_low": count / n_blocks, **judge(choice)})
            print(f"(a) {name:30s} {count:2d} blocks at int2: KL {points[-1]['kl']:.4f}", flush=True)
        curves[name] = {"order": [int(b) for b in order], "points": points}
    return curves


def additivity(table, option: dict[str, int], fitness: KLFitness, n_blocks: int) -> list[dict]:
    """Sum of single-block KLs (the table) against the KL of the combination, on the same text."""
    rng = np.random.default_rng(1)
    rows = []
    for low in ("int3g64", "int2g64"):
        for count in (2, 4, 8, 15, 30):
            for _ in range(2 if count < 30 else 1):
                blocks = sorted(int(b) for b in rng.choice(n_blocks, count, replace=False))
                choice = [option["int8g64"]] * n_blocks
                for block in blocks:
                    choice[block] = option[low]
                predicted = float(sum(table.kl[b, option[low]] for b in blocks)
                                  + sum(table.kl[b, option["int8g64"]] for b in range(n_blocks) if b not in blocks))
                measured = fitness.full(choice)
                rows.append({"option": low, "blocks": blocks, "sum_of_single": predicted, "combined": measured,
                             "ratio": measured / predicted})
                print(f"(d) {count:2d} blocks at {low}: sum of singles {predicted:.4f}, combined {measured:.4f}",
                      flush=True)
    return rows


def quantize_or_prune(table, option: dict[str, int], blocks: list[dict], judge, n_blocks: int) -> list[dict]:
    """At equal bytes of block linears: all blocks at `low`, against dropping the blocks whose
    ablation hurts least and keeping the rest at `high` (as many dropped as the size needs)."""
    ablation_order = list(np.argsort([row["ablation_kl_block"] for row in blocks], kind="stable"))
    weights = table.unit_weights.astype(float)
    rows = []
    for low, high in (("int4g64", "int8g64"), ("int3g64", "int4g64"), ("int2g64", "int3g64"),
                      ("int2g64", "int4g64")):
        target = float(table.cost_bits[:, option[low]].sum())
        quantize = [option[low]] * n_blocks
        prune = [option[high]] * n_blocks
        dropped = []
        for block in ablation_order:
            if sum(table.cost_bits[b, prune[b]] for b in range(n_blocks)) <= target:
                break
            prune[int(block)] = option["drop"]
            dropped.append(int(block))
        # The exact allocator may also mix: quantize, drop, or both, at the same bytes.
        problem = AllocationProblem(tuple(u.name for u in table.units), tuple(table.options), table.cost_bits,
                                    table.kl, target)
        mixed = list(allocate(problem, "exact").choice)
        for name, choice in ((f"all at {low}", quantize), (f"drop {len(dropped)}, rest at {high}", prune),
                             ("exact mix of int2..int8 and drop", mixed)):
            bits = float(sum(table.cost_bits[b, choice[b]] for b in range(n_blocks)) / weights.sum())
            quality = judge(choice)
            rows.append({"size_of": low, "plan": name, "bits_per_weight": bits,
                         "dropped": [b for b in range(n_blocks) if choice[b] == option["drop"]], **quality})
            print(f"(f) at {low} size: {name:34s} {bits:.3f} bpw KL {quality['kl']:.4f} ppl "
                  f"{quality['perplexity']:.1f}", flush=True)
    return rows


def sublayer_drops(loaded, base, blocks: list[dict]) -> dict:
    """Dropping the k attention sublayers with the lowest single ablation KL, against the k MLPs."""
    saved = out_projections(loaded)
    rows = {"attn": [], "mlp": []}
    for kind in ("attn", "mlp"):
        order = list(np.argsort([row[f"ablation_kl_{kind}"] for row in blocks], kind="stable"))
        for count in (1, 2, 4, 6, 8, 12):
            loaded.model.load_state_dict(saved, strict=False)
            silence_(loaded, kind, [int(b) for b in order[:count]])
            quality = evaluate(loaded, base, progress=False)
            rows[kind].append({"count": count, "kl": quality.kl, "perplexity": quality.perplexity})
            print(f"(c) drop {count:2d} {kind:4s} sublayers: KL {quality.kl:.4f}", flush=True)
    loaded.model.load_state_dict(saved, strict=False)
    rows["single_ablation_kl"] = {kind: [row[f"ablation_kl_{kind}"] for row in blocks] for kind in ("attn", "mlp")}
    return rows


def _save(figure, name: str) -> None:
    problems = readability_problems(figure)
    if problems:
        raise AssertionError(f"{name}: {problems}")
    save_figure(figure, FIGURES / f"{name}.png")


def draw(results: dict, n_blocks: int) -> None:
    plt = pyplot()
    depth = np.arange(n_blocks)

    figure, axes = plt.subplots(figsize=(7, 4.5), dpi=100)
    for name, curve in results["a_lwq_knee"].items():
        points = curve["points"]
        axes.plot([p["share_low"] for p in points], [p["kl"] for p in points], "o-", ms=3, label=name)
    axes.set_yscale("log")
    axes.set_xlabel("share of blocks at int2 g64 (the rest int4 g64)")
    axes.set_ylabel("KL(base || quantized) on wiki.test, nats/token")
    axes.set_title("(a) the LWQ knee", fontsize=10)
    axes.grid(True, which="both", alpha=0.3)
    axes.legend(fontsize=8)
    figure.tight_layout()
    _save(figure, "a_lwq_knee")

    figure, axes = plt.subplots(figsize=(7, 4.5), dpi=100)
    for key in ("rel_update", "attn_rel_update", "mlp_rel_update"):
        axes.plot(depth, results["b_depth"][key], "o-", ms=3, label=key)
    axes.set_yscale("log")
    axes.set_xlabel("block (0 = nearest the embeddings)")
    axes.set_ylabel("|dh| / |h| (relative update)")
    axes.set_title("(b) how much each block changes the residual stream", fontsize=10)
    axes.grid(True, which="both", alpha=0.3)
    axes.legend(fontsize=8)
    figure.tight_layout()
    _save(figure, "b_depth")

    figure, (left, right) = plt.subplots(1, 2, figsize=(13, 4.5), dpi=100)
    sub = results["c_sublayers"]
    for kind in ("attn", "mlp"):
        left.plot(depth, sub["single_ablation_kl"][kind], "o-", ms=3, label=f"{kind} sublayer alone")
        right.plot([r["count"] for r in sub[kind]], [r["kl"] for r in sub[kind]], "o-", ms=3,
                   label=f"{kind} sublayers, least harmful first")
    for axes, xlabel, title in ((left, "block (0 = nearest the embeddings)", "(c) KL without one sublayer"),
                                (right, "sublayers dropped", "(c) KL after dropping several")):
        axes.set_yscale("log")
        axes.set_xlabel(xlabel)
        axes.set_ylabel("KL, nats/token")
        axes.set_title(title, fontsize=10)
        axes.grid(True, which="both", alpha=0.3)
        axes.legend(fontsize=8)
    figure.tight_layout()
    _save(figure, "c_sublayers")

    figure, axes = plt.subplots(figsize=(6, 5), dpi=100)
    for low in ("int3g64", "int2g64"):
        rows = [r for r in results["d_additivity"] if r["option"] == low]
        axes.plot([r["sum_of_single"] for r in rows], [r["combined"] for r in rows], "o", label=f"blocks at {low}")
    every = [v for r in results["d_additivity"] for v in (r["sum_of_single"], r["combined"])]
    line = [min(every), max(every)]
    axes.plot(line, line, "k--", lw=1, label="additive (y = x)")
    axes.set_xscale("log")
    axes.set_yscale("log")
    axes.set_xlabel("sum of single-block KLs (the table), nats/token")
    axes.set_ylabel("KL of the combination, nats/token")
    axes.set_title("(d) are quantization errors additive?", fontsize=10)
    axes.grid(True, which="both", alpha=0.3)
    axes.legend(fontsize=8)
    figure.tight_layout()
    _save(figure, "d_additivity")

    figure, axes = plt.subplots(figsize=(8, 4.5), dpi=100)
    rows = results["e_metric_ranking"]["rows"]
    axes.barh([r[0] for r in rows][::-1], [float(r[1]) for r in rows][::-1], label="mean |Spearman rho|")
    axes.set_xlabel("mean |rho| with measured single-block KL (int2, int3, int4, int8)")
    axes.set_ylabel("profile statistic")
    axes.set_title("(e) which statistic predicts sensitivity", fontsize=10)
    axes.legend(fontsize=8)
    figure.tight_layout()
    _save(figure, "e_metric_ranking")

    figure, axes = plt.subplots(figsize=(9, 4.5), dpi=100)
    rows = results["f_quantize_or_prune"]
    sizes = list(dict.fromkeys(r["size_of"] for r in rows))
    kinds = ["all at", "drop", "exact mix"]
    width = 0.27
    for index, kind in enumerate(kinds):
        values = [next(r["kl"] for r in rows if r["size_of"] == size and r["plan"].startswith(kind)) for size in sizes]
        axes.bar(np.arange(len(sizes)) + (index - 1) * width, values, width, label={
            "all at": "quantize every block", "drop": "drop blocks, rest at more bits",
            "exact mix": "exact mix (quantize and drop)"}[kind])
    axes.set_xticks(range(len(sizes)), [f"size of all-{s}" for s in sizes])
    axes.set_yscale("log")
    axes.set_xlabel("bytes of the block linears")
    axes.set_ylabel("KL on wiki.test, nats/token")
    axes.set_title("(f) quantizing against pruning at equal size", fontsize=10)
    axes.legend(fontsize=8)
    figure.tight_layout()
    _save(figure, "f_quantize_or_prune")


def summarize(results: dict) -> None:
    print("\n(a) LWQ knee: KL at each share of blocks at int2")
    for name, curve in results["a_lwq_knee"].items():
        print(f"  {name:30s} " + " ".join(f"{p['kl']:.3f}" for p in curve["points"]))
    depth = results["b_depth"]["rel_update"]
    half = len(depth) // 2
    print(f"(b) mean |dh|/|h|: first half {np.mean(depth[:half]):.3f}, second half {np.mean(depth[half:]):.3f}")
    sub = results["c_sublayers"]
    print("(c) KL after dropping k: " + ", ".join(
        f"k={a['count']}: attn {a['kl']:.3f} / mlp {m['kl']:.3f}" for a, m in zip(sub["attn"], sub["mlp"])))
    ratios = [r["ratio"] for r in results["d_additivity"]]
    print(f"(d) combined / sum of singles: {min(ratios):.2f} .. {max(ratios):.2f}")
    print("(e) " + ", ".join(f"{r[0]} {r[1]}" for r in results["e_metric_ranking"]["rows"][:5]))
    for row in results["f_quantize_or_prune"]:
        print(f"(f) size of {row['size_of']}: {row['plan']:34s} KL {row['kl']:.4f}")
    print(f"total {results['timings']['total']:.0f} s")


if __name__ == "__main__":
    main()
