"""The logit lens: decode each block's output with the final norm and LM head.

Decoding costs a full LM-head product per block and position, which for small models costs
more than the block itself (SmolLM2: the head is 28M of its 135M weights), so the lens runs on a
fixed set of evenly spaced positions of every window, as many as fit in a fixed share of the cost
of the forward pass. Every window still contributes.
"""
from __future__ import annotations

import torch
from torch import nn

from layerwise.engine.divergence import Reference, kl_per_token, top1_agreement
from layerwise.engine.replay import HEAD_CHUNK_ELEMENTS
from layerwise.models.adapters import Adapter
from layerwise.models.layout import hidden_to_logits


# Share of a bare forward pass that the logit lens may cost when positions are chosen automatically.
LENS_COST_SHARE = 0.1


def auto_positions_per_window(model: nn.Module, adapter: Adapter, seq_len: int) -> int:
    """Positions per window so that decoding every block costs ~LENS_COST_SHARE of the forward pass.

    Per token, a forward pass costs about (block weights + head weights) multiply-adds and the lens
    n_blocks x head weights per decoded position.
    """
    head = model.get_submodule(adapter.lm_head).weight.numel()
    blocks = sum(p.numel() for p in model.get_submodule(adapter.blocks).parameters())
    n_blocks = len(model.get_submodule(adapter.blocks))
    return max(1, min(seq_len, int(LENS_COST_SHARE * seq_len * (blocks + head) / (n_blocks * head))))


def lens_positions(seq_len: int, per_window: int) -> torch.Tensor:
    """Evenly spaced positions, always including the last one."""
    count = max(1, min(per_window, seq_len))
    return torch.linspace(0, seq_len - 1, count).round().long().unique()


# Logits decoded at once: as the head is applied elsewhere (16 MB of float32 logits). At 128 MB,
# the logits, their log-softmax and KL's pieces were most of `profile`'s working memory (~350 MB
# on SmolLM2 at 1024 tokens); a few head products per batch instead of one cost little.
_MAX_LOGIT_ELEMENTS = HEAD_CHUNK_ELEMENTS


@torch.no_grad()
def lens_partials(
    model: nn.Module, adapter: Adapter, hidden_by_block: list[torch.Tensor], final: Reference
) -> list[dict[str, float]]:
    """KL(final || lens) and top-1 agreement sums per block, from each block's hidden states at the
    sampled positions ([batch, positions, hidden] each). Blocks are decoded together in chunks:
    one large LM-head product is much faster than one per block."""
    vocab = final.probs.shape[-1]
    batch = final.top1.shape[0]
    rows_per_block = final.top1.numel()
    blocks_per_chunk = max(1, _MAX_LOGIT_ELEMENTS // (rows_per_block * vocab))
    target = Reference(final.probs.reshape(1, rows_per_block, vocab), final.neg_entropy.reshape(1, -1),
                       final.top1.reshape(1, -1))
    partials = []
    for start in range(0, len(hidden_by_block), blocks_per_chunk):
        chunk = torch.stack(hidden_by_block[start : start + blocks_per_chunk])
        lens_logits = hidden_to_logits(model, adapter, chunk.reshape(len(chunk), rows_per_block, -1))
        kl = kl_per_token(target, lens_logits).double()
        agree = top1_agreement(target, lens_logits).double()
        for block_kl, block_agree in zip(kl, agree):
            # Sums per sampled position as well (over the batch), for the depth x position heat map.
            by_position = block_kl.reshape(batch, -1).sum(dim=0).cpu().numpy()
            partials.append({"kl_total": block_kl.sum().item(), "top1_total": block_agree.sum().item(),
                             "count": float(rows_per_block), "kl_by_position": by_position,
                             "top1_by_position": block_agree.reshape(batch, -1).sum(dim=0).cpu().numpy(),
                             "windows": float(batch)})
    return partials
