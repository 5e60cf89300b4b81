"""Re-running the blocks of a model from a cached block input, with one unit removed.

The prefix before the removed unit is never recomputed: the base pass caches every block's
input and call arguments (masks, rotary embeddings), and a variant runs only from its block on.
"""
from __future__ import annotations

import contextlib

import torch
from torch import nn

from layerwise.errors import LayerwiseError
from layerwise.models.adapters import Adapter
from layerwise.models.layout import blocks_of, hidden_to_logits
from layerwise.profile.hooks import BlockCall, run_block, zero_output

# What can be removed from a block: the whole block, or one of its two sublayers.
UNIT_KINDS = ("block", "attn", "mlp")


def removed_unit(block: nn.Module, adapter: Adapter, kind: str):
    if kind == "attn":
        return zero_output(block.get_submodule(adapter.attn_delta))
    if kind == "mlp":
        return zero_output(block.get_submodule(adapter.mlp_delta))
    return contextlib.nullcontext()


@torch.no_grad()
def logits_without(
    model: nn.Module, adapter: Adapter, calls: list[BlockCall], index: int, kind: str | None
) -> torch.Tensor:
    """Logits of the model with unit `kind` of block `index` removed (kind=None: nothing removed),
    running only blocks `index`.. from the cached input of block `index`."""
    if kind is not None and kind not in UNIT_KINDS:
        raise LayerwiseError(f"unknown unit kind {kind!r}; choose from {', '.join(UNIT_KINDS)}")
    blocks = blocks_of(model, adapter)
    hidden = calls[index].h_in
    for j in range(index, len(blocks)):
        if j == index and kind == "block":
            continue
        with removed_unit(blocks[j], adapter, kind) if j == index else contextlib.nullcontext():
            hidden = run_block(blocks[j], calls[j], hidden)
    return hidden_to_logits(model, adapter, hidden)


def blocks_run(n_blocks: int, index: int, kind: str) -> int:
    """How many block evaluations `logits_without` costs (for forward-pass-equivalent accounting)."""
    return n_blocks - index - (kind == "block")
