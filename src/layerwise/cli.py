"""Thin command line: parse arguments, call the same functions a Python user calls."""
from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Sequence

from rich.console import Console

from layerwise.errors import LayerwiseError
from layerwise.util.memory import map_large_blocks


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number, got {text!r}") from None
    if value <= 0:
        raise argparse.ArgumentTypeError(f"must be a positive number, got {value}")
    return value


def _add_model_options(parser: argparse.ArgumentParser, model: str = "model",
                       what: str = "a Hugging Face model folder, a .gguf file, or a hub id") -> None:
    parser.add_argument(model, help=what)
    parser.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"],
                        help="weights dtype (auto: float32 on CPU, bfloat16 on GPU)")
    parser.add_argument("--device", default="cpu", help="cpu, cuda, cuda:N or auto")
    parser.add_argument("--device-map", default=None,
                        help="'auto' to spread a large model over GPUs with accelerate (instead of --device)")


def _add_streaming_option(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--streaming", action=argparse.BooleanOptionalAction, default=None,
                        help="read each block (and the embedding and head) from disk when it runs, and let it go "
                             "after: memory holds one block's weights (safetensors or GGUF models). Default: "
                             "only when the weights would take more than 80%% of the free memory")


def _cmd_profile(args: argparse.Namespace) -> None:
    from layerwise.profile import run_profile

    ablation = {"none": False, "all": True}.get(args.ablation, args.ablation.split(",") if args.ablation else False)
    result = run_profile(
        args.model, args.data, tokens=args.tokens, seq_len=args.seq_len, seed=args.seed, out=args.out,
        ablation=ablation, batch_size=args.batch_size, lens_positions_per_window=args.lens_positions,
        weights=not args.no_weights, dtype=args.dtype, device=args.device, device_map=args.device_map,
        streaming=args.streaming, overwrite=args.overwrite, progress=not args.quiet,
    )
    console = Console(width=max(Console().width, 170))
    console.print(result.table())
    if args.out:
        experts = ", experts.csv" if result.experts else ""
        console.print(f"wrote {args.out}/profile.json, blocks.csv, linears.csv{experts}")


def _group_size(text: str) -> int | None:
    if text.lower() in ("none", "row", "channel", "0", "-1"):
        return None
    return _positive_int(text)


def _calibration(files: list[str] | None) -> str | list[str] | None:
    """--calib given once is one text; repeated, one domain per file; absent, the shipped mix."""
    return files[0] if files and len(files) == 1 else files


def _cmd_quantize(args: argparse.Namespace) -> None:
    from layerwise.plan import Plan
    from layerwise.quant.config import QuantConfig
    from layerwise.apply.run import run_quantize

    remainder = "fallback" if args.k_fallback else "tail" if args.allow_tail else "error"
    plan = args.plan or Plan(QuantConfig(args.format, args.bits, args.group_size, not args.asym, args.method,
                                         remainder))
    loaded, quantized, sizes = run_quantize(args.model, plan, calib=_calibration(args.calib), tokens=args.tokens,
                                            seed=args.seed,
                                            out=args.out, overwrite=args.overwrite, imatrix=args.imatrix,
                                            dtype=args.dtype, device=args.device, device_map=args.device_map,
                                            streaming=args.streaming, progress=not args.quiet)
    _print_sizes(sizes)
    from layerwise.apply.quantize import plan_fallbacks

    fallbacks = plan_fallbacks(loaded, plan if isinstance(plan, Plan) else Plan.load(plan))
    if fallbacks:
        used = sorted(set(fallbacks.values()))
        print(f"{len(fallbacks)} modules took llama.cpp's fallback type ({', '.join(used)}): their rows are not "
              "a multiple of 256")
    if args.out:
        print(f"wrote {args.out}/quant.json, plan.json, qweights.safetensors")


def _print_sizes(sizes: dict) -> None:
    print(f"block linears: {sizes['linear_bits_per_weight']:.4f} bits per weight ({sizes['linear_bytes']:,} bytes); "
          f"embeddings+head {sizes['embeddings_and_head_bytes']:,} bytes; norms+biases {sizes['norms_and_biases_bytes']:,} bytes; "
          f"total {sizes['total_bytes']:,} bytes ({sizes['total_bytes'] / sizes['float16_total_bytes']:.1%} of 16-bit)")


def _write_json(path: str, payload: object) -> None:
    import json

    from layerwise.util.files import write_text_atomic

    write_text_atomic(path, json.dumps(payload, indent=1) + "\n")


def _check_json_output(args: argparse.Namespace) -> None:
    from layerwise.util.files import check_output

    if args.json:
        check_output(args.json, args.overwrite)


def _cmd_eval(args: argparse.Namespace) -> None:
    from layerwise.evaluate.run import run_eval

    _check_json_output(args)
    report = run_eval(args.model, data=args.data, quantized=args.quantized, plan=args.plan,
                      calib=_calibration(args.calib),
                      tokens=args.tokens, seq_len=args.seq_len, dtype=args.dtype, device=args.device,
                      device_map=args.device_map, batch_size=args.batch_size, schedule=args.schedule, streaming=args.streaming,
                      emulate=args.emulate, progress=not args.quiet)
    base = report["base"]
    print(f"base:      perplexity {base['perplexity']:.3f} on {base['tokens']:,} predicted tokens of {args.data}")
    if "quantized" in report:
        quality = report["quantized"]
        name = "scheduled" if args.schedule and not (args.quantized or args.plan) else "quantized"
        (ppl_low, ppl_high), (kl_low, kl_high) = quality["perplexity_ci"], quality["kl_ci"]
        print(f"{name}: perplexity {quality['perplexity']:.3f} [{ppl_low:.3f}, {ppl_high:.3f}], KL(base||{name}) "
              f"{quality['kl']:.5f} [{kl_low:.5f}, {kl_high:.5f}] nats/token (99th/99.9th percentile token "
              f"{quality['kl_p99']:.4f}/{quality['kl_p999']:.4f}), top-1 agreement {quality['top1']:.4f} "
              f"(95% intervals over {len(quality['window_kl'])} windows)")
        if "sizes" in report:
            _print_sizes(report["sizes"])
    if args.json:
        _write_json(args.json, report)


def _positive_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
    if not value > 0:
        raise argparse.ArgumentTypeError(f"must be a positive number, got {text}")
    return value


def _cmd_plan(args: argparse.Namespace) -> None:
    from layerwise.measure.run import run_plan

    if sum(value is not None for value in (args.budget, args.budget_bytes, args.budget_like)) != 1:
        raise LayerwiseError("give exactly one budget: --budget BITS_PER_WEIGHT, --budget-bytes N or "
                             "--budget-like FILE.gguf")
    outcome = run_plan(args.model, bits_per_weight=args.budget, total_bytes=args.budget_bytes,
                       budget_like=args.budget_like, options=args.options,
                       allocator=args.allocator, objective=args.objective, tail_weight=args.tail_weight,
                       granularity=args.granularity,
                       table=args.table, calib=_calibration(args.calib),
                       tokens=args.tokens, fitness_tokens=args.fitness_tokens, check_tokens=args.check_tokens,
                       statistics_tokens=args.statistics_tokens, estimator=args.sensitivity, refine=args.refine,
                       generations=args.generations,
                       seed=args.seed, out=args.out, overwrite=args.overwrite, imatrix=args.imatrix,
                       dtype=args.dtype, device=args.device, device_map=args.device_map, streaming=args.streaming,
                       emulate=args.emulate, progress=not args.quiet)
    report = outcome.report
    used = {}
    for label in report["options"].values():
        used[label] = used.get(label, 0) + 1
    print(f"{report['returned']} plan: {report['bits_per_weight']:.4f} bits per weight "
          f"(budget {report['budget_bits_per_weight']:.4f}), {report['total_bytes']:,} bytes; "
          f"units per option: {', '.join(f'{k} {v}' for k, v in used.items())}")
    if report.get("budget_like"):
        like = report["budget_like"]
        print(f"planned tensors (block linears, embedding, head): {report['planned_bytes']:,} bytes, against "
              f"{like['planned_tensor_bytes']:,} in {Path(like['file']).name} ({like['file_bytes']:,} bytes in all)")
    print(f"KL on held-out calibration windows {report['calibration_kl']:.5f} (table predicts "
          f"{report['predicted_kl']:.5f}); search {report['search']['forward_equivalents']:.1f} forward passes, "
          f"{report['search']['seconds']:.0f} s")
    check = report["check"]
    if check["best_uniform"] is not None:
        ratio = check["ratio"] if check["ratio"] is not None else float("nan")
        low, high = check["ratio_ci"] or (float("nan"), float("nan"))
        print(f"against uniform {check['best_uniform']} on the same held-out windows: KL {check['plan_kl']:.5f} vs "
              f"{check['uniform'][check['best_uniform']]['kl']:.5f}, ratio {ratio:.3f} (95% interval {low:.3f}-{high:.3f})")
        if len(check["domains"]) > 1:
            print("per domain, against its best uniform plan: " + "; ".join(
                f"{name} {d['ratio']:.3f} ({d['ratio_ci'][0]:.3f}-{d['ratio_ci'][1]:.3f})"
                for name, d in check["domains"].items() if d.get("ratio") is not None))
    if report["returned"] == "uniform" and args.allocator != "uniform":
        print(f"the {args.allocator} plan was worse than uniform on some calibration domain at this budget; the "
              "uniform plan is returned")
    elif report["returned"] != args.allocator:
        print(f"the {args.allocator} plan was worse than uniform on some calibration domain; the safer "
              f"{report['returned']} plan passed and is returned")
    if args.out:
        print(f"wrote {args.out} and {Path(args.out).with_suffix('.report.json')}")


def _budgets(text: str) -> list[float]:
    """'3.25,4.25' or 'low:high:step'."""
    try:
        if ":" in text:
            low, high, step = (float(part) for part in text.split(":"))
            if step <= 0 or high < low:
                raise ValueError
            return [round(low + i * step, 6) for i in range(int((high - low) / step + 1e-9) + 1)]
        return [float(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected budgets like 3.25,4.25 or 3:5:0.25, got {text!r}") from None


def _cmd_pareto(args: argparse.Namespace) -> None:
    from layerwise.report.pareto import run_pareto

    rows = run_pareto(args.table, budgets=args.budgets, allocator=args.allocator, out=args.out,
                      overwrite=args.overwrite)
    print(f"{'budget':>7} {'bits/weight':>11} {'bytes':>12} {'predicted KL':>13}  options")
    for row in rows:
        used = ", ".join(f"{k} {v}" for k, v in row["options_used"].items())
        print(f"{row['budget_bits_per_weight']:>7.3f} {row['bits_per_weight']:>11.4f} {row['total_bytes']:>12,} "
              f"{row['predicted_kl']:>13.5f}  {used}")
    if args.out:
        print(f"wrote {args.out}/pareto.json, pareto.png and sensitivity.png")


def _indices(text: str) -> list[int]:
    try:
        return [int(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected block indices like 3,7,12, got {text!r}") from None


def _cmd_drop(args: argparse.Namespace) -> None:
    from layerwise.prune.run import run_drop

    counts = {kind: getattr(args, kind) for kind in ("blocks", "attn", "mlp", "experts")
              if getattr(args, kind) is not None}
    if len(counts) > 1:
        raise LayerwiseError("give one of --blocks, --attn, --mlp, --experts")
    kind = {"blocks": "block", "experts": "expert"}.get(next(iter(counts), ""), next(iter(counts), args.kind))
    loaded, choice = run_drop(args.model, kind=kind, count=next(iter(counts.values()), None), indices=args.indices,
                              by=args.by, data=args.data, tokens=args.tokens, seed=args.seed, out=args.out,
                              overwrite=args.overwrite, dtype=args.dtype, device=args.device, device_map=args.device_map,
                              streaming=args.streaming, progress=not args.quiet)
    if kind == "expert":
        print(f"dropped {len(choice.dropped[0])} experts from each block by {choice.criterion} "
              f"({loaded.adapter.n_experts} remain per block): "
              + "; ".join(f"block {block}: {experts}" for block, experts in choice.dropped.items()))
        if args.out:
            print(f"wrote {args.out} (a plain Hugging Face folder; layerwise_drop.json says what was dropped)")
        return
    scores = ", ".join(f"{i} ({s:.4g})" if s is not None else str(i) for i, s in zip(choice.order, choice.scores))
    print(f"dropped {kind} of blocks {scores} by {choice.criterion}; {loaded.n_blocks} blocks remain")
    if args.out:
        print(f"wrote {args.out} (a plain Hugging Face folder; layerwise_drop.json says what was dropped)")


def _cmd_diverge(args: argparse.Namespace) -> None:
    from layerwise.evaluate.diverge import run_diverge

    _check_json_output(args)
    rows = run_diverge(args.base, args.quantized, args.prompts, threshold=args.threshold, dtype=args.dtype,
                       device=args.device, device_map=args.device_map, streaming=args.streaming,
                       progress=not args.quiet)
    print(f"{'#':>3} {'tokens':>6} {'KL':>9} {'max KL':>9} {'top-1':>6} {'robust z':>9}  prompt")
    for number, row in enumerate(rows, 1):
        mark = "  <-- outlier" if row.flagged else ""
        print(f"{number:>3} {row.tokens:>6} {row.kl:>9.5f} {row.max_kl:>9.4f} {row.top1:>6.3f} {row.robust_z:>9.1f}  "
              f"{row.prompt[:60]!r}{mark}")
    flagged = [number for number, row in enumerate(rows, 1) if row.flagged]
    print(f"{len(flagged)} of {len(rows)} prompts flagged" + (f": {', '.join(map(str, flagged))}" if flagged else ""))
    if args.json:
        _write_json(args.json, [row.to_dict() for row in rows])


def _cmd_export(args: argparse.Namespace) -> None:
    from layerwise.export.run import run_export
    from layerwise.util.files import write_text_atomic

    report = run_export(args.model, format=args.format, out=args.out, plan=args.plan, quantized=args.quantized,
                        calib=_calibration(args.calib), tokens=args.tokens, dtype=args.dtype, device=args.device,
                        device_map=args.device_map, overwrite=args.overwrite, converter=args.converter, imatrix=args.imatrix, streaming=args.streaming,
                        progress=not args.quiet)
    if report.get("converted_by"):
        print(f"converted the Hugging Face model with {report['converted_by']}")
    print(f"wrote {report['path']}: {report['file_bytes']:,} bytes")
    if report.get("fallbacks"):
        print(f"{len(report['fallbacks'])} tensors took llama.cpp's fallback type "
              f"({', '.join(sorted(set(report['fallbacks'].values())))}): their rows are not a multiple of 256")
    if "bytes_by_type" in report:
        print("tensors by type: " + ", ".join(f"{name} {count}" for name, count in report["tensors_by_type"].items()))
        predicted = (report["predicted_sizes"] or {}).get("linear_bytes")
        if predicted:
            print(f"planned tensors: {report['planned_tensor_bytes']:,} bytes (plan predicted {predicted:,})")
        if args.llama_quantize_args:
            write_text_atomic(args.llama_quantize_args, "\n".join(report["llama_quantize_args"]) + "\n")
            print(f"wrote the equivalent llama-quantize arguments to {args.llama_quantize_args}")


def _cmd_compress(args: argparse.Namespace) -> None:
    from layerwise.compress import run_compress

    outcome = run_compress(args.model, out=args.out, bits_per_weight=args.budget, budget_like=args.budget_like,
                           format=args.format, options=args.options, estimator=args.sensitivity, refine=args.refine,
                           calib=_calibration(args.calib), eval_data=args.eval_data, tokens=args.tokens,
                           overwrite=args.overwrite, dtype=args.dtype, device=args.device, device_map=args.device_map,
                           streaming=args.streaming, progress=not args.quiet)
    for step, path in outcome.artifacts.items():
        how = "kept from an earlier run" if step in outcome.reused else f"{outcome.seconds.get(step, 0):.0f} s"
        print(f"{step:8s} {path} ({how})")


CALIB_MIX_HELP = "layerwise:mix names it, so --calib layerwise:mix --calib mine.txt adds a text to it"
QUANTIZE_TOKENS_HELP = ("calibration tokens GPTQ and AWQ fit on (default 65536, or all that the calibration text holds "
                        "in whole windows when less)")
IMATRIX_HELP = ("an importance matrix (llama-imatrix's .gguf or .dat, or `layerwise imatrix`): GGUF types weight "
                "each column's rounding by it, as llama-quantize --imatrix does")


def _cmd_imatrix(args: argparse.Namespace) -> None:
    from layerwise.quant.imatrix import run_imatrix

    found = run_imatrix(args.model, data=args.data, out=args.out, ctx=args.ctx, chunks=args.chunks,
                        include_output=args.process_output, overwrite=args.overwrite, dtype=args.dtype,
                        device=args.device, device_map=args.device_map, streaming=args.streaming, progress=not args.quiet)
    print(f"wrote {args.out}: {len(found.sums)} entries from {found.chunk_count} chunks of {found.chunk_size} tokens")


def _cmd_report(args: argparse.Namespace) -> None:
    from layerwise.report.run import run_report

    path = run_report(args.run_dir, args.out, title=args.title, overwrite=args.overwrite)
    print(f"wrote {path} ({path.stat().st_size:,} bytes, self-contained)")


def _cmd_list(args: argparse.Namespace) -> None:
    from layerwise.models import supported_architectures
    from layerwise.plan.objectives import DEFAULT_OBJECTIVE, OBJECTIVES
    from layerwise.profile import METRIC_ALIASES, METRICS, WEIGHT_METRICS

    console = Console(width=max(Console().width, 170))
    if args.what == "formats":
        from layerwise.quant.formats import registered_formats

        for name, fmt in registered_formats().items():
            console.print(f"[bold]{name}[/bold]: {fmt.description}")
    elif args.what == "allocators":
        from layerwise.plan import ALLOCATORS

        for name, function in ALLOCATORS.items():
            console.print(f"[bold]{name}[/bold]: {(function.__doc__ or '').strip().splitlines()[0]}")
    elif args.what == "exporters":
        from layerwise.export import EXPORTERS

        for name, exporter in EXPORTERS.items():
            what = "a folder" if exporter.folder else "one file"
            console.print(f"[bold]{name}[/bold] ({what}{', streams' if exporter.streams else ''}): {exporter.description}")
    elif args.what == "objectives":
        for name, objective in OBJECTIVES.items():
            default = " (default)" if name == DEFAULT_OBJECTIVE else ""
            console.print(f"[bold]{name}[/bold]{default}: {objective.description}")
    elif args.what == "architectures":
        for name in supported_architectures():
            console.print(name)
    elif args.what == "metrics":
        for name, metric in METRICS.items():
            console.print(f"[bold]{name}[/bold] (block): {metric.description}")
        for name, metric in WEIGHT_METRICS.items():
            console.print(f"[bold]{name}[/bold] (linear weight): {metric.description}")
        for alias, name in METRIC_ALIASES.items():
            console.print(f"[bold]{alias}[/bold]: another name for {name}")


class _Parser(argparse.ArgumentParser):
    """Argument errors as one line, like every other layerwise error."""

    def error(self, message: str) -> None:
        self.exit(2, f"{self.prog}: error: {message}\n")


def build_parser() -> argparse.ArgumentParser:
    from layerwise.plan.objectives import DEFAULT_OBJECTIVE, OBJECTIVES  # numbers only, no torch

    parser = _Parser(prog="layerwise", description="Find out which layers of a transformer LM matter.")
    commands = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)

    p = commands.add_parser("profile", help="per-layer statistics from one calibration pass")
    _add_model_options(p)
    _add_streaming_option(p)
    p.add_argument("--data", default=None, help="calibration text file (default: a WikiText-2 valid excerpt shipped with layerwise)")
    p.add_argument("--tokens", type=_positive_int, default=4096, help="calibration tokens (default 4096)")
    p.add_argument("--seq-len", type=_positive_int, default=512, help="window length (default 512)")
    p.add_argument("--seed", type=int, default=0, help="which windows are drawn (default 0)")
    p.add_argument("--batch-size", type=_positive_int, default=2)
    p.add_argument("--ablation", default="none",
                   help="none, all, or a comma list of block,attn,mlp (and in mixture-of-experts models expert: "
                        "the router may not choose it, and shared_expert): KL when each unit is skipped")
    p.add_argument("--lens-positions", type=_positive_int, default=None,
                   help="positions per window decoded by the logit lens (default: as many as cost ~10%% of a forward pass)")
    p.add_argument("--no-weights", action="store_true", help="skip per-linear weight statistics")
    p.add_argument("--out", default=None, help="directory for profile.json, blocks.csv, linears.csv "
                                               "(and experts.csv for a mixture-of-experts model)")
    p.add_argument("--overwrite", action="store_true", help="replace the output if it exists")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.set_defaults(run=_cmd_profile)

    p = commands.add_parser("quantize", help="quantize a model uniformly or by a plan")
    _add_model_options(p)
    _add_streaming_option(p)
    p.add_argument("--method", default="rtn", choices=["rtn", "gptq", "awq"], help="how codes are chosen")
    p.add_argument("--format", default="int", help="int, nf4, fp4, mxfp4, fp8, or a GGUF type (q4_0, q4_k, ...)")
    p.add_argument("--bits", type=_positive_int, default=4, help="code width for --format int (2..8)")
    p.add_argument("--group-size", type=_group_size, default=128, help="columns per scale, or 'none' for one per row")
    p.add_argument("--asym", action="store_true", help="int only: min/max grid with a zero point")
    p.add_argument("--allow-tail", action="store_true", help="allow a shorter last group when the group size does not divide a row")
    p.add_argument("--k-fallback", action="store_true",
                   help="GGUF K-quants on rows that are not a multiple of 256: use llama.cpp's fallback type "
                        "(q2_k, q3_k->q4_0; q4_k->q5_0; q5_k->q5_1; q6_k->q8_0), as llama-quantize does")
    p.add_argument("--plan", default=None, help="a plan.json instead of the uniform options above")
    p.add_argument("--calib", default=None, action="append",
                   help="calibration text for gptq and awq, one domain per file; repeat for several (default: the "
                        "shipped mix of prose, code, verse and tables; " + CALIB_MIX_HELP + "); given, and without "
                        "--imatrix, it also gives GGUF types an importance matrix")
    p.add_argument("--imatrix", default=None, help=IMATRIX_HELP)
    p.add_argument("--tokens", type=_positive_int, default=None, help=QUANTIZE_TOKENS_HELP)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default=None, help="directory for plan.json, quant.json, qweights.safetensors")
    p.add_argument("--overwrite", action="store_true", help="replace the output if it exists")
    p.add_argument("--quiet", action="store_true")
    p.set_defaults(run=_cmd_quantize)

    p = commands.add_parser("eval", help="perplexity, KL and top-1 agreement against the base model")
    _add_model_options(p)
    _add_streaming_option(p)
    p.add_argument("--data", required=True, help="evaluation text, never the calibration text")
    p.add_argument("--quantized", default=None, help="a directory written by `layerwise quantize`")
    p.add_argument("--plan", default=None, help="or a plan.json to quantize on the fly")
    p.add_argument("--calib", default=None, action="append",
                   help="calibration text for --plan with gptq/awq, one domain per file; repeat for several "
                        "(default: the shipped mix; " + CALIB_MIX_HELP + ")")
    p.add_argument("--tokens", type=_positive_int, default=40 * 512, help="evaluation tokens (default 40 x 512)")
    p.add_argument("--seq-len", type=_positive_int, default=512)
    p.add_argument("--batch-size", type=_positive_int, default=4,
                   help="windows run at once in memory (streamed, each block runs one window at a time)")
    p.add_argument("--schedule", type=_indices, default=None,
                   help="run the blocks in this order, e.g. 0,1,2,2,3 (skips and repeats; no weights written)")
    p.add_argument("--emulate", default="float", choices=["float", "llama-cpu"],
                   help="how the quantized model computes: float (default), or llama-cpu: the inputs of GGUF-typed "
                        "linears rounded to 8 bits as llama.cpp's CPU backend does (the KL llama-perplexity reports)")
    p.add_argument("--json", default=None, help="also write the report as JSON here")
    p.add_argument("--overwrite", action="store_true", help="replace the output if it exists")
    p.add_argument("--quiet", action="store_true")
    p.set_defaults(run=_cmd_eval)

    p = commands.add_parser("plan", help="allocate quantizers per layer under a size budget")
    _add_model_options(p)
    p.add_argument("--budget", type=_positive_float, default=None,
                   help="average bits per weight of the block linears, scales counted (e.g. 3.25)")
    p.add_argument("--budget-bytes", type=_positive_float, default=None, help="or the whole model's size in bytes")
    p.add_argument("--budget-like", default=None, metavar="FILE.gguf",
                   help="or: a GGUF file of this model (e.g. llama-quantize's Q4_K_M) that the exported GGUF must not "
                        "exceed; the token embedding and output head are planned too")
    p.add_argument("--options", default=None,
                   help="comma-separated choices, e.g. int3g64,int4g64,gptq:int4g64,q4_0 (default int2..int8 g64)")
    p.add_argument("--allocator", default="exact", help="exact (default), hybrid, greedy, evolutionary, uniform")
    p.add_argument("--objective", default=DEFAULT_OBJECTIVE, choices=list(OBJECTIVES),
                   help=f"how calibration domains are weighed (default {DEFAULT_OBJECTIVE}): " + "; ".join(
                       f"{name}: {objective.description}" for name, objective in OBJECTIVES.items()))
    p.add_argument("--tail-weight", type=float, default=0.0, metavar="W",
                   help="price every choice at its KL plus W times its tail KL (the mean KL of its worst 1%% of "
                        "calibration tokens), so the plan spends bits where damage falls on few tokens (default 0; "
                        "needs a measured table on the CPU or streamed)")
    p.add_argument("--granularity", default=None, choices=["block", "sublayer", "linear", "tensor", "expert"],
                   help="what one choice covers (default sublayer; linear keeps q/k/v and gate/up together; "
                        "tensor: every linear on its own, as GGUF files store them; "
                        "expert: each routed expert of a mixture-of-experts model, and its shared expert)")
    p.add_argument("--table", default=None, help="sensitivity table to reuse, or where to save a new one")
    p.add_argument("--calib", default=None, action="append",
                   help="calibration text, one domain per file; repeat for several (default: the shipped mix of "
                        "prose, code, verse and tables; " + CALIB_MIX_HELP + ")")
    p.add_argument("--tokens", type=_positive_int, default=4096,
                   help="tokens for the sensitivity table, split over the domains (default 4096)")
    p.add_argument("--fitness-tokens", type=_positive_int, default=2048,
                   help="tokens on which the search judges whole plans (default 2048)")
    p.add_argument("--check-tokens", type=_positive_int, default=4096,
                   help="held-out calibration tokens, split over the domains, on which the plan is checked against "
                        "uniform (default 4096)")
    p.add_argument("--sensitivity", default="measured",
                   help="how the sensitivity table is filled: measured (KL with each unit quantized, the default), "
                        "auto (fisher, with the entries the plan hinges on measured: the cheap table "
                        "bench/sensitivity.py supports), "
                        "local (each unit's block output error, scaled to KL once per block), weights (weight "
                        "error weighted by input mean squares, no pass per entry), fisher (1/2 F dW^2 with F the "
                        "diagonal Fisher information, a forward and a backward pass per window), noise (weights' estimate "
                        "scaled per unit by the KL of rounding-shaped noise, one downstream pass per unit)")
    p.add_argument("--refine", type=float, default=None,
                   help="with an estimated table, measure the entries the plan hinges on until the estimate and "
                        "these measurements have cost this share of the measured table's passes (default 0.1 with "
                        "--sensitivity auto, else 0)")
    p.add_argument("--statistics-tokens", type=_positive_int, default=16384,
                   help="tokens, split over the domains, that gptq/awq options are fitted on in the table, the "
                        "search and the check; none of the other jobs uses them (default 16384, a quarter of what "
                        "quantize fits on: options are compared, not kept)")
    p.add_argument("--generations", type=_positive_int, default=10, help="search length for hybrid/evolutionary")
    p.add_argument("--imatrix", default=None,
                   help=IMATRIX_HELP + "; the plan records it, and quantize/export of the plan use it")
    p.add_argument("--emulate", default="float", choices=["float", "llama-cpu"],
                   help="how the planned model is measured: float (default), or llama-cpu: the inputs of GGUF-typed "
                        "linears rounded to 8 bits as llama.cpp's CPU backend does, so the plan minimises the KL "
                        "llama.cpp shows (measured tables on the CPU)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default=None, help="where to write plan.json (and plan.report.json beside it)")
    p.add_argument("--overwrite", action="store_true", help="replace the output if it exists")
    p.add_argument("--quiet", action="store_true")
    _add_streaming_option(p)
    p.set_defaults(run=_cmd_plan)

    p = commands.add_parser("pareto", help="size against predicted KL for a range of budgets, from one table")
    p.add_argument("table", help="a sensitivity table written by `layerwise plan --table`")
    p.add_argument("--budgets", type=_budgets, default=None, help="e.g. 3.25,4.25 or 3:5:0.25 (default: the whole range)")
    p.add_argument("--allocator", default="exact", help="exact (default), greedy or uniform")
    p.add_argument("--out", default=None, help="directory for pareto.json, pareto.png and sensitivity.png")
    p.add_argument("--overwrite", action="store_true", help="replace the output if it exists")
    p.set_defaults(run=_cmd_pareto)

    p = commands.add_parser("drop", help="drop blocks or sublayers the model uses least; write a plain checkpoint")
    _add_model_options(p)
    p.add_argument("--blocks", type=_positive_int, default=None, help="how many whole blocks to drop")
    p.add_argument("--attn", type=_positive_int, default=None, help="or how many attention sublayers")
    p.add_argument("--mlp", type=_positive_int, default=None, help="or how many MLP sublayers")
    p.add_argument("--experts", type=_positive_int, default=None,
                   help="or how many routed experts to drop from every block of a mixture-of-experts model")
    p.add_argument("--indices", type=_indices, default=None, help="or exactly these blocks, e.g. 3,7 (with --kind)")
    p.add_argument("--kind", default="block", choices=["block", "attn", "mlp"], help="what --indices drops")
    p.add_argument("--by", default=None, choices=["bi", "ablation", "search", "load"],
                   help="bi: block influence (one pass; the default for blocks and sublayers); ablation: KL without "
                        "each unit (the default for experts); search: KL re-measured after each drop; load: the "
                        "experts the router picks least (one pass)")
    p.add_argument("--data", default=None, help="calibration text (default: the shipped WikiText-2 valid excerpt)")
    p.add_argument("--tokens", type=_positive_int, default=2048)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default=None, help="folder for the pruned checkpoint")
    p.add_argument("--overwrite", action="store_true", help="replace the output if it exists")
    p.add_argument("--quiet", action="store_true")
    _add_streaming_option(p)
    p.set_defaults(run=_cmd_drop)

    p = commands.add_parser("diverge", help="per-prompt KL of a quantized model against its base; flags outliers")
    _add_model_options(p, "base", "the unquantized model (folder, .gguf or hub id)")
    p.add_argument("quantized", help="a directory written by `layerwise quantize`")
    p.add_argument("--prompts", required=True, help="text file, one prompt per line")
    p.add_argument("--threshold", type=_positive_float, default=5.0,
                   help="flag prompts this many robust standard deviations above the median KL (default 5)")
    p.add_argument("--json", default=None, help="also write the rows as JSON here")
    p.add_argument("--overwrite", action="store_true", help="replace the output if it exists")
    p.add_argument("--quiet", action="store_true")
    _add_streaming_option(p)
    p.set_defaults(run=_cmd_diverge)

    p = commands.add_parser("compress", help="the whole job: profile, imatrix, sensitivity, plan, quantize, export, "
                                             "eval and report in one folder, resumable")
    _add_model_options(p)
    p.add_argument("--budget", type=_positive_float, default=None, help="average bits per weight of the block linears")
    p.add_argument("--budget-like", default=None, help="a GGUF file of this model to be no larger than")
    p.add_argument("--format", default="gguf", help="an export format (`layerwise list exporters`; default gguf)")
    p.add_argument("--options", default=None,
                   help="per-unit choices (default: llama.cpp's types for gguf, int2g64..int8g64 otherwise)")
    p.add_argument("--sensitivity", default="auto",
                   help="how the sensitivity table is filled (see plan; default auto: fisher, refined where the plan "
                        "hinges: minutes, not hours)")
    p.add_argument("--refine", type=float, default=None,
                   help="share of the measured table's passes the plan's refined table may cost (see plan; default "
                        "0.05 with --sensitivity auto, what keeps SmolLM2 well within 10 minutes)")
    p.add_argument("--calib", default=None, action="append",
                   help="calibration text, one domain per file; repeat for several (default: the shipped mix; "
                        + CALIB_MIX_HELP + ")")
    p.add_argument("--eval-data", default=None, help="evaluation text (never calibration text) for eval.json")
    p.add_argument("--tokens", type=_positive_int, default=4096, help="tokens for the profile and the table")
    p.add_argument("--out", required=True, help="the folder for every artifact")
    p.add_argument("--overwrite", action="store_true", help="start afresh in a folder that holds another run")
    p.add_argument("--quiet", action="store_true")
    _add_streaming_option(p)
    p.set_defaults(run=_cmd_compress)

    p = commands.add_parser("export", help="write a GGUF with a type per tensor, or a plain Hugging Face folder")
    _add_model_options(p)
    _add_streaming_option(p)
    p.add_argument("--format", default="gguf",
                   help="gguf (a type per tensor; the default), hf (dequantized, loads anywhere) or compressed-tensors "
                        "(packed int codes; transformers and vLLM load it): `layerwise list exporters`")
    p.add_argument("--plan", default=None, help="a plan.json (quantized now)")
    p.add_argument("--quantized", default=None, help="or a directory written by `layerwise quantize`")
    p.add_argument("--calib", default=None, action="append",
                   help="calibration text for gptq/awq plans, one domain per file; repeat for several "
                        "(default: the shipped mix of prose, code, verse and tables; " + CALIB_MIX_HELP + ")")
    p.add_argument("--imatrix", default=None, help=IMATRIX_HELP)
    p.add_argument("--tokens", type=_positive_int, default=None, help=QUANTIZE_TOKENS_HELP)
    p.add_argument("--converter", default=None,
                   help="llama.cpp's convert_hf_to_gguf.py (or its llama.cpp folder), for GGUF from a Hugging Face "
                        "model (default: $LAYERWISE_CONVERT_HF_TO_GGUF, then PATH)")
    p.add_argument("--llama-quantize-args", default=None,
                   help="also write the equivalent llama-quantize --tensor-type arguments to this file")
    p.add_argument("--out", required=True, help="the .gguf file, or the folder for --format hf")
    p.add_argument("--overwrite", action="store_true", help="replace the output if it exists")
    p.add_argument("--quiet", action="store_true")
    p.set_defaults(run=_cmd_export)

    p = commands.add_parser("imatrix", help="llama.cpp's importance matrix (squared inputs per linear), as a file "
                                            "llama-quantize --imatrix reads")
    _add_model_options(p)
    _add_streaming_option(p)
    p.add_argument("--data", required=True, help="calibration text")
    p.add_argument("--ctx", type=_positive_int, default=512, help="tokens per chunk, as llama-imatrix -c (default 512)")
    p.add_argument("--chunks", type=_positive_int, default=100, help="at most this many chunks (default 100)")
    p.add_argument("--process-output", action="store_true", help="also the output (LM head) weight")
    p.add_argument("--out", required=True, help="imatrix.gguf (or a .dat name for llama.cpp's legacy format)")
    p.add_argument("--overwrite", action="store_true", help="replace the output if it exists")
    p.add_argument("--quiet", action="store_true")
    p.set_defaults(run=_cmd_imatrix)

    p = commands.add_parser("report", help="one self-contained HTML page of every result in a run directory")
    p.add_argument("run_dir", help="a directory holding layerwise outputs (profile, sensitivity table, plan, ...)")
    p.add_argument("--out", required=True, help="the .html file to write")
    p.add_argument("--title", default=None)
    p.add_argument("--overwrite", action="store_true", help="replace the output if it exists")
    p.set_defaults(run=_cmd_report)

    p = commands.add_parser("list", help="what is registered")
    p.add_argument("what", choices=["architectures", "metrics", "formats", "allocators", "objectives", "exporters"])
    p.set_defaults(run=_cmd_list)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    map_large_blocks()  # a long command's resident size then follows what its tensors hold
    try:
        args.run(args)
    except LayerwiseError as error:
        print(f"layerwise: error: {error}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("layerwise: interrupted", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
