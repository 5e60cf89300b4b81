"""Scalar multipliers folded into the weights they scale, on load.

Falcon-H1 (trained with muP) scales its embedding, its logits, each attention and state-space
mixer's input and output, its keys, parts of the mixer's input projection and its MLP by
constants from the config. Folded into the neighbouring weights they change nothing the model
computes, but then (1) each sublayer's residual update is exactly the sum of its modules'
outputs, (2) the logit lens is the model's own head, and (3) the weights we quantize are the ones
llama.cpp's converter writes, since it folds the same constants the same way. The config's
multipliers become 1, so a saved checkpoint is the same model for plain transformers.
"""
from __future__ import annotations

from typing import Callable

import torch
from torch import nn


def _scale_rows(linear: nn.Linear, scale: torch.Tensor | float) -> None:
    """Scale the linear's outputs: its weight rows and bias."""
    scale = torch.as_tensor(scale, dtype=torch.float32)
    weight = linear.weight.data
    weight.copy_((weight.float() * scale.reshape(-1, 1) if scale.dim() else weight.float() * scale).to(weight.dtype))
    if linear.bias is not None:
        linear.bias.data.copy_((linear.bias.data.float() * scale).to(linear.bias.dtype))


def _scale_inputs(linear: nn.Linear, scale: float) -> None:
    """Scale the linear's inputs: its weight only."""
    linear.weight.data.copy_((linear.weight.data.float() * scale).to(linear.weight.dtype))


def fold_falcon_h1(model: nn.Module) -> None:
    config = model.config
    base = model.model
    with torch.no_grad():
        base.embed_tokens.weight.data.mul_(base.embedding_multiplier)
        if not getattr(config, "tie_word_embeddings", False):
            _scale_rows(model.lm_head, base.lm_head_multiplier)
        base.embedding_multiplier = base.lm_head_multiplier = 1.0
        for layer in base.layers:
            attention, mamba, mlp = layer.self_attn, layer.mamba, layer.feed_forward
            for projection in (attention.q_proj, attention.k_proj, attention.v_proj):
                _scale_inputs(projection, layer.attention_in_multiplier)
            _scale_rows(attention.k_proj, attention.key_multiplier)
            _scale_rows(attention.o_proj, layer.attn_out_multiplier)
            _scale_inputs(mamba.in_proj, mamba.ssm_in_multiplier)
            _scale_rows(mamba.in_proj, mamba.mup_vector.flatten())
            _scale_rows(mamba.out_proj, layer.ssm_out_multiplier)
            _scale_rows(mlp.gate_proj, mlp.gate_multiplier)
            _scale_rows(mlp.down_proj, mlp.down_multiplier)
            layer.attention_in_multiplier = layer.attn_out_multiplier = layer.ssm_out_multiplier = 1.0
            attention.key_multiplier = mamba.ssm_in_multiplier = 1.0
            mamba.mup_vector.fill_(1.0)
            mlp.gate_multiplier = mlp.down_multiplier = 1.0
    for name in ("embedding_multiplier", "lm_head_multiplier", "attention_in_multiplier", "attention_out_multiplier",
                 "key_multiplier", "ssm_in_multiplier", "ssm_out_multiplier"):
        setattr(config, name, 1.0)
    config.ssm_multipliers = [1.0] * len(config.ssm_multipliers)
    config.mlp_multipliers = [1.0] * len(config.mlp_multipliers)


# Named by an adapter row's `fold`.
FOLDS: dict[str, Callable[[nn.Module], None]] = {"falcon_h1": fold_falcon_h1}


def fold_multipliers(model: nn.Module, fold: str | None) -> None:
    """Fold the model's constant multipliers into its weights (in place; a no-op when `fold` is None,
    and a second time, since the multipliers are all 1 after the first)."""
    if fold is not None:
        FOLDS[fold](model)
