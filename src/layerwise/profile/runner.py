"""One calibration pass that fills every per-block and per-linear statistic."""
from __future__ import annotations

import contextlib
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import torch

from layerwise.data.windows import TokenWindows, token_windows
from layerwise.engine.divergence import Reference
from layerwise.engine.hooks import BlockCall, capture_blocks
from layerwise.engine.replay import UNIT_KINDS, StopForward
from layerwise.errors import LayerwiseError
from layerwise.models.adapters import get_adapter
from layerwise.models.layout import block_linears, hidden_to_logits, linear_weight
from layerwise.models.loading import LoadedModel, load_config, load_model, load_tokenizer, resolve_source
from layerwise.models.streaming import by_part, held, held_unless_sliced
from layerwise.profile.ablation import Variant, ablate_blocks, block_runs
from layerwise.profile.experts import ExpertAccumulator, has_shared_expert, observing_experts, shared_expert_path
from layerwise.profile.logit_lens import auto_positions_per_window, lens_partials, lens_positions
from layerwise.profile.metrics import METRICS, Partials, combine
from layerwise.profile.result import ProfileResult
from layerwise.profile.weights import WEIGHT_METRICS
from layerwise.util.files import check_output
from layerwise.util.meta import run_metadata
from layerwise.util.progress import progress_bars


# Ablation kinds of the profile: the units of engine/replay.py; mixture-of-experts models add each
# routed expert (the router may not choose it) and, where there is one, the shared expert (its
# output zeroed).
ABLATION_KINDS = UNIT_KINDS + ("expert", "shared_expert")


@dataclass
class _Accumulators:
    metrics: list[dict[str, Partials]]
    lens: list[Partials]
    ablation: dict[str, list[Partials]] = field(default_factory=dict)
    experts: ExpertAccumulator | None = None


@torch.no_grad()
def _profile_batch(loaded: LoadedModel, batch: torch.Tensor, acc: _Accumulators, positions: torch.Tensor,
                   ablation: Sequence[str], on_ablation_step) -> None:
    model, adapter = loaded.model, loaded.adapter
    lens_hidden: dict[int, torch.Tensor] = {}
    calls: list[BlockCall] = []
    finals: list[torch.Tensor] = []

    def on_block(call: BlockCall) -> None:
        for name, metric in METRICS.items():
            combine(acc.metrics[call.index].setdefault(name, {}), metric.compute(call))
        if acc.experts is not None:
            acc.experts.on_block(call)
        lens_hidden[call.index] = call.h_out[:, positions]
        if ablation:
            # Keep only what the ablation needs: every block's call arguments, the first block's
            # input and the last block's output.
            calls.append(BlockCall(call.index, h_in=call.h_in if call.index == 0 else None,
                                   args=call.args, kwargs=call.kwargs))
        if call.index == loaded.n_blocks - 1:
            if ablation:
                finals.append(call.h_out)
            raise StopForward  # the head is applied to the lens positions only, and a slice at a time below

    observe = observing_experts(model, adapter, acc.experts) if acc.experts is not None else contextlib.nullcontext()
    with capture_blocks(model, adapter, on_block, keep_call=bool(ablation)), observe, contextlib.suppress(StopForward):
        model(input_ids=batch, use_cache=False)
    # The head is applied once per chunk of blocks below: held meanwhile, unless a streamed head
    # reads its rows a slice at a time for each call (the whole matrix is then never in memory).
    with held_unless_sliced(loaded.streamed, adapter.lm_head):
        # The final output is the last block's lens through the same head, so the lens ends at KL 0.
        final = Reference.from_logits(hidden_to_logits(model, adapter, lens_hidden[len(lens_hidden) - 1]))
        lens = lens_partials(model, adapter, [lens_hidden[i] for i in range(len(lens_hidden))], final)
        for index, partials in enumerate(lens):
            combine(acc.lens[index], partials)
    lens_hidden.clear()
    del final, lens
    if not ablation:
        return

    def record(variant: Variant, total: float, count: int) -> None:
        if variant.kind == "expert":
            acc.experts.add_ablation(variant.index, variant.expert, total, count)
        else:
            combine(acc.ablation[variant.kind][variant.index], {"total": total, "count": float(count)})

    ablate_blocks(loaded, calls, finals.pop(), ablation, record, on_ablation_step, _shared_expert(adapter, ablation))


def _shared_expert(adapter, kinds: Sequence[str]) -> str | None:
    return shared_expert_path(adapter) if "shared_expert" in kinds else None


def _weight_rows(loaded: LoadedModel, progress, bars) -> list[dict]:
    linears = block_linears(loaded.model, loaded.adapter)
    task = bars.add_task("weight statistics", total=len(linears)) if progress else None
    found = {name: (block, module) for block, name, module in linears}
    rows = []
    for part, names in by_part(loaded.streamed, list(found)):
        with held(loaded.streamed, part):
            for name in names:
                block, module = found[name]
                weight = linear_weight(module).detach()
                row = {"name": name, "block": block, "rows": weight.shape[0], "columns": weight.shape[1]}
                row.update({metric.name: metric.compute(weight) for metric in WEIGHT_METRICS.values()})
                rows.append(row)
                if progress:
                    bars.advance(task)
    return rows


def _block_zd(linear_rows: list[dict], n_blocks: int) -> list[float]:
    """A block's ZD: its linears' ZD weighted by their number of weights."""
    totals = [[0.0, 0] for _ in range(n_blocks)]
    for row in linear_rows:
        size = row["rows"] * row["columns"]
        totals[row["block"]][0] += row["zd"] * size
        totals[row["block"]][1] += size
    return [total / count for total, count in totals]


def profile_model(
    loaded: LoadedModel,
    windows: TokenWindows,
    *,
    batch_size: int = 2,
    ablation: bool | Sequence[str] = False,
    lens_positions_per_window: int | None = None,
    weights: bool = True,
    progress: bool = True,
) -> ProfileResult:
    """Profile `loaded` on `windows`: per-block activation statistics, logit lens, optional
    ablation KL (True = block, attention and MLP; or a subset of those kinds), per-linear weights.
    lens_positions_per_window=None picks as many as cost ~10% of a forward pass."""
    if batch_size <= 0:
        raise LayerwiseError(f"batch_size must be positive, got {batch_size}")
    moe = loaded.adapter.experts is not None
    available = (tuple(kind for kind in ABLATION_KINDS if kind != "shared_expert" or has_shared_expert(loaded.adapter))
                 if moe else UNIT_KINDS)
    kinds = tuple(available if ablation is True else (ablation or ()))
    unknown = set(kinds) - set(available)
    if unknown:
        raise LayerwiseError(f"unknown ablation kind(s) {sorted(unknown)}; choose from {', '.join(available)}"
                             + ("" if moe else " ('expert' and 'shared_expert' need a mixture-of-experts model)"))
    if moe:
        loaded.require_in_memory("the profile of a mixture-of-experts model")
    n_blocks = loaded.n_blocks
    acc = _Accumulators([{} for _ in range(n_blocks)], [{} for _ in range(n_blocks)],
                        {kind: [{} for _ in range(n_blocks)] for kind in kinds if kind != "expert"},
                        ExpertAccumulator(n_blocks, loaded.adapter.n_experts, has_shared_expert(loaded.adapter))
                        if moe else None)
    seq_len = windows.input_ids.shape[1]
    if lens_positions_per_window is None:
        lens_positions_per_window = auto_positions_per_window(loaded.model, loaded.adapter, seq_len)
    positions = lens_positions(seq_len, lens_positions_per_window)
    device = loaded.input_device
    batches = windows.batches(batch_size)
    blocks_evaluated = 0
    timings: dict[str, float] = {}
    with progress_bars(progress) as bars:
        task = bars.add_task("profiling", total=len(batches))
        ablation_task = bars.add_task("ablation (block runs)", total=len(batches) * block_runs(
            loaded, kinds, _shared_expert(loaded.adapter, kinds))) if kinds else None

        def on_ablation_step(blocks: int) -> None:
            nonlocal blocks_evaluated
            blocks_evaluated += blocks
            bars.advance(ablation_task, blocks)

        start = time.perf_counter()
        for batch in batches:
            _profile_batch(loaded, batch.to(device), acc, positions.to(device), kinds, on_ablation_step)
            bars.advance(task)
        timings["activations_and_ablation_s"] = time.perf_counter() - start
        start = time.perf_counter()
        linear_rows = _weight_rows(loaded, progress, bars) if weights else []
        timings["weights_s"] = time.perf_counter() - start

    rows = []
    zd = _block_zd(linear_rows, n_blocks) if linear_rows else None
    for index in range(n_blocks):
        row: dict = {"block": index}
        for name, metric in METRICS.items():
            row[name] = metric.finalize(acc.metrics[index][name])
        lens = acc.lens[index]
        row["logit_lens_kl"] = lens["kl_total"] / lens["count"]
        row["logit_lens_top1"] = lens["top1_total"] / lens["count"]
        if zd:
            row["zd"] = zd[index]
        for kind, partials in acc.ablation.items():
            # None where the block has nothing of the kind (a dense block's shared expert).
            row[f"ablation_kl_{kind}"] = (partials[index]["total"] / partials[index]["count"]
                                          if partials[index] else None)
        if acc.experts is not None:
            row |= acc.experts.block_columns(index)
        rows.append(row)

    lens_grid = {
        "positions": positions.tolist(),
        "kl": [(acc.lens[i]["kl_by_position"] / acc.lens[i]["windows"]).tolist() for i in range(n_blocks)],
        "top1": [(acc.lens[i]["top1_by_position"] / acc.lens[i]["windows"]).tolist() for i in range(n_blocks)],
    }
    meta = run_metadata() | {
        "model": loaded.describe(),
        "data": windows.describe(),
        "settings": {"batch_size": batch_size, "ablation": list(kinds),
                     "logit_lens_positions_per_window": int(positions.numel()), "weights": weights},
        "timings": timings,
        "ablation_cost_forward_equivalents": blocks_evaluated / n_blocks,
    }
    columns = column_descriptions([kind for kind in kinds if kind != "expert"], weights)
    if acc.experts is not None:
        columns |= acc.experts.descriptions()
    expert_rows = acc.experts.rows() if acc.experts is not None else []
    return ProfileResult(meta, rows, linear_rows, columns, lens_grid, expert_rows)


def column_descriptions(kinds: Sequence[str] = UNIT_KINDS, weights: bool = True) -> dict[str, str]:
    columns = {"block": "block index, 0 = nearest the embeddings"}
    columns |= {name: metric.description for name, metric in METRICS.items()}
    columns["logit_lens_kl"] = "KL(final output || final norm + LM head applied to this block's output), nats/token"
    columns["logit_lens_top1"] = "fraction of positions where the logit lens at this block picks the final top-1 token"
    if weights:
        columns["zd"] = "block ZD: its linears' ZD weighted by size (Layer-Wise Quantization)"
        columns |= {name: metric.description for name, metric in WEIGHT_METRICS.items()}
    for kind in kinds:
        what = {"block": "the whole block", "attn": "the attention sublayer", "mlp": "the MLP sublayer",
                "shared_expert": "the shared expert (empty in dense blocks)"}[kind]
        columns[f"ablation_kl_{kind}"] = f"KL(model || model without {what}), nats/token"
    return columns


def run_profile(
    model: str | Path | LoadedModel,
    data: str | Path | Sequence[str] | None = None,
    *,
    tokens: int = 4096,
    seq_len: int = 512,
    seed: int = 0,
    out: str | Path | None = None,
    overwrite: bool = False,
    ablation: bool | Sequence[str] = False,
    batch_size: int = 2,
    lens_positions_per_window: int | None = None,
    weights: bool = True,
    dtype: str = "auto",
    device: str = "cpu",
    device_map: str | None = None,
    streaming: bool | None = False,
    progress: bool = True,
) -> ProfileResult:
    """`layerwise profile` from Python: load, cut calibration windows, profile, and save to `out`.

    `data=None` uses the calibration excerpt shipped with layerwise. Output (if `out`):
    profile.json, blocks.csv, linears.csv (and experts.csv for a mixture-of-experts model). Inputs
    are checked before any long work starts.
    `streaming` reads one block at a time from disk as it runs (`load_model(streaming=True)`;
    None: only when the model would not fit in memory).
    """
    if tokens <= 0:
        raise LayerwiseError(f"--tokens must be a positive number, got {tokens}")
    if out is not None:
        check_output(out, overwrite, directory=True)
    if isinstance(model, LoadedModel):
        loaded = model
        windows = token_windows(loaded.tokenizer, data, tokens=tokens, seq_len=seq_len, seed=seed)
    else:
        # Check the architecture and the text before spending minutes loading weights.
        source = resolve_source(model)
        config = load_config(source)
        get_adapter(config.model_type, config)
        tokenizer = load_tokenizer(source)
        windows = token_windows(tokenizer, data, tokens=tokens, seq_len=seq_len, seed=seed)
        loaded = load_model(model, dtype=dtype, device=device, device_map=device_map, tokenizer=tokenizer,
                            streaming=streaming)
    if loaded.streamed is not None:
        loaded.set_tokenizer_aside()  # the text is tokenized; streamed, every MB left counts
    result = profile_model(loaded, windows, batch_size=batch_size, ablation=ablation,
                           lens_positions_per_window=lens_positions_per_window, weights=weights, progress=progress)
    if out is not None:
        result.save(out)
    return result
