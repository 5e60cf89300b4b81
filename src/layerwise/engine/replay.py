"""Re-running the blocks of a model from a cached block input, with one unit removed, and
capturing what such re-runs need.

The prefix before the removed unit is never recomputed: the base pass caches every block's
input and call arguments (masks, rotary embeddings), and a variant runs only from its block on.
"""
from __future__ import annotations

import contextlib
from typing import Callable, Iterator, Sequence

import torch
from torch import nn

from layerwise.data.windows import TokenWindows
from layerwise.engine.divergence import Reference, kl_per_token
from layerwise.engine.hooks import (BlockCall, advance_batches, hidden_arg, run_block, scoped_hooks, take_first_inputs,
                                    zero_output)
from layerwise.errors import LayerwiseError
from layerwise.models.adapters import Adapter
from layerwise.models.layout import block_layout, blocks_of, delta_modules, first_tensor, hidden_to_logits
from layerwise.models.loading import LoadedModel
from layerwise.models.streaming import has_overrides, held, held_unless_sliced

# What can be removed from a block: the whole block, or one of its two sublayers.
UNIT_KINDS = ("block", "attn", "mlp")


def removed_unit(block: nn.Module, adapter: Adapter, kind: str):
    if kind == "attn":
        return zero_output(*delta_modules(block, block_layout(block, adapter)[0]))
    if kind == "mlp":
        return zero_output(*delta_modules(block, adapter.mlp_delta))
    return contextlib.nullcontext()


@torch.no_grad()
def hidden_without(
    model: nn.Module, adapter: Adapter, calls: list[BlockCall], index: int, kind: str | None
) -> torch.Tensor:
    """The last block's output of the model with unit `kind` of block `index` removed (kind=None:
    nothing removed), running only blocks `index`.. from the cached input of block `index`."""
    if kind is not None and kind not in UNIT_KINDS:
        raise LayerwiseError(f"unknown unit kind {kind!r}; choose from {', '.join(UNIT_KINDS)}")
    blocks = blocks_of(model, adapter)
    hidden = calls[index].h_in
    for j in range(index, len(blocks)):
        if j == index and kind == "block":
            continue
        with removed_unit(blocks[j], adapter, kind) if j == index else contextlib.nullcontext():
            hidden = run_block(blocks[j], calls[j], hidden)
    return hidden


# Positions whose logits are made at once when KL is summed at the head: a few float32 tensors of
# this many positions x the vocabulary (8 MB each), rather than a batch's worth (0.4 GB for four
# windows of 512 tokens and a 49k vocabulary). 16 MB pieces were ~50 MB more at `plan`'s peak.
HEAD_CHUNK_ELEMENTS = 1 << 21


def head_chunks(model: nn.Module, adapter: Adapter, final: torch.Tensor) -> Iterator[tuple[int, int, int, torch.Tensor]]:
    """(window, start, stop, logits of positions start..stop) for every next-token position (all
    but the last) of every window of `final` (a last block's output), the head applied
    `HEAD_CHUNK_ELEMENTS` of logits at a time."""
    rows = max(1, HEAD_CHUNK_ELEMENTS // model.get_submodule(adapter.lm_head).weight.shape[0])
    positions = final.shape[1] - 1
    for window in range(final.shape[0]):
        for start in range(0, positions, rows):
            stop = min(positions, start + rows)
            yield window, start, stop, hidden_to_logits(model, adapter, final[window, start:stop])


@torch.no_grad()
def head_kl(model: nn.Module, adapter: Adapter, hidden: torch.Tensor,
            reference_of: Callable[[int, int, int], Reference]) -> list[float]:
    """Per window (first axis of `hidden`, a last block's output), the mean KL(base || model) over
    its next-token positions (all but the last), the head applied a chunk of positions at a time;
    `reference_of(window, start, stop)` gives the base distributions of those positions."""
    totals = [0.0] * hidden.shape[0]
    for window, start, stop, logits in head_chunks(model, adapter, hidden):
        totals[window] += kl_per_token(reference_of(window, start, stop), logits).sum().item()
    return [total / (hidden.shape[1] - 1) for total in totals]


def blocks_run(n_blocks: int, index: int, kind: str) -> int:
    """How many block evaluations removing unit `kind` of block `index` costs, from the block's
    input on (for forward-pass-equivalent accounting)."""
    return n_blocks - index - (kind == "block")


def _recorder(calls: list[BlockCall], index: int):
    """A pre-hook that records block `index`'s call arguments (and, for the first block, its input)."""
    def hook(module, args, kwargs):
        calls.append(BlockCall(index, h_in=hidden_arg(args, kwargs).detach() if index == 0 else None,
                               args=tuple(args[1:]), kwargs={k: v for k, v in kwargs.items() if k != "hidden_states"}))
    return hook


class StopForward(Exception):
    """Raised from a hook to end a forward pass once what was wanted of it is kept (the head, a
    vocabulary-wide tensor per token, then never runs)."""


@torch.no_grad()
def block_calls(model: nn.Module, adapter: Adapter, input_ids: torch.Tensor,
                register_more: Callable[[list], None] | None = None) -> tuple[list[BlockCall], torch.Tensor]:
    """Every block's call arguments (masks, rotary embeddings) and the first block's input, from a
    forward pass that ends at the last block's output, which is returned too: what re-running all
    blocks on these tokens needs, and the base model's final state, from which its logits can be
    recomputed a few positions at a time. The head never runs here, so no vocabulary-wide tensor
    is made. `register_more(handles)` adds hooks for the same pass (e.g. input statistics)."""
    blocks = blocks_of(model, adapter)
    calls: list[BlockCall] = []
    last: list[torch.Tensor] = []

    def finish(module, args, output):
        last.append(first_tensor(output).detach())
        raise StopForward

    def register(handles: list) -> None:
        for index, block in enumerate(blocks):
            handles.append(block.register_forward_pre_hook(_recorder(calls, index), with_kwargs=True))
        handles.append(blocks[-1].register_forward_hook(finish))
        if register_more is not None:
            register_more(handles)

    with scoped_hooks(register), contextlib.suppress(StopForward):
        model(input_ids=input_ids, use_cache=False)
    return calls, last[0]


@torch.no_grad()
def call_arguments(model: nn.Module, adapter: Adapter, input_ids: torch.Tensor) -> list[BlockCall]:
    """Every block's call arguments and the first block's input, from a pass in which each block
    hands its input on unchanged (the blocks compute nothing, and a streamed model loads none of
    them): all that re-running the blocks one at a time on these tokens needs."""
    blocks = blocks_of(model, adapter)
    calls: list[BlockCall] = []

    def finish(module, args, output):
        raise StopForward

    def register(handles: list) -> None:
        for index, block in enumerate(blocks):
            handles.append(block.register_forward_pre_hook(_recorder(calls, index), with_kwargs=True))
        handles.append(blocks[-1].register_forward_hook(finish))

    with scoped_hooks(register), passed_through(blocks), contextlib.suppress(StopForward):
        model(input_ids=input_ids, use_cache=False)
    return calls


@contextlib.contextmanager
def passed_through(blocks: nn.ModuleList):
    """Blocks that return their hidden-state input as it is (their hooks still run)."""
    def identity(*args, **kwargs):
        return hidden_arg(args, kwargs)

    saved = [block.__dict__.get("forward") for block in blocks]
    try:
        for block in blocks:
            block.forward = identity
        yield
    finally:
        for block, forward in zip(blocks, saved):
            if forward is None:
                del block.forward
            else:
                block.forward = forward


def calls_of(loaded: LoadedModel, windows: TokenWindows, batch_size: int = 1) -> list[list[BlockCall]]:
    """Per batch of `windows`, every block's call arguments and the first block's input
    (`call_arguments`: no block runs, and a streamed model loads none of them)."""
    return [call_arguments(loaded.model, loaded.adapter, batch.to(loaded.input_device))
            for batch in windows.batches(batch_size)]


@torch.no_grad()
def last_block_outputs(loaded: LoadedModel, calls: list[list[BlockCall]], order: Sequence[int] | None = None, *,
                       hidden: list[torch.Tensor] | None = None,
                       after_block: Callable[[], None] | None = None) -> list[torch.Tensor]:
    """The last block's output per batch (`calls` from `call_arguments`; the first block's inputs
    `hidden`, else those `calls` hold), each block held once for all batches (read once when
    streamed), the blocks run in `order` (indices may repeat or be left out; default: the
    model's own). A block keeps the call arguments it has in the model's order wherever it runs
    (its attention type, its mask). A list given as `hidden` is consumed (outputs replace it)."""
    blocks = blocks_of(loaded.model, loaded.adapter)
    hidden = [batch[0].h_in for batch in calls] if hidden is None else hidden
    for index in range(len(blocks)) if order is None else order:
        with held(loaded.streamed, f"{loaded.adapter.blocks}.{index}"):
            hidden = advance_batches(blocks[index], calls, hidden, index)
        if after_block is not None:
            after_block()
    return hidden


@torch.no_grad()
def final_hidden(model: nn.Module, adapter: Adapter, input_ids: torch.Tensor) -> torch.Tensor:
    """The last block's output for these tokens, as the final norm receives it (so a schedule that
    repeats the last block still ends after its last run); the pass stops there."""
    kept: list[torch.Tensor] = []

    def finish(module, args):
        kept.append(args[0].detach())
        raise StopForward

    norm = model.get_submodule(adapter.final_norm)
    with scoped_hooks(lambda handles: handles.append(norm.register_forward_pre_hook(finish))), \
            contextlib.suppress(StopForward):
        model(input_ids=input_ids, use_cache=False)
    return kept[0]


@torch.no_grad()
def first_block_input(model: nn.Module, adapter: Adapter, input_ids: torch.Tensor) -> torch.Tensor:
    """The first block's input for these tokens with the embedding as it now is (the model's own
    code computes it: scaling, position embeddings); the pass stops there."""
    kept: list[torch.Tensor] = []

    def hook(module, args, kwargs):
        kept.append(hidden_arg(args, kwargs).detach())
        raise StopForward

    def register(handles: list) -> None:
        handles.append(blocks_of(model, adapter)[0].register_forward_pre_hook(hook, with_kwargs=True))

    with scoped_hooks(register), contextlib.suppress(StopForward):
        model(input_ids=input_ids, use_cache=False)
    return kept[0]


@torch.no_grad()
def base_reference(model: nn.Module, adapter: Adapter, final: torch.Tensor,
                   store: torch.dtype = torch.float16) -> Reference:
    """The base model's next-token distributions for every position but the last of each window,
    from its last block's output `final`, the head applied a chunk of positions at a time into
    one preallocated tensor (the whole batch's float32 logits never exist at once)."""
    vocab = model.get_submodule(adapter.lm_head).weight.shape[0]
    reference = Reference.empty(final.shape[0], final.shape[1] - 1, vocab, store, final.device)
    for window, start, stop, logits in head_chunks(model, adapter, final):
        reference.put(window, start, Reference.from_logits(logits, store=store))
    return reference


@torch.no_grad()
def final_states_streamed(loaded: LoadedModel, inputs: list[torch.Tensor], compare: bool = True,
                          order: Sequence[int] | None = None,
                          after_block: Callable[[], None] | None = None) -> tuple[list[torch.Tensor], list | None]:
    """The last block's outputs of a streamed model's base (its checkpoint as it is) and, with
    `compare`, of the model with its overrides and its blocks run in `order`, for each token
    tensor of `inputs` ([1, length]; lengths may differ): each block read once per model for all
    inputs and run on one at a time."""
    def one_pass(blocks: Sequence[int] | None) -> list[torch.Tensor]:
        # Call arguments are made afresh for each pass (the embedding alone runs: the base's or
        # the variant's), so that no first block's input is kept beside the outputs.
        calls = [call_arguments(loaded.model, loaded.adapter, ids.to(loaded.input_device)) for ids in inputs]
        return last_block_outputs(loaded, calls, blocks, hidden=take_first_inputs(calls), after_block=after_block)

    with loaded.streamed.original():
        base_final = one_pass(None)
    return base_final, one_pass(order) if compare else None


def paired_head(loaded: LoadedModel, base_state: torch.Tensor,
                state: torch.Tensor | None) -> Iterator[tuple[int, int, torch.Tensor, torch.Tensor | None]]:
    """(start, stop, base logits, logits) for every chunk of next-token positions (all but the
    last) of one sequence, from the base's last-block output `base_state` and a variant's `state`
    ([length, hidden]; None: base logits only). Unless the variant quantized a streamed head (an
    override, then decoded for the variant and read as stored for the base), both run through
    the head together: in memory, or streamed, held for the sequence or read a slice at a time
    for each chunk; so the head and one chunk's logits are all that exist beside the blocks'
    outputs."""
    streamed, model, adapter = loaded.streamed, loaded.model, loaded.adapter
    positions = base_state.shape[0] - 1
    rows = max(1, HEAD_CHUNK_ELEMENTS // model.get_submodule(adapter.lm_head).weight.shape[0])
    head_as_stored = not has_overrides(streamed, adapter.lm_head)
    with held_unless_sliced(streamed, adapter.lm_head) if head_as_stored else contextlib.nullcontext():
        for start in range(0, positions, rows):
            stop = min(positions, start + rows)
            if head_as_stored:  # one application (one read of a sliced head) for both
                states = base_state[start:stop] if state is None else torch.cat([base_state[start:stop],
                                                                                 state[start:stop]])
                both = hidden_to_logits(model, adapter, states)
                yield start, stop, both[:stop - start], None if state is None else both[stop - start:]
                continue
            with streamed.original():
                base_logits = hidden_to_logits(model, adapter, base_state[start:stop])
            logits = None
            if state is not None:  # the quantized head, decoded for this chunk
                with held(streamed, adapter.lm_head):
                    logits = hidden_to_logits(model, adapter, state[start:stop])
            yield start, stop, base_logits, logits
