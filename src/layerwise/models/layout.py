"""Finding an adapter's modules inside a live model, and the few computations that use them."""
from __future__ import annotations

from typing import Mapping

import torch
from torch import nn

from layerwise.errors import LayerwiseError
from layerwise.models.adapters import LINEAR_ROLES, Adapter


def blocks_of(model: nn.Module, adapter: Adapter) -> nn.ModuleList:
    return model.get_submodule(adapter.blocks)


def block_linears(model: nn.Module, adapter: Adapter) -> list[tuple[int, str, nn.Module]]:
    """(block index, fully qualified name, module) for every linear weight inside the blocks."""
    found = []
    for index, block in enumerate(blocks_of(model, adapter)):
        for role in LINEAR_ROLES:
            for path in block_layout(block, adapter)[1].get(role, ()):
                found.append((index, f"{adapter.blocks}.{index}.{path}", block.get_submodule(path)))
    return found


def _holds(block: nn.Module, path: str) -> bool:
    try:
        block.get_submodule(path)
    except AttributeError:
        return False
    return True


def delta_modules(block: nn.Module, delta: str) -> list[nn.Module]:
    """The modules whose outputs add up to a sublayer's residual update (`Adapter.attn_delta`)."""
    return [block.get_submodule(path) for path in delta.split("+")]


def has_experts(block: nn.Module, adapter: Adapter) -> bool:
    """Whether the block routes tokens to experts (an MoE model's dense blocks do not)."""
    return adapter.experts is not None and _holds(block, adapter.experts)


def block_layout(block: nn.Module, adapter: Adapter) -> tuple[str, Mapping[str, tuple[str, ...]]]:
    """The module whose output is this block's attention (or other token mixer) update, and the
    block's linears by role. Hybrids and MoE models with dense blocks are read from the block
    itself, so a block keeps its layout wherever a schedule or a deletion moves it."""
    linears = adapter.linears
    if adapter.dense_linears and not has_experts(block, adapter):
        linears = {**linears, **adapter.dense_linears}
    if not adapter.mixers:
        return adapter.attn_delta, linears
    for mixer in adapter.mixers.values():
        if _holds(block, mixer.delta):
            return mixer.delta, {**linears, **mixer.linears}
    known = ", ".join(mixer.delta for mixer in adapter.mixers.values())
    raise LayerwiseError(f"a block holds none of the token mixers {known}")


def head_is_tied(model: nn.Module, adapter: Adapter) -> bool:
    """Whether the output head shares the token embedding's matrix."""
    return model.get_submodule(adapter.lm_head).weight is model.get_submodule(adapter.embed).weight


def stored_transposed(module: nn.Module) -> bool:
    """Whether the module keeps its weight as [in_features, out_features] (GPT-2's Conv1D)."""
    return type(module).__name__ == "Conv1D"


def linear_weight(module: nn.Module) -> torch.Tensor:
    """The weight as [out_features, in_features]; GPT-2's Conv1D stores it transposed."""
    weight = module.weight
    if stored_transposed(module):
        return weight.t()
    return weight


def set_linear_weight(module: nn.Module, values: torch.Tensor) -> None:
    """Write an [out, in] matrix into a linear's weight, in whatever layout and dtype it keeps."""
    if stored_transposed(module):
        values = values.t()
    module.weight.data.copy_(values.to(module.weight.dtype))


def first_tensor(output: object) -> torch.Tensor:
    """Modules return a tensor or a tuple whose first item is the hidden state."""
    return output[0] if isinstance(output, (tuple, list)) else output


def hidden_to_logits(model: nn.Module, adapter: Adapter, hidden: torch.Tensor) -> torch.Tensor:
    """Apply the final norm and the LM head to a residual-stream state (the logit lens)."""
    norm = model.get_submodule(adapter.final_norm)
    head = model.get_submodule(adapter.lm_head)
    logits = head(norm(hidden))
    softcap = getattr(model.config, "final_logit_softcapping", None)
    if softcap:
        logits = torch.tanh(logits / softcap) * softcap
    return logits
