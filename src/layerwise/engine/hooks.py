"""Scoped hooks: every handle is removed in `finally`, so nothing stays patched after a call."""
from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from functools import cached_property
from typing import Any, Callable, Iterator

import torch
from torch import nn

from layerwise.models.adapters import Adapter
from layerwise.models.layout import block_layout, blocks_of, delta_modules, first_tensor, has_experts


@contextlib.contextmanager
def scoped_hooks(register: Callable[[list], None]) -> Iterator[None]:
    """`register(handles)` appends hook handles; all are removed on exit, even on error."""
    handles: list = []
    try:
        register(handles)
        yield
    finally:
        for handle in handles:
            handle.remove()


@dataclass
class BlockCall:
    """What one block saw and did in one forward pass. Deltas are the sublayers' residual updates."""

    index: int
    h_in: torch.Tensor | None = None
    h_out: torch.Tensor | None = None
    attn_delta: torch.Tensor | None = None
    mlp_delta: torch.Tensor | None = None
    mlp_hidden: torch.Tensor | None = None
    # Mixture-of-experts blocks: the router's logits [tokens, experts] and chosen experts [tokens, k].
    router_logits: torch.Tensor | None = None
    routed: torch.Tensor | None = None
    # The block's other call arguments (masks, rotary embeddings...), without the hidden state;
    # kept only when blocks are to be re-run (`run_block`).
    args: tuple = ()
    kwargs: dict[str, Any] = field(default_factory=dict)

    # Quantities several metrics share, computed once per call.
    @cached_property
    def h_in_norm(self) -> torch.Tensor:
        return self.h_in.float().norm(dim=-1)

    @cached_property
    def h_out_norm(self) -> torch.Tensor:
        return self.h_out.float().norm(dim=-1)

    @cached_property
    def cos_in_out(self) -> torch.Tensor:
        dot = (self.h_in.float() * self.h_out.float()).sum(dim=-1)
        return (dot / (self.h_in_norm * self.h_out_norm).clamp_min(1e-12)).clamp(-1.0, 1.0)

    @cached_property
    def abs_out(self) -> torch.Tensor:
        return self.h_out.float().abs()

    @cached_property
    def median_abs_out(self) -> float:
        # From every 8th entry: an exact median costs ~10x more and moves this ratio by < 1%.
        return self.abs_out.flatten()[::8].median().item()


def hidden_arg(args: tuple, kwargs: dict) -> torch.Tensor:
    """The hidden state a block was called with (positionally or by keyword)."""
    return args[0] if args else kwargs["hidden_states"]


@contextlib.contextmanager
def capture_blocks(
    model: nn.Module,
    adapter: Adapter,
    on_block: Callable[[BlockCall], None],
    *,
    keep_call: bool = False,
) -> Iterator[None]:
    """Call `on_block(call)` as each block finishes, with its input, output and sublayer deltas.

    The tensors of a block are released once `on_block` returns, so memory stays near one block
    unless `on_block` keeps them. With keep_call, the block's call arguments are recorded too, so
    that later blocks can be re-run from a cached input (ablation).
    """
    blocks = blocks_of(model, adapter)
    current: dict[int, BlockCall] = {}

    def register(handles: list) -> None:
        for index, block in enumerate(blocks):
            handles.append(block.register_forward_pre_hook(_start(index), with_kwargs=True))
            handles.append(block.register_forward_hook(_finish(index)))
            for name, delta in (("attn_delta", block_layout(block, adapter)[0]), ("mlp_delta", adapter.mlp_delta)):
                for module in delta_modules(block, delta):
                    handles.append(module.register_forward_hook(_keep(index, name)))
            if adapter.mlp_down is not None:
                handles.append(block.get_submodule(adapter.mlp_down).register_forward_pre_hook(_keep_input(index)))
            if has_experts(block, adapter):
                handles.append(block.get_submodule(adapter.router).register_forward_hook(_keep_routing(index)))

    def _start(index: int):
        def hook(module, args, kwargs):
            call = BlockCall(index, h_in=hidden_arg(args, kwargs).detach())
            if keep_call:
                call.args = tuple(args[1:])
                call.kwargs = {k: v for k, v in kwargs.items() if k != "hidden_states"}
            current[index] = call
        return hook

    def _keep(index: int, name: str):
        # A sublayer whose update is several modules' outputs gets their sum.
        def hook(module, args, output):
            value, previous = first_tensor(output).detach(), getattr(current[index], name)
            setattr(current[index], name, value if previous is None else previous + value)
        return hook

    def _keep_input(index: int):
        def hook(module, args):
            current[index].mlp_hidden = args[0].detach()
        return hook

    def _keep_routing(index: int):
        # transformers' routers return (logits, top-k weights, top-k expert indices).
        def hook(module, args, output):
            current[index].router_logits = output[0].detach()
            current[index].routed = output[-1].detach()
        return hook

    def _finish(index: int):
        def hook(module, args, output):
            call = current.pop(index)
            call.h_out = first_tensor(output).detach()
            # OPT flattens tokens inside its MLP; give every tensor the residual stream's shape.
            for name in ("attn_delta", "mlp_delta"):
                setattr(call, name, getattr(call, name).reshape(call.h_in.shape))
            if call.mlp_hidden is not None:
                call.mlp_hidden = call.mlp_hidden.reshape(*call.h_in.shape[:-1], -1)
            on_block(call)
        return hook

    with scoped_hooks(register):
        yield


def run_block(block: nn.Module, call: BlockCall, hidden: torch.Tensor) -> torch.Tensor:
    """Re-run a block on a new hidden state with the arguments it was called with before."""
    return first_tensor(block(hidden, *call.args, **call.kwargs))


def run_batches(block: nn.Module, calls: list[list[BlockCall]], hidden: list[torch.Tensor],
                index: int) -> list[torch.Tensor]:
    """Block `index`'s outputs for every batch: `calls[b]` holds batch b's call arguments of every
    block, `hidden[b]` its input here (batches beyond `hidden` are not run)."""
    return [run_block(block, batch[index], state) for batch, state in zip(calls, hidden)]


def advance_batches(block: nn.Module, calls: list[list[BlockCall]], hidden: list[torch.Tensor],
                    index: int) -> list[torch.Tensor]:
    """`run_batches` for a caller done with the inputs: each batch's output takes its input's place
    in `hidden` (returned) as soon as it is made, so inputs and outputs are never all in memory."""
    for b, batch in enumerate(calls[:len(hidden)]):
        hidden[b] = run_block(block, batch[index], hidden[b])
    return hidden


def take_first_inputs(calls: list[list[BlockCall]]) -> list[torch.Tensor]:
    """The first block's input of every batch, taken out of `calls` (which then no longer hold it)."""
    hidden = [batch[0].h_in for batch in calls]
    for batch in calls:
        batch[0].h_in = None
    return hidden


@contextlib.contextmanager
def zero_output(*modules: nn.Module) -> Iterator[None]:
    """Make the modules contribute nothing: each one's output (or first output) is replaced by zeros."""

    def hook(mod, args, output):
        if isinstance(output, tuple):
            return (torch.zeros_like(output[0]),) + tuple(output[1:])
        return torch.zeros_like(output)

    with scoped_hooks(lambda handles: handles.extend(module.register_forward_hook(hook) for module in modules)):
        yield
