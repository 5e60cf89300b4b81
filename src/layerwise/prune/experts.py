"""Dropping routed experts of a mixture-of-experts model: the router loses their rows, so it picks
its top-k among the rest, and the experts go, so the checkpoint is smaller and plain transformers
loads it (the same number of experts leaves every block, since the config counts them once).

Which experts: by "ablation", KL(base || model whose router may not choose that expert), each
expert measured alone (block count x experts x L/2 forward passes), or by "load", the share of
routed choices the expert gets (one pass). Lowest first, per block.
"""
from __future__ import annotations

from dataclasses import dataclass

from layerwise.data.windows import TokenWindows
from layerwise.errors import LayerwiseError
from layerwise.models.adapters import get_adapter
from layerwise.models.experts import remove_experts_
from layerwise.models.layout import blocks_of
from layerwise.models.loading import LoadedModel

EXPERT_CRITERIA = ("ablation", "load")
_COLUMN = {"ablation": "ablation_kl", "load": "load_share"}


@dataclass
class ExpertDrop:
    criterion: str
    dropped: dict[int, list[int]]  # block -> experts, by their index before dropping
    scores: dict[int, list[float]]  # the criterion's value for each, in the same order
    forward_equivalents: float


def choose_experts(loaded: LoadedModel, windows: TokenWindows, per_block: int, by: str = "ablation", *,
                   batch_size: int = 2, progress: bool = True) -> ExpertDrop:
    """The `per_block` experts of each block that the criterion `by` ranks lowest."""
    from layerwise.profile.runner import profile_model

    _check_count(loaded, per_block)
    if by not in EXPERT_CRITERIA:
        raise LayerwiseError(f"unknown criterion {by!r} for experts; choose from {', '.join(EXPERT_CRITERIA)}")
    result = profile_model(loaded, windows, batch_size=batch_size, weights=False, lens_positions_per_window=1,
                           ablation=["expert"] if by == "ablation" else False, progress=progress)
    dropped, scores = {}, {}
    for block in _moe_blocks(loaded):
        rows = sorted((row for row in result.experts if row["block"] == block),
                      key=lambda row: (row[_COLUMN[by]], row["expert"]))[:per_block]
        dropped[block] = [row["expert"] for row in rows]
        scores[block] = [row[_COLUMN[by]] for row in rows]
    return ExpertDrop(by, dropped, scores, result.meta["ablation_cost_forward_equivalents"] + 1.0)


def _moe_blocks(loaded: LoadedModel) -> list[int]:
    return [index for index in range(loaded.n_blocks) if index not in loaded.adapter.dense_blocks]


def _check_count(loaded: LoadedModel, per_block: int) -> None:
    adapter = loaded.adapter
    if adapter.experts is None:
        raise LayerwiseError(f"{loaded.model_type} has no routed experts to drop")
    top_k = getattr(loaded.model.config, "num_experts_per_tok", 1)
    if not 1 <= per_block <= adapter.n_experts - top_k:
        raise LayerwiseError(f"can drop 1 to {adapter.n_experts - top_k} experts per block (the router picks "
                             f"{top_k} of {adapter.n_experts}), not {per_block}")


def drop_experts_(loaded: LoadedModel, dropped: dict[int, list[int]]) -> None:
    """Remove the experts `dropped` names from their blocks (every block with experts), in place,
    and the router's rows for them; the config and `loaded.adapter` then count the experts left."""
    loaded.require_in_memory("dropping experts")
    adapter = loaded.adapter
    counts = {len(set(experts)) for experts in dropped.values()}
    if sorted(dropped) != _moe_blocks(loaded) or len(counts) != 1:
        raise LayerwiseError("drop the same number of experts from every block with experts: the config counts them "
                             "once")
    _check_count(loaded, counts.pop())
    for index in _moe_blocks(loaded):
        if any(not 0 <= e < adapter.n_experts for e in dropped[index]):
            raise LayerwiseError(f"block {index} has experts 0..{adapter.n_experts - 1}, not {dropped[index]}")
    blocks = blocks_of(loaded.model, adapter)
    for index in _moe_blocks(loaded):
        remove_experts_(blocks[index], adapter, dropped[index])
    config = loaded.model.config
    setattr(config, adapter.expert_count, adapter.n_experts - len(dropped[0]))
    loaded.adapter = get_adapter(config.model_type, config)
