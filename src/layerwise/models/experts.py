"""Routed experts as one linear per expert and projection, and back.

transformers keeps the routed experts of a mixture-of-experts block as two 3-D parameters
(`gate_up_proj` and `down_proj`, one matrix per expert). Everything layerwise does to weights works
on 2-D linears (hooks that gather a linear's inputs, GPTQ, the quantizers, packing, export names),
and llama.cpp and compressed-tensors store experts per matrix too. So a loaded MoE model has its
fused experts split into `experts.<e>.gate_proj/up_proj/down_proj` linears, which run the same
computation; `fused_experts` puts the 3-D form back for the moments that need transformers' own
module (saving a checkpoint).
"""
from __future__ import annotations

import contextlib
from typing import Callable, Iterator

import torch
from torch import nn

from layerwise.errors import LayerwiseError
from layerwise.models.adapters import Adapter
from layerwise.models.layout import blocks_of, has_experts


def _swiglu(act_fn: nn.Module) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
    return lambda gate, up: act_fn(gate) * up


def _clamped_swiglu(alpha: float, limit: float) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
    """gpt-oss's gate: both halves clamped, gate * sigmoid(alpha * gate), times (up + 1)."""
    def combine(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
        gate = gate.clamp(max=limit)
        return (up.clamp(-limit, limit) + 1) * gate * torch.sigmoid(gate * alpha)
    return combine


class ExpertMLP(nn.Module):
    """One routed expert: down(combine(gate(x), up(x)))."""

    def __init__(self, hidden: int, intermediate: int, combine: Callable, bias: bool, dtype: torch.dtype,
                 device: torch.device):
        super().__init__()
        self.gate_proj = nn.Linear(hidden, intermediate, bias=bias, dtype=dtype, device=device)
        self.up_proj = nn.Linear(hidden, intermediate, bias=bias, dtype=dtype, device=device)
        self.down_proj = nn.Linear(intermediate, hidden, bias=bias, dtype=dtype, device=device)
        # A plain function shared by all experts of the block (no state to register).
        object.__setattr__(self, "combine", combine)

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.down_proj(self.combine(self.gate_proj(hidden), self.up_proj(hidden)))


class SplitExperts(nn.ModuleList):
    """A block's routed experts as a list of `ExpertMLP`, called as transformers calls its fused
    experts module (hidden states, top-k expert indices, top-k weights) with the same result.

    Two fused layouts: most families keep `gate_up_proj` [E, 2I, H] (gate rows, then up rows) and
    `down_proj` [E, H, I], without biases; gpt-oss keeps them transposed ([E, H, 2I], gate and up
    columns interleaved; [E, I, H]) with biases and a clamped gate."""

    def __init__(self, fused: nn.Module):
        interleaved = hasattr(fused, "gate_up_proj_bias")
        gate_up, down = fused.gate_up_proj.detach(), fused.down_proj.detach()
        if interleaved:
            gate_up, down = gate_up.transpose(1, 2), down.transpose(1, 2)
            gates, ups = gate_up[:, 0::2], gate_up[:, 1::2]
            gate_bias, up_bias = fused.gate_up_proj_bias.detach()[:, 0::2], fused.gate_up_proj_bias.detach()[:, 1::2]
            combine = _clamped_swiglu(fused.alpha, fused.limit)
        else:
            half = gate_up.shape[1] // 2
            gates, ups = gate_up[:, :half], gate_up[:, half:]
            combine = _swiglu(fused.act_fn)
        n_experts, intermediate, hidden = gates.shape
        experts = []
        for index in range(n_experts):
            expert = ExpertMLP(hidden, intermediate, combine, interleaved, gate_up.dtype, gate_up.device)
            expert.gate_proj.weight.data.copy_(gates[index])
            expert.up_proj.weight.data.copy_(ups[index])
            expert.down_proj.weight.data.copy_(down[index])
            if interleaved:
                expert.gate_proj.bias.data.copy_(gate_bias[index])
                expert.up_proj.bias.data.copy_(up_bias[index])
                expert.down_proj.bias.data.copy_(fused.down_proj_bias.detach()[index])
            experts.append(expert)
        super().__init__(experts)
        self.interleaved = interleaved
        # The fused module's class rebuilds it on save; kept out of the module tree.
        object.__setattr__(self, "fused_type", type(fused))
        # Called as observer(expert, token indices, weighted update, tokens in the call) for every
        # expert that ran (the profile's per-expert statistics).
        self.observer: Callable[[int, torch.Tensor, torch.Tensor, int], None] | None = None
        # The experts the router chooses among, in its order (all of them unless some are masked).
        self.active: list[int] | None = None

    def forward(self, hidden_states: torch.Tensor, top_k_index: torch.Tensor,
                top_k_weights: torch.Tensor) -> torch.Tensor:
        output = torch.zeros_like(hidden_states)
        for choice, index in enumerate(self.active if self.active is not None else range(len(self))):
            token, slot = torch.where(top_k_index == choice)
            if token.numel() == 0:
                continue
            update = self[index](hidden_states[token]) * top_k_weights[token, slot, None]
            if self.observer is not None:
                self.observer(index, token, update, hidden_states.shape[0])
            output.index_add_(0, token, update.to(output.dtype))
        return output

    def fused(self, config: object) -> nn.Module:
        """The transformers module these experts came from, with their current weights."""
        first = self[0].gate_proj.weight
        with torch.device(first.device):
            module = self.fused_type(config)
        module.to(first.dtype)
        gates = torch.stack([e.gate_proj.weight for e in self])
        ups = torch.stack([e.up_proj.weight for e in self])
        down = torch.stack([e.down_proj.weight for e in self])
        with torch.no_grad():
            if self.interleaved:
                module.gate_up_proj.copy_(torch.stack([gates, ups], dim=2).flatten(1, 2).transpose(1, 2))
                module.gate_up_proj_bias.copy_(torch.stack([torch.stack([e.gate_proj.bias, e.up_proj.bias], dim=1)
                                                            .flatten() for e in self]))
                module.down_proj.copy_(down.transpose(1, 2))
                module.down_proj_bias.copy_(torch.stack([e.down_proj.bias for e in self]))
            else:
                module.gate_up_proj.copy_(torch.cat([gates, ups], dim=1))
                module.down_proj.copy_(down)
        return module


def block_experts(block: nn.Module, adapter: Adapter) -> SplitExperts:
    """A block's routed experts, as loading split them."""
    return block.get_submodule(adapter.experts)


@contextlib.contextmanager
def without_experts(block: nn.Module, adapter: Adapter, removed: list[int]) -> Iterator[None]:
    """Within the block, the router chooses among the other experts only (its rows for `removed`
    are taken out, so top-k and its normalisation run over the rest, as in a model trained without
    them). The router's parameters and buffers with one entry per expert are sliced."""
    experts = block_experts(block, adapter)
    router = block.get_submodule(adapter.router)
    keep = [index for index in range(len(experts)) if index not in set(removed)]
    if not keep:
        raise LayerwiseError("cannot remove every expert of a block")
    if adapter.router_mask:
        # Grouped routing cannot lose rows; an expert whose score is -inf is never chosen.
        bias = router.get_buffer(adapter.router_mask)
        saved_bias = bias.clone()
        try:
            bias[removed] = float("-inf")
            yield
        finally:
            bias.copy_(saved_bias)
        return
    saved = dict(_per_expert_tensors(router, len(experts)))
    previous = experts.active
    try:
        for name, tensor in saved.items():
            _set_tensor(router, name, tensor[keep])
        experts.active = keep
        yield
    finally:
        for name, tensor in saved.items():
            _set_tensor(router, name, tensor)
        experts.active = previous


def remove_experts_(block: nn.Module, adapter: Adapter, removed: list[int]) -> None:
    """Take the experts `removed` out of the block for good, with the router's entries for them."""
    experts = block_experts(block, adapter)
    router = block.get_submodule(adapter.router)
    if getattr(router, "num_group", 1) > 1:
        raise LayerwiseError("experts of a grouped router (DeepSeek's n_group > 1) cannot be removed for good: the "
                             "groups are fixed slices of the experts; profile with --ablation expert to measure them")
    keep = [index for index in range(len(experts)) if index not in set(removed)]
    for name, tensor in list(_per_expert_tensors(router, len(experts))):
        _set_tensor(router, name, tensor.detach()[keep].clone())
    if hasattr(router, "num_experts"):
        router.num_experts = len(keep)
    for index in sorted(set(removed), reverse=True):
        del experts[index]


def _per_expert_tensors(router: nn.Module, n_experts: int) -> Iterator[tuple[str, torch.Tensor]]:
    """The router's own parameters and buffers with one entry per expert (its weight rows; a
    per-expert bias where the family has one)."""
    for name, tensor in [*router.named_parameters(recurse=False), *router.named_buffers(recurse=False)]:
        if tensor.dim() >= 1 and tensor.shape[0] == n_experts:
            yield name, tensor


def _set_tensor(module: nn.Module, name: str, tensor: torch.Tensor) -> None:
    """Replace a module's own parameter or buffer `name` by `tensor`, whatever its shape."""
    if name in module._parameters:
        if not isinstance(tensor, nn.Parameter):
            tensor = nn.Parameter(tensor, requires_grad=False)
        module._parameters[name] = tensor
    else:
        module._buffers[name] = tensor


def split_experts(model: nn.Module, adapter: Adapter) -> None:
    """Replace every block's fused routed experts by `SplitExperts` (in place; a no-op for dense
    models and for experts already split)."""
    if adapter.experts is None:
        return
    for block in blocks_of(model, adapter):
        if not has_experts(block, adapter):
            continue
        module = block.get_submodule(adapter.experts)
        if not isinstance(module, SplitExperts):
            block.set_submodule(adapter.experts, SplitExperts(module))


@contextlib.contextmanager
def fused_experts(model: nn.Module, adapter: Adapter) -> Iterator[None]:
    """Within the block, the model holds transformers' fused experts again (for `save_pretrained`,
    whose renaming back to the checkpoint's names expects them); split again on exit."""
    if adapter.experts is None:
        yield
        return
    split: list[tuple[nn.Module, SplitExperts]] = []
    for block in blocks_of(model, adapter):
        if not has_experts(block, adapter):
            continue
        module = block.get_submodule(adapter.experts)
        if isinstance(module, SplitExperts):
            split.append((block, module))
            block.set_submodule(adapter.experts, module.fused(model.config))
    try:
        yield
    finally:
        for block, module in split:
            block.set_submodule(adapter.experts, module)
