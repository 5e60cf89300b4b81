"""The profile's ablation: KL(model || model without a unit) per block, for each kind of unit
(the whole block, its attention or MLP sublayer, a mixture-of-experts block's shared expert, or
each routed expert that the router may then not choose), averaged over every position of the
windows (the last one's distribution too, though no token of the window follows it).

Blocks are ablated in order, a wave of up to eight ablations at a time (of one block, or of a few
consecutive ones). The base model's input to a block is carried along (each block run on it once
more than the forward pass did), so no block's input is kept beyond its turn; a wave's ablations
start from it at their blocks and run the later blocks together, each block held once for the
whole wave (read once when streamed); and their last states are compared with the base model's
at the head a slice of vocabulary rows at a time (`SlicedKL`, one pass over the head per wave).
So a few blocks' activations are in memory, never every block's inputs or a distribution per
position (the whole batch's logits, its base distributions and each ablation's logits took 1.4x
the float32 model on SmolLM2 streamed before: bench/memory.py).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Collection, ContextManager, Sequence

import torch
from torch import nn

from layerwise.engine.hooks import BlockCall, run_block, zero_output
from layerwise.engine.replay import blocks_run, removed_unit
from layerwise.engine.sliced_kl import SlicedKL
from layerwise.models.experts import without_experts
from layerwise.models.layout import blocks_of
from layerwise.models.loading import LoadedModel
from layerwise.models.streaming import held

# Ablations carried through the later blocks at once (from one block or from several consecutive
# ones), against one read of each later block and of the head (and one base distribution made
# again) for all of them: at most this many, and streamed, their states (one block's activations
# each) at most half of one block's weights, so that a wave adds little to the one block a
# streamed run holds (SmolLM2 in float32 at 1024 tokens: three at a time; an 8B model: eight).
_VARIANTS_AT_ONCE = 8


@dataclass(frozen=True)
class Variant:
    """One ablation: the block, what it is recorded as, and how the block runs without the unit."""

    index: int  # the block
    kind: str  # an ablation kind: block, attn, mlp, shared_expert or expert
    expert: int | None  # the routed expert the router may not choose (kind "expert")
    skip: bool  # the whole block is left out
    removed: Callable[[nn.Module], ContextManager]  # the block with the unit removed, while entered


def block_variants(loaded: LoadedModel, index: int, kinds: Sequence[str],
                   shared_expert_path: str | None) -> list[Variant]:
    """The ablations of block `index` for `kinds` (a dense block has no experts to ablate)."""
    adapter = loaded.adapter
    moe_block = adapter.experts is not None and index not in adapter.dense_blocks
    variants = []
    for kind in kinds:
        if kind == "expert":
            if moe_block:
                variants += [Variant(index, kind, expert, False,
                                     lambda block, e=expert: without_experts(block, adapter, [e]))
                             for expert in range(adapter.n_experts)]
        elif kind == "shared_expert":
            if moe_block:
                variants.append(Variant(index, kind, None, False,
                                        lambda block: zero_output(block.get_submodule(shared_expert_path))))
        else:
            variants.append(Variant(index, kind, None, kind == "block",
                                    lambda block, k=kind: removed_unit(block, adapter, k)))
    return variants


def all_variants(loaded: LoadedModel, kinds: Sequence[str], shared_expert_path: str | None) -> list[Variant]:
    """Every ablation of the model, in block order."""
    return [variant for index in range(loaded.n_blocks)
            for variant in block_variants(loaded, index, kinds, shared_expert_path)]


def wave_size(loaded: LoadedModel, state: torch.Tensor) -> int:
    """How many ablations run together, for states like `state` (see `_VARIANTS_AT_ONCE`)."""
    if loaded.streamed is None:
        return _VARIANTS_AT_ONCE  # beside the whole model, eight states are nothing
    block = blocks_of(loaded.model, loaded.adapter)[0]
    block_bytes = sum(parameter.numel() * parameter.element_size() for parameter in block.parameters())
    return max(1, min(_VARIANTS_AT_ONCE, block_bytes // (2 * state.numel() * state.element_size())))


def waves(variants: list[Variant], size: int) -> list[list[Variant]]:
    """`variants` (in block order) cut into waves of at most `size` run together, each wave's from
    consecutive blocks (a block with more spreads over several)."""
    cut: list[list[Variant]] = [[]]
    for variant in variants:
        if len(cut[-1]) == size:
            cut.append([])
        cut[-1].append(variant)
    return [wave for wave in cut if wave]


def block_runs(loaded: LoadedModel, kinds: Sequence[str], shared_expert_path: str | None = None) -> int:
    """Blocks run by `ablate_blocks` for one batch, however they are cut into waves: each ablation
    from its block on, and the base model's states carried to the last ablated block."""
    variants = all_variants(loaded, kinds, shared_expert_path)
    return (sum(blocks_run(loaded.n_blocks, variant.index, variant.kind) for variant in variants)
            + (variants[-1].index if variants else 0))


@torch.no_grad()
def ablate_blocks(loaded: LoadedModel, calls: list[BlockCall], final: torch.Tensor, kinds: Sequence[str],
                  record: Callable[[Variant, float, int], None], on_step: Callable[[int], None],
                  shared_expert_path: str | None = None, *, indices: Collection[int] | None = None,
                  every_position: bool = True) -> None:
    """Every ablation of every block (or of the blocks `indices`) for one batch. `calls` hold
    every block's call arguments and the first block's input (taken from them; later inputs are
    not needed), `final` is the last block output the ablations are compared with (the base
    model's; `drop --by search` keeps the intact model's while it prunes). `record(variant,
    summed KL, positions)` receives each ablation's KL summed over the batch's positions (every
    one, or the next-token positions only); `on_step(blocks run)` follows the work."""
    blocks = blocks_of(loaded.model, loaded.adapter)
    comparison = SlicedKL(loaded, [final], torch.float32, every_position=every_position)
    del final  # the comparison holds it normed
    positions = comparison.positions
    # The base model's input to block `base_at`, carried along, not kept beside its successors.
    base, base_at, calls[0].h_in = calls[0].h_in, 0, None
    block_name = f"{loaded.adapter.blocks}.{{}}"
    variants = [variant for variant in all_variants(loaded, kinds, shared_expert_path)
                if indices is None or variant.index in indices]
    cut = waves(variants, wave_size(loaded, base))
    for number, wave in enumerate(cut):
        # The base states go on to the next wave's first block (within this wave's last block,
        # where the next wave starts with more variants of it), and no further than needed.
        base_until = cut[number + 1][0].index if number + 1 < len(cut) else wave[-1].index
        states: list[torch.Tensor] = []
        for index in range(base_at, len(blocks)):
            block = blocks[index]
            with held(loaded.streamed, block_name.format(index)):
                _in_place(states, lambda hidden: run_block(block, calls[index], hidden))
                states += [base if variant.skip else _without(block, calls[index], base, variant)
                           for variant in wave if variant.index == index]
                if index < base_until:
                    base = run_block(block, calls[index], base)
                    on_step(1)
        base_at = base_until
        _in_place(states, comparison.normed)
        means = comparison.window_kl(len(wave), lambda v, part, window, start, stop: states[v][window, start:stop])
        for variant, per_window in zip(wave, means):
            record(variant, float(per_window.sum()) * positions, positions * len(per_window))
            on_step(blocks_run(len(blocks), variant.index, variant.kind))


def _without(block: nn.Module, call: BlockCall, hidden: torch.Tensor, variant: Variant) -> torch.Tensor:
    with variant.removed(block):
        return run_block(block, call, hidden)


def _in_place(states: list[torch.Tensor], step: Callable[[torch.Tensor], torch.Tensor]) -> None:
    """Each state replaced by its successor as soon as that is made: not two copies of every state."""
    for number, hidden in enumerate(states):
        states[number] = step(hidden)
