"""Per-expert statistics of mixture-of-experts blocks: where the router sends tokens, how sure it
is, what each expert and the shared expert add to the residual stream, and (optionally) what the
model loses when the router may not choose one expert."""
from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass, field
from typing import Iterator

import torch
from torch import nn

from layerwise.engine.hooks import BlockCall
from layerwise.models.adapters import Adapter
from layerwise.models.experts import block_experts
from layerwise.models.layout import blocks_of, has_experts

BLOCK_COLUMNS = {
    "expert_load_entropy": "entropy of the block's expert load / log(experts): 1 = every expert as busy",
    "expert_load_max": "busiest expert's load share x number of experts: 1 = balanced",
    "router_entropy": "mean entropy of the router's softmax per token / log(experts): 0 = certain",
    "routed_rel_update": "||routed experts' summed update|| / ||h_in|| per token",
    "shared_rel_update": "||shared expert's gated update|| / ||h_in|| per token (MLP update minus the routed part)",
}


@dataclass
class ExpertAccumulator:
    """Running sums for one model: per block, per-expert counts and update norms."""

    n_blocks: int
    n_experts: int
    has_shared: bool = False  # a shared expert beside the routed ones (Qwen2-MoE, Qwen3-Next)
    counts: torch.Tensor = field(init=False)
    update: torch.Tensor = field(init=False)
    ablation: torch.Tensor = field(init=False)
    block_sums: list[dict[str, float]] = field(init=False)
    # The routed experts' summed update of the block running now: [tokens, hidden].
    _routed: dict[int, torch.Tensor] = field(default_factory=dict)
    _norms: dict[int, list[tuple[int, torch.Tensor, torch.Tensor]]] = field(default_factory=dict)

    def __post_init__(self) -> None:
        shape = (self.n_blocks, self.n_experts)
        self.counts = torch.zeros(shape, dtype=torch.float64)
        self.update = torch.zeros(shape, dtype=torch.float64)
        self.ablation = torch.zeros(shape, dtype=torch.float64)
        self.block_sums = [{"tokens": 0.0, "router_entropy": 0.0, "routed": 0.0, "shared": 0.0, "ablation_tokens": 0.0}
                           for _ in range(self.n_blocks)]

    def observer(self, block: int):
        def observe(expert: int, token: torch.Tensor, update: torch.Tensor, n_tokens: int) -> None:
            if block not in self._routed:
                self._routed[block] = torch.zeros(n_tokens, update.shape[-1])
            self._routed[block].index_add_(0, token.cpu(), update.detach().float().cpu())
            self._norms.setdefault(block, []).append((expert, token.cpu(), update.detach().float().norm(dim=-1).cpu()))
        return observe

    def on_block(self, call: BlockCall) -> None:
        if call.routed is None:  # a dense block of a model with some
            return
        index = call.index
        h_norm = call.h_in_norm.flatten().cpu().clamp_min(1e-12)
        tokens = h_norm.numel()
        sums = self.block_sums[index]
        sums["tokens"] += tokens
        self.counts[index] += torch.bincount(call.routed.flatten().cpu(), minlength=self.n_experts).double()
        probs = torch.softmax(call.router_logits.float(), dim=-1)
        entropy = -(probs * probs.clamp_min(1e-30).log()).sum(dim=-1)
        sums["router_entropy"] += entropy.double().sum().item() / math.log(self.n_experts)
        for expert, token, norm in self._norms.pop(index, []):
            self.update[index, expert] += (norm / h_norm[token]).double().sum().item()
        routed = self._routed.pop(index, None)
        if routed is None:  # no token reached any expert (cannot happen with top-k >= 1)
            routed = torch.zeros(tokens, call.h_in.shape[-1])
        sums["routed"] += (routed.norm(dim=-1) / h_norm).double().sum().item()
        if self.has_shared:
            shared = call.mlp_delta.reshape(tokens, -1).float().cpu() - routed
            sums["shared"] += (shared.norm(dim=-1) / h_norm).double().sum().item()

    def add_ablation(self, block: int, expert: int, total: float, count: int) -> None:
        """KL summed over `count` positions of a model whose router may not choose `expert`."""
        self.ablation[block, expert] += total
        if expert == 0:
            self.block_sums[block]["ablation_tokens"] += count

    def block_columns(self, index: int) -> dict[str, float | None]:
        sums = self.block_sums[index]
        if not sums["tokens"]:  # a dense block: no routing to describe
            return {name: None for name in self.descriptions()}
        share = self.counts[index] / self.counts[index].sum().clamp_min(1.0)
        nonzero = share[share > 0]
        columns = {
            "expert_load_entropy": float(-(nonzero * nonzero.log()).sum() / math.log(self.n_experts)),
            "expert_load_max": float(share.max() * self.n_experts),
            "router_entropy": sums["router_entropy"] / sums["tokens"],
            "routed_rel_update": sums["routed"] / sums["tokens"],
        }
        if self.has_shared:
            columns["shared_rel_update"] = sums["shared"] / sums["tokens"]
        return columns

    def descriptions(self) -> dict[str, str]:
        """What each of `block_columns`' columns means."""
        return {name: text for name, text in BLOCK_COLUMNS.items() if name != "shared_rel_update" or self.has_shared}

    def rows(self) -> list[dict]:
        """One row per block and expert: `load_share`, the share of routed (token, slot) choices
        that go to it (1/experts when balanced); `rel_update`, the mean over all tokens of ||its
        weighted output|| / ||h_in|| (0 where not routed); with expert ablation, `ablation_kl`,
        KL(model || model whose router may not choose it) in nats per token."""
        rows = []
        for block in range(self.n_blocks):
            sums = self.block_sums[block]
            if not sums["tokens"]:  # a dense block
                continue
            total = self.counts[block].sum().clamp_min(1.0)
            for expert in range(self.n_experts):
                row = {"block": block, "expert": expert,
                       "load_share": float(self.counts[block, expert] / total),
                       "rel_update": float(self.update[block, expert]) / max(sums["tokens"], 1.0)}
                if sums["ablation_tokens"]:
                    row["ablation_kl"] = float(self.ablation[block, expert]) / sums["ablation_tokens"]
                rows.append(row)
        return rows


def shared_expert_path(adapter: Adapter) -> str | None:
    """The shared expert's module inside an MoE block (Qwen's "mlp.shared_expert", DeepSeek's
    "mlp.shared_experts"), or None."""
    return next((path.rsplit(".", 1)[0] for paths in adapter.linears.values() for path in paths
                 if ".shared_expert" in path), None)


def has_shared_expert(adapter: Adapter) -> bool:
    return shared_expert_path(adapter) is not None


@contextlib.contextmanager
def observing_experts(model: nn.Module, adapter: Adapter, accumulator: ExpertAccumulator) -> Iterator[None]:
    """Within the block, every expert's weighted output is reported to `accumulator`."""
    experts = {index: block_experts(block, adapter) for index, block in enumerate(blocks_of(model, adapter))
               if has_experts(block, adapter)}
    try:
        for index, module in experts.items():
            module.observer = accumulator.observer(index)
        yield
    finally:
        for module in experts.values():
            module.observer = None
