"""Removing depth: deleting whole blocks, silencing sublayers, and running a model under a schedule
of block indices (skips and repeats) without touching its weights.

A block of a residual network computes h + attn(h) + mlp(h + attn(h)) (or a variant with
post-norms or a parallel residual); with its attention output projection and MLP output
projection zeroed (weights and biases) it returns h exactly. Zeroing those projections is how a
drop is evaluated in memory, for every architecture in the adapter table; a saved checkpoint
deletes whole blocks instead and renumbers the rest, so plain transformers loads it.
"""
from __future__ import annotations

import contextlib
import functools
import re
from typing import Iterator, Sequence

import torch
from torch import nn

from layerwise.errors import LayerwiseError
from layerwise.models.adapters import Adapter, get_adapter
from layerwise.models.layout import block_layout, blocks_of
from layerwise.models.loading import LoadedModel
from layerwise.models.streaming import write_parameter

DROP_KINDS = ("block", "attn", "mlp")
_OUT_ROLES = {"attn": ("attn_out",), "mlp": ("mlp_out",), "block": ("attn_out", "mlp_out")}
_ALL_ROLES = {"attn": ("attn_in", "attn_out"), "mlp": ("mlp_in", "mlp_out"),
              "block": ("attn_in", "attn_out", "mlp_in", "mlp_out")}


def check_indices(indices: Sequence[int], n_blocks: int, what: str = "block") -> list[int]:
    """Sorted, unique, in range; an error names the first bad index."""
    checked = []
    for index in indices:
        if isinstance(index, bool) or not isinstance(index, int) or not 0 <= index < n_blocks:
            raise LayerwiseError(f"{what} index {index!r} is out of range; this model has blocks 0..{n_blocks - 1}")
        checked.append(index)
    return sorted(set(checked))


def dropped_modules(adapter: Adapter, kind: str, index: int) -> list[str]:
    """Fully qualified names of the linears a drop makes useless (they cost nothing once dropped)."""
    roles = _ALL_ROLES[_check_kind(kind)]
    return [f"{adapter.blocks}.{index}.{path}" for role in roles for path in adapter.linears_of(index).get(role, ())]


def _check_kind(kind: str) -> str:
    if kind not in DROP_KINDS:
        raise LayerwiseError(f"unknown drop kind {kind!r}; choose from {', '.join(DROP_KINDS)}")
    return kind


def silence_(loaded: LoadedModel, kind: str, indices: Sequence[int]) -> None:
    """Zero the output projections (weights and biases) of the given blocks' `kind`, in place:
    the block then adds nothing for that sublayer ("block": both), exactly."""
    indices = check_indices(indices, loaded.n_blocks)
    model, adapter = loaded.model, loaded.adapter
    for index in indices:
        block = blocks_of(model, adapter)[index]
        for role in _OUT_ROLES[_check_kind(kind)]:
            for path in block_layout(block, adapter)[1].get(role, ()):
                module = block.get_submodule(path)
                for parameter in ("weight", "bias"):
                    if getattr(module, parameter, None) is not None:
                        zeros = functools.partial(torch.zeros_like, getattr(module, parameter), device="cpu")
                        write_parameter(loaded.streamed, model, f"{adapter.blocks}.{index}.{path}.{parameter}", zeros)


@contextlib.contextmanager
def projections_restored(loaded: LoadedModel) -> Iterator[None]:
    """Whatever `silence_` does inside is undone on exit (in memory, the projections are copied
    first; streamed, the overrides it adds are dropped)."""
    if loaded.streamed is not None:
        with loaded.streamed.overrides_restored():
            yield
        return
    saved = out_projections(loaded)
    try:
        yield
    finally:
        loaded.model.load_state_dict(saved, strict=False)


def out_projections(loaded: LoadedModel) -> dict[str, torch.Tensor]:
    """Copies of every block's output-projection weights and biases (what `silence_` changes),
    keyed as in the state dict, to put back with `model.load_state_dict(saved, strict=False)`."""
    adapter = loaded.adapter
    prefixes = tuple(f"{adapter.blocks}.{i}.{path}." for i, block in enumerate(blocks_of(loaded.model, adapter))
                     for role in ("attn_out", "mlp_out") for path in block_layout(block, adapter)[1].get(role, ()))
    return {name: tensor.detach().clone() for name, tensor in loaded.model.state_dict().items()
            if name.startswith(prefixes)}


def parse_unit(adapter: Adapter, n_blocks: int, name: str) -> tuple[str, int]:
    """"model.layers.3" -> ("block", 3); "model.layers.3.attn" -> ("attn", 3); ".mlp" likewise."""
    match = re.fullmatch(re.escape(adapter.blocks) + r"\.(\d+)(?:\.(attn|mlp))?", name)
    if not match or int(match[1]) >= n_blocks:
        raise LayerwiseError(f"cannot drop {name!r}: name a block ({adapter.blocks}.0..{n_blocks - 1}) or one of its "
                             f"sublayers ({adapter.blocks}.N.attn, {adapter.blocks}.N.mlp)")
    return match[2] or "block", int(match[1])


def drop_units_(loaded: LoadedModel, names: Sequence[str]) -> list[str]:
    """Silence every named unit in place; return the linears that no longer matter (cost 0)."""
    modules: list[str] = []
    for name in names:
        kind, index = parse_unit(loaded.adapter, loaded.n_blocks, name)
        silence_(loaded, kind, [index])
        modules.extend(dropped_modules(loaded.adapter, kind, index))
    return list(dict.fromkeys(modules))


def _set_depth(model: nn.Module, adapter: Adapter, blocks: list[nn.Module], layer_types: list | None) -> None:
    parent_name, _, attribute = adapter.blocks.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, attribute, nn.ModuleList(blocks))
    model.config.num_hidden_layers = len(blocks)
    if layer_types is not None:
        try:
            model.config.layer_types = layer_types
        except AttributeError:  # derived from the depth (Falcon-H1's all-"hybrid" list): already right
            pass


def check_schedule(order: Sequence[int], n_blocks: int) -> list[int]:
    """`order` as a list, refused unless it names at least one block and only blocks there are."""
    order = list(order)
    if not order:
        raise LayerwiseError("a schedule needs at least one block index")
    for index in order:
        if isinstance(index, bool) or not isinstance(index, int) or not 0 <= index < n_blocks:
            raise LayerwiseError(f"schedule names block {index!r}, which this model does not have "
                                 f"(blocks 0..{n_blocks - 1})")
    return order


@contextlib.contextmanager
def schedule(loaded: LoadedModel, order: Sequence[int]) -> Iterator[None]:
    """Inside the block, the model runs its blocks in `order` (indices may repeat or be left out,
    as in "Skip a Layer or Loop it?"); weights are shared, nothing is copied or written. Each
    position keeps its block's attention type (sliding or global) where the config has them."""
    model, adapter = loaded.model, loaded.adapter
    blocks = list(blocks_of(model, adapter))
    order = check_schedule(order, len(blocks))
    layer_types = getattr(model.config, "layer_types", None)
    use_cache = getattr(model.config, "use_cache", None)
    _set_depth(model, adapter, [blocks[i] for i in order], [layer_types[i] for i in order] if layer_types else None)
    # A KV cache is indexed by each attention's own layer index, which repeats would share.
    model.config.use_cache = False
    try:
        yield
    finally:
        _set_depth(model, adapter, blocks, layer_types)
        model.config.use_cache = use_cache


def delete_blocks_(loaded: LoadedModel, indices: Sequence[int]) -> list[int]:
    """Remove blocks from the model for good, renumbering the rest (config and attention layer
    indices follow), as a checkpoint without them would be. Returns the kept original indices."""
    model, adapter = loaded.model, loaded.adapter
    n_blocks = loaded.n_blocks
    indices = check_indices(indices, n_blocks)
    if len(indices) >= n_blocks:
        raise LayerwiseError(f"dropping {len(indices)} of {n_blocks} blocks would leave none; keep at least one")
    kept = [i for i in range(n_blocks) if i not in indices]
    blocks = list(blocks_of(model, adapter))
    layer_types = getattr(model.config, "layer_types", None)
    _set_depth(model, adapter, [blocks[i] for i in kept], [layer_types[i] for i in kept] if layer_types else None)
    if loaded.streamed is not None:
        position = {old: new for new, old in enumerate(kept)}
        loaded.streamed.renumber({f"{adapter.blocks}.{i}": f"{adapter.blocks}.{position[i]}" if i in position else None
                                  for i in range(n_blocks)})
    for new_index, block in enumerate(blocks_of(model, adapter)):
        for module in block.modules():
            if hasattr(module, "layer_idx"):
                module.layer_idx = new_index
    loaded.adapter = get_adapter(model.config.model_type, model.config)  # hybrids: the kinds of the blocks left
    return kept
