"""`layerwise drop` from Python: choose what to drop, drop it, write a plain checkpoint."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Sequence

from layerwise.data.windows import token_windows
from layerwise.errors import LayerwiseError
from layerwise.models.loading import LoadedModel, load_model
from layerwise.models.saving import save_plain
from layerwise.prune.choose import DropChoice, choose_drops
from layerwise.prune.depth import check_indices, delete_blocks_, silence_
from layerwise.prune.experts import ExpertDrop, choose_experts, drop_experts_
from layerwise.util.files import check_output
from layerwise.util.meta import run_metadata

DROP_SCHEMA = "layerwise.drop"


def run_drop(
    model: str | Path | LoadedModel,
    *,
    kind: str = "block",
    count: int | None = None,
    indices: Sequence[int] | None = None,
    by: str | None = None,
    data: str | Path | None = None,
    tokens: int = 2048,
    seq_len: int = 512,
    seed: int = 0,
    out: str | Path | None = None,
    overwrite: bool = False,
    dtype: str = "auto",
    device: str = "cpu",
    device_map: str | None = None,
    streaming: bool | None = False,
    progress: bool = True,
) -> tuple[LoadedModel, DropChoice | ExpertDrop]:
    """Drop `count` units of `kind` chosen by `by` (or the given block `indices`), in place.

    `kind="expert"` drops `count` routed experts from every block of a mixture-of-experts model
    (prune/experts.py; `by` "ablation", the default, or "load"); otherwise `by` defaults to "bi".
    Whole blocks are deleted and the rest renumbered, so the checkpoint written to `out` is a
    standard one with fewer layers. Attention or MLP sublayers are dropped by zeroing their output
    projections: the checkpoint keeps its shape (every loader reads it) and gives the pruned
    model's outputs, but saves no memory or compute until an engine skips zero projections.
    With `streaming`, one block at a time is read from disk, for the choice and for the writing
    (None: only for a model that would not fit in memory); experts are dropped in memory only."""
    if (count is None) == (indices is None):
        raise LayerwiseError("give either a number of units to drop (--blocks/--attn/--mlp N) or --indices")
    if out is not None:
        check_output(out, overwrite, directory=True)
    loaded = model if isinstance(model, LoadedModel) else load_model(model, dtype=dtype, device=device,
                                                                      device_map=device_map, streaming=streaming)
    if kind == "expert":
        return _drop_experts(loaded, count, indices, by or "ablation", data, tokens, seq_len, seed, out, progress)
    by = by or "bi"
    if indices is not None:
        order = check_indices(list(indices), loaded.n_blocks)
        if kind == "block" and len(order) >= loaded.n_blocks:
            raise LayerwiseError(f"dropping all {loaded.n_blocks} blocks would leave none; keep at least one")
        choice = DropChoice(kind, "given", order, [None] * len(order))
    else:
        windows = token_windows(loaded.tokenizer, data, tokens=tokens, seq_len=seq_len, seed=seed)
        choice = choose_drops(loaded, windows, kind, count, by, progress=progress)
    n_before = loaded.n_blocks
    if kind == "block":
        kept = delete_blocks_(loaded, choice.order)
    else:
        silence_(loaded, kind, choice.order)
        kept = list(range(n_before))
    if out is not None:
        record = {"schema": DROP_SCHEMA, "schema_version": 1, "kind": kind, "criterion": choice.criterion,
                  "dropped": choice.order, "scores": choice.scores, "kept_original_indices": kept,
                  "blocks_before": n_before, "forward_equivalents": choice.forward_equivalents,
                  "model": loaded.describe()} | run_metadata()
        save_plain(loaded, out, {"layerwise_drop.json": json.dumps(record, indent=1) + "\n"})
    return loaded, choice


def _drop_experts(loaded: LoadedModel, count: int | None, indices, by: str, data, tokens: int, seq_len: int,
                  seed: int, out, progress: bool) -> tuple[LoadedModel, ExpertDrop]:
    if indices is not None or count is None:
        raise LayerwiseError("experts are dropped by number per block (--experts N), not by --indices")
    windows = token_windows(loaded.tokenizer, data, tokens=tokens, seq_len=seq_len, seed=seed)
    choice = choose_experts(loaded, windows, count, by, progress=progress)
    before = loaded.adapter.n_experts
    drop_experts_(loaded, choice.dropped)
    if out is not None:
        record = {"schema": DROP_SCHEMA, "schema_version": 1, "kind": "expert", "criterion": choice.criterion,
                  "dropped": {str(block): experts for block, experts in choice.dropped.items()},
                  "scores": {str(block): scores for block, scores in choice.scores.items()},
                  "experts_before": before, "experts_after": loaded.adapter.n_experts,
                  "forward_equivalents": choice.forward_equivalents, "model": loaded.describe()} | run_metadata()
        save_plain(loaded, out, {"layerwise_drop.json": json.dumps(record, indent=1) + "\n"})
    return loaded, choice
