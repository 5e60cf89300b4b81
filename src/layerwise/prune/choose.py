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
from layerwise.engine.divergence import Reference, kl_per_token
from layerwise.engine.hooks import BlockCall, capture_blocks
from layerwise.engine.replay import logits_without
from layerwise.errors import LayerwiseError
from layerwise.models.layout import blocks_of
from layerwise.models.loading import LoadedModel
from layerwise.prune.depth import DROP_KINDS, out_projections, silence_
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
    """The `count` units of `kind` to drop first by criterion `by`."""
    loaded.require_in_memory("choosing units to drop")
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
    batches = [batch.to(loaded.input_device) for batch in windows.batches(batch_size)]
    references = [Reference.from_logits(model(input_ids=b, use_cache=False).logits[:, :-1], store=torch.float16)
                  for b in batches]
    saved = out_projections(loaded)
    chosen: list[int] = []
    scores: list[float] = []
    history: list[dict] = []
    forward_equivalents = 1.0
    steps = count if iterate else 1
    try:
        with progress_bars(progress) as bars:
            task = bars.add_task(f"dropping {kind} units", total=steps * n_blocks)
            for _ in range(steps):
                silence_(loaded, kind, chosen)
                calls = [_calls(loaded, batch) for batch in batches]
                forward_equivalents += 1.0
                measured = {}
                for index in range(n_blocks):
                    bars.advance(task)
                    if index in chosen:
                        continue
                    total, positions = 0.0, 0
                    for batch_calls, reference in zip(calls, references):
                        logits = logits_without(model, adapter, batch_calls, index, kind)[:, :-1]
                        total += kl_per_token(reference, logits).sum().item()
                        positions += logits.shape[0] * logits.shape[1]
                    measured[index] = total / positions
                    forward_equivalents += (n_blocks - index) / n_blocks
                history.append({"dropped": list(chosen), "kl": measured})
                ranked = sorted(measured, key=lambda i: (measured[i], i))
                take = ranked[:1] if iterate else ranked[:count]
                chosen.extend(take)
                scores.extend(measured[i] for i in take)
    finally:
        model.load_state_dict(saved, strict=False)
    return DropChoice(kind, "search" if iterate else "ablation", chosen, scores, forward_equivalents, history)


def _calls(loaded: LoadedModel, batch: torch.Tensor) -> list[BlockCall]:
    calls: list[BlockCall] = []

    def keep(call: BlockCall) -> None:
        calls.append(BlockCall(call.index, h_in=call.h_in, args=call.args, kwargs=call.kwargs))

    with capture_blocks(loaded.model, loaded.adapter, keep, keep_call=True):
        loaded.model(input_ids=batch, use_cache=False)
    assert len(calls) == len(blocks_of(loaded.model, loaded.adapter))
    return calls
