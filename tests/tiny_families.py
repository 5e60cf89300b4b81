"""Tiny random models of the mixture-of-experts and hybrid families, saved as Hugging Face folders
(shared by the tests that run them end to end). Random weights: wiring, never quality."""
from __future__ import annotations

from pathlib import Path

import torch
import transformers
from transformers import AutoModelForCausalLM, AutoTokenizer

from conftest import STORIES

BLOCKS, EXPERTS, TOP_K = 3, 4, 2

# Each family's own settings on top of the common ones in `save_tiny`.
FAMILIES = {
    "mixtral": dict(num_local_experts=EXPERTS, num_experts_per_tok=TOP_K),
    "qwen2_moe": dict(num_experts=EXPERTS, num_experts_per_tok=TOP_K, moe_intermediate_size=64,
                      shared_expert_intermediate_size=128),
    "qwen3_moe": dict(num_experts=EXPERTS, num_experts_per_tok=TOP_K, moe_intermediate_size=64, head_dim=16),
    # llama.cpp's OLMoE normalises keys over all heads: as many key/value heads as query heads.
    "olmoe": dict(num_experts=EXPERTS, num_experts_per_tok=TOP_K, num_key_value_heads=4),
    "gpt_oss": dict(num_local_experts=EXPERTS, num_experts_per_tok=TOP_K, head_dim=16),
    # One dense block first, then experts chosen by groups (two groups of two: the router's
    # grouping is exercised), a shared expert, and latent attention.
    "deepseek_v3": dict(n_routed_experts=EXPERTS, num_experts_per_tok=TOP_K, moe_intermediate_size=64,
                        n_shared_experts=1, first_k_dense_replace=1, n_group=2, topk_group=1, q_lora_rank=64,
                        kv_lora_rank=64, qk_rope_head_dim=8, qk_nope_head_dim=16, v_head_dim=16,
                        num_key_value_heads=4),
    # head_dim as the published configs give it (llama.cpp's converter reads it).
    "falcon_h1": dict(head_dim=16, mamba_d_ssm=64, mamba_n_heads=4, mamba_d_head=16, mamba_d_state=16,
                      mamba_chunk_size=16,
                      embedding_multiplier=2.0, lm_head_multiplier=0.5, attention_in_multiplier=0.7,
                      attention_out_multiplier=1.3, key_multiplier=0.9, ssm_in_multiplier=1.1, ssm_out_multiplier=0.8,
                      ssm_multipliers=[1.2, 0.6, 1.5, 0.4, 0.9], mlp_multipliers=[1.4, 0.6]),
    "lfm2": dict(layer_types=["conv", "full_attention", "conv"], block_ff_dim=128, block_auto_adjust_ff_dim=False,
                 pad_token_id=None),
    "qwen3_next": dict(layer_types=["linear_attention", "full_attention", "linear_attention"], num_experts=EXPERTS,
                       num_experts_per_tok=TOP_K, moe_intermediate_size=64, shared_expert_intermediate_size=64,
                       head_dim=16, linear_num_value_heads=4, linear_num_key_heads=2, linear_key_head_dim=16,
                       linear_value_head_dim=16, pad_token_id=None),
}
MOE_FAMILIES = ("mixtral", "qwen2_moe", "qwen3_moe", "olmoe", "gpt_oss", "deepseek_v3")
HYBRID_FAMILIES = ("lfm2", "qwen3_next", "falcon_h1")


def save_tiny(model_type: str, folder: Path, tokenizer: Path = STORIES, vocab_size: int = 512, **overrides) -> None:
    """A tiny random `model_type` model in `folder`, with the tokenizer folder `tokenizer` (the
    stories260K one by default: vocabulary 512, so the shipped calibration text drives the model)."""
    settings = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=BLOCKS, num_attention_heads=4,
                    num_key_value_heads=2, vocab_size=vocab_size, max_position_embeddings=512, bos_token_id=1,
                    eos_token_id=2)
    settings.update(FAMILIES[model_type])
    settings.update(overrides)
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(transformers.CONFIG_MAPPING[model_type](**settings)).save_pretrained(folder)
    AutoTokenizer.from_pretrained(tokenizer).save_pretrained(folder)
