"""The units an allocation chooses for: whole blocks, sublayers, groups of linears, or tensors.

A unit is the smallest set of linears that must share one option. Per linear, the groups follow
what inference engines fuse: q/k/v are one matrix in most kernels and gate/up another, so they
share a format ("attn_in", "mlp_in"), while the attention output and the MLP down projection are
free ("attn_out", "mlp_out"). Per tensor, every linear is free, as in a GGUF file, where llama.cpp
stores q, k and v (and gate, up) as tensors of their own types.
"""
from __future__ import annotations

from dataclasses import dataclass

from layerwise.errors import LayerwiseError
from layerwise.models.adapters import LINEAR_ROLES, Adapter, expert_of, merged_expert_path

GRANULARITIES = ("block", "sublayer", "linear", "tensor", "expert")
_SUBLAYER_ROLES = {"attn": ("attn_in", "attn_out"), "mlp": ("mlp_in", "mlp_out")}


@dataclass(frozen=True)
class Unit:
    name: str  # e.g. "model.layers.3", "model.layers.3.attn", "model.layers.3.mlp_in"
    block: int
    modules: tuple[str, ...]  # fully qualified names of its linears
    kind: str = "block"  # "block", "attn", "mlp", a linear role ("attn_in", ...), "expert", "shared_expert"


def units_of(adapter: Adapter, n_blocks: int, granularity: str = "sublayer") -> list[Unit]:
    """Every unit of a model with `n_blocks` blocks, in forward order.

    In mixture-of-experts models every granularity but `expert` keeps all routed experts of a
    block in one unit per role, as GGUF stores them (one tensor, one type, per block and role);
    `expert` makes each routed expert a unit, and the shared expert one, beside the attention (a
    dense block's MLP is one unit).
    """
    if granularity not in GRANULARITIES:
        raise LayerwiseError(f"unknown granularity {granularity!r}; choose from {', '.join(GRANULARITIES)}")
    if granularity == "expert":
        return _expert_units(adapter, n_blocks)
    if granularity == "tensor":
        return _tensor_units(adapter, n_blocks)
    if granularity == "block":
        groups = {"block": ("", LINEAR_ROLES)}
    elif granularity == "sublayer":
        groups = {name: (f".{name}", roles) for name, roles in _SUBLAYER_ROLES.items()}
    else:
        groups = {role: (f".{role}", (role,)) for role in LINEAR_ROLES}
    units = []
    for index in range(n_blocks):
        prefix = f"{adapter.blocks}.{index}"
        for kind, (suffix, roles) in groups.items():
            modules = tuple(f"{prefix}.{path}" for role in roles for path in adapter.linears_of(index).get(role, ()))
            if modules:
                units.append(Unit(prefix + suffix, index, modules, kind))
    return units


def _tensor_units(adapter: Adapter, n_blocks: int) -> list[Unit]:
    """One unit per stored tensor: each linear on its own, except a block's routed experts, which
    stay one unit per projection (GGUF's merged expert tensor)."""
    units = []
    for index in range(n_blocks):
        prefix = f"{adapter.blocks}.{index}"
        tensors: dict[str, tuple[str, list[str]]] = {}
        for role in LINEAR_ROLES:
            for path in adapter.linears_of(index).get(role, ()):
                key = merged_expert_path(path)
                tensors.setdefault(key, (role, []))[1].append(f"{prefix}.{path}")
        units += [Unit(f"{prefix}.{key}", index, tuple(modules), role) for key, (role, modules) in tensors.items()]
    return units


def _expert_units(adapter: Adapter, n_blocks: int) -> list[Unit]:
    if adapter.experts is None:
        raise LayerwiseError("granularity 'expert' needs a mixture-of-experts model; this one has dense MLPs")
    units = []
    for index in range(n_blocks):
        prefix = f"{adapter.blocks}.{index}"
        linears = adapter.linears_of(index)
        attention = tuple(f"{prefix}.{path}" for role in _SUBLAYER_ROLES["attn"] for path in linears.get(role, ()))
        units.append(Unit(f"{prefix}.attn", index, attention, "attn"))
        by_expert: dict[int, list[str]] = {}
        for role in _SUBLAYER_ROLES["mlp"]:
            for path in linears.get(role, ()):
                by_expert.setdefault(expert_of(path), []).append(f"{prefix}.{path}")
        for expert, modules in sorted(by_expert.items()):
            if index in adapter.dense_blocks:
                units.append(Unit(f"{prefix}.mlp", index, tuple(modules), "mlp"))
            elif expert < 0:
                shared = modules[0].rsplit(".", 1)[0]
                units.append(Unit(shared, index, tuple(modules), "shared_expert"))
            else:
                units.append(Unit(f"{prefix}.{adapter.experts}.{expert}", index, tuple(modules), "expert"))
    return units


# Units outside the blocks: the token embedding ("embed") and, when it has its own matrix, the
# output head ("head"). Their `block` says where re-running the model must start: -1 for the
# embedding (from the token ids), the last block for the head.
EDGE_KINDS = ("embed", "head")


def edge_units(adapter: Adapter, n_blocks: int, tied: bool) -> list[Unit]:
    """The token embedding and output head as units, as llama.cpp chooses their types too; one
    unit when they share one matrix (`tied`), since quantizing either quantizes both."""
    units = [Unit(adapter.embed, -1, (adapter.embed,), "embed")]
    if not tied:
        units.append(Unit(adapter.lm_head, n_blocks - 1, (adapter.lm_head,), "head"))
    return units


def block_modules(units: list[Unit]) -> list[str]:
    """The linears of the units inside the blocks (those a block's cached inputs reach)."""
    return [name for unit in units if unit.kind not in EDGE_KINDS for name in unit.modules]


def droppable_units(adapter: Adapter, n_blocks: int) -> dict[str, Unit]:
    """Every unit a plan may drop, by name: whole blocks and attention/MLP sublayers."""
    return {unit.name: unit for granularity in ("block", "sublayer") for unit in units_of(adapter, n_blocks, granularity)}
