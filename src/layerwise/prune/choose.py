"""Which blocks or sublayers to drop, by a profile score or by measured KL.

- "bi": Block Influence (ShortGPT), 1 - cos(h_in, h_out), which is the profile's LIM; for
  sublayers, the relative update ||delta|| / ||h|| of that sublayer (the profile's
  attn_rel_update / mlp_rel_update). Lowest first. One forward pass.
- "ablation": KL(base || model without the unit), each unit measured alone on the intact model
  ("What Matters in Transformers?"). Lowest first. About L/2 forward passes.
- "search": the same KL, re-measured after every drop on the model already pruned, against the
  original model: greedy in the real objective. About count x L/2 forward passes.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch

from layerwise.data.windows import TokenWindows
from layerwise.engine.replay import call_arguments, final_hidden
from layerwise.errors import LayerwiseError
from layerwise.models.loading import LoadedModel
from layerwise.profile.ablation import Variant, ablate_blocks
from layerwise.prune.depth import DROP_KINDS, projections_restored, silence_
from layerwise.util.progress import progress_bars

CRITERIA = ("bi", "ablation", "search")
_BI_COLUMN = {"block": "lim", "attn": "attn_rel_update", "mlp": "mlp_rel_update"}


@dataclass
class DropChoice:
    kind: str
    criterion: str
    order: list[int]  # block indices, first dropped first
    scores: list[float | None]  # the criterion's value for each, when it was chosen
    forward_equivalents: float = 0.0
    history: list[dict] = field(default_factory=list)  # search: every candidate's KL at every step


def choose_drops(loaded: LoadedModel, windows: TokenWindows, kind: str = "block", count: int = 1,
                 by: str = "bi", *, batch_size: int = 2, progress: bool = True) -> DropChoice:
    """The `count` units of `kind` to drop first by criterion `by` (in memory or streamed)."""
    if kind not in DROP_KINDS:
        raise LayerwiseError(f"unknown drop kind {kind!r}; choose from {', '.join(DROP_KINDS)}")
    if by not in CRITERIA:
        raise LayerwiseError(f"unknown criterion {by!r}; choose from {', '.join(CRITERIA)}")
    n_blocks = loaded.n_blocks
    if not 1 <= count < n_blocks + (kind != "block"):
        raise LayerwiseError(f"cannot drop {count} {kind} units of a model with {n_blocks} blocks"
                             + ("; at least one block must remain" if kind == "block" and count >= n_blocks else ""))
    if by == "bi":
        from layerwise.profile.runner import profile_model

        result = profile_model(loaded, windows, batch_size=batch_size, weights=False, lens_positions_per_window=1,
                               progress=progress)
        scores = result.column(_BI_COLUMN[kind])
        order = sorted(range(n_blocks), key=lambda i: (scores[i], i))[:count]
        return DropChoice(kind, by, order, [scores[i] for i in order], 1.0)
    return _by_kl(loaded, windows, kind, count, by == "search", batch_size, progress)


@torch.no_grad()
def _by_kl(loaded: LoadedModel, windows: TokenWindows, kind: str, count: int, iterate: bool, batch_size: int,
           progress: bool) -> DropChoice:
    model, adapter = loaded.model, loaded.adapter
    n_blocks = loaded.n_blocks
    # Streamed, a batch is one window: the states an ablation wave carries are one window's.
    batches = windows.batches(1 if loaded.streamed is not None else batch_size)
    # The base is the intact model: its last block's outputs, from which its distributions are
    # made again at the head a slice at a time beside each variant's (none is ever stored).
    base_final = [final_hidden(model, adapter, batch.to(loaded.input_device)) for batch in batches]
    chosen: list[int] = []
    scores: list[float] = []
    history: list[dict] = []
    forward_equivalents = 1.0
    steps = count if iterate else 1
    with projections_restored(loaded), progress_bars(progress) as bars:
        task = bars.add_task(f"dropping {kind} units", total=steps * len(batches) * n_blocks)
        for _ in range(steps):
            silence_(loaded, kind, chosen)
            forward_equivalents += 1.0
            totals = {index: 0.0 for index in range(n_blocks) if index not in chosen}
            positions = 0

            def record(variant: Variant, total: float, _positions: int) -> None:
                totals[variant.index] += total
                bars.advance(task, n_blocks / len(totals))

            # The model as pruned so far, each remaining unit removed in turn (the profile's
            # ablation), against the intact model's outputs.
            for batch, base in zip(batches, base_final):
                calls = call_arguments(model, adapter, batch.to(loaded.input_device))
                ablate_blocks(loaded, calls, base, [kind], record, lambda blocks: None, indices=set(totals),
                              every_position=False)
                positions += batch.shape[0] * (batch.shape[1] - 1)
                del calls
            measured = {index: total / positions for index, total in totals.items()}
            forward_equivalents += sum((n_blocks - index) / n_blocks for index in measured)
            history.append({"dropped": list(chosen), "kl": measured})
            ranked = sorted(measured, key=lambda i: (measured[i], i))
            take = ranked[:1] if iterate else ranked[:count]
            chosen.extend(take)
            scores.extend(measured[i] for i in take)
    return DropChoice(kind, "search" if iterate else "ablation", chosen, scores, forward_equivalents, history)
