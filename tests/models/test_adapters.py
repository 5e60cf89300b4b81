"""One test per row of the adapter table, on tiny random models built from transformers' configs.

Random weights are fine here: these tests check shapes and wiring, never quality.
"""
from __future__ import annotations

import pytest
import torch
import transformers
from transformers import AutoModelForCausalLM

from layerwise.engine.hooks import capture_blocks
from layerwise.engine.replay import hidden_without
from layerwise.errors import LayerwiseError
from layerwise.models import ADAPTERS, get_adapter, supported_architectures, wrap_model
from layerwise.models.experts import SplitExperts, fused_experts
from layerwise.models.layout import block_layout, block_linears, blocks_of, hidden_to_logits, linear_weight

HIDDEN, FFN, HEADS, VOCAB = 32, 64, 4, 128
_LLAMA_LIKE = dict(hidden_size=HIDDEN, intermediate_size=FFN, num_hidden_layers=3, num_attention_heads=HEADS,
                   num_key_value_heads=2, vocab_size=VOCAB, max_position_embeddings=64,
                   pad_token_id=0, bos_token_id=1, eos_token_id=2)
TINY_CONFIGS = {
    "llama": _LLAMA_LIKE,
    "mistral": _LLAMA_LIKE,
    "qwen2": _LLAMA_LIKE,
    "qwen3": _LLAMA_LIKE | {"head_dim": 8},
    "gemma": _LLAMA_LIKE | {"head_dim": 8},
    "gemma2": _LLAMA_LIKE | {"head_dim": 8, "sliding_window": 4},
    "gemma3_text": _LLAMA_LIKE | {"head_dim": 8, "sliding_window": 4},
    "phi3": _LLAMA_LIKE,
    "gpt2": dict(n_embd=HIDDEN, n_layer=3, n_head=HEADS, vocab_size=VOCAB, n_positions=64, bos_token_id=1,
                 eos_token_id=1),
    "gpt_neox": dict(hidden_size=HIDDEN, intermediate_size=FFN, num_hidden_layers=3, num_attention_heads=HEADS,
                     vocab_size=VOCAB, max_position_embeddings=64, bos_token_id=1, eos_token_id=2),
    "opt": dict(hidden_size=HIDDEN, ffn_dim=FFN, num_hidden_layers=3, num_attention_heads=HEADS, vocab_size=VOCAB,
                max_position_embeddings=64, word_embed_proj_dim=HIDDEN, pad_token_id=0, bos_token_id=1, eos_token_id=2),
    # Mixture-of-experts rows: four experts, two per token.
    "mixtral": _LLAMA_LIKE | {"num_local_experts": 4, "num_experts_per_tok": 2},
    "qwen2_moe": _LLAMA_LIKE | {"num_experts": 4, "num_experts_per_tok": 2, "moe_intermediate_size": 24,
                                "shared_expert_intermediate_size": 48},
    "qwen3_moe": _LLAMA_LIKE | {"num_experts": 4, "num_experts_per_tok": 2, "moe_intermediate_size": 24, "head_dim": 8},
    "olmoe": _LLAMA_LIKE | {"num_experts": 4, "num_experts_per_tok": 2},
    "gpt_oss": _LLAMA_LIKE | {"num_local_experts": 4, "num_experts_per_tok": 2, "head_dim": 8,
                              "layer_types": ["sliding_attention", "full_attention", "sliding_attention"]},
    # Latent attention (query latent as wide as the model, so every attention input is), a dense
    # first block, grouped routing, a shared expert.
    "deepseek_v3": _LLAMA_LIKE | {"n_routed_experts": 4, "num_experts_per_tok": 2, "moe_intermediate_size": 24,
                                  "n_shared_experts": 1, "first_k_dense_replace": 1, "n_group": 2, "topk_group": 1,
                                  "q_lora_rank": HIDDEN, "kv_lora_rank": 16, "qk_rope_head_dim": 4,
                                  "qk_nope_head_dim": 8, "v_head_dim": 8, "num_key_value_heads": HEADS},
    # Attention and a Mamba-2 mixer side by side in every block, with muP multipliers (not 1, so
    # folding them is exercised).
    "falcon_h1": _LLAMA_LIKE | {"mamba_d_ssm": 32, "mamba_n_heads": 4, "mamba_d_head": 8, "mamba_d_state": 16,
                                "mamba_chunk_size": 16, "embedding_multiplier": 2.0, "lm_head_multiplier": 0.5,
                                "attention_in_multiplier": 0.7, "attention_out_multiplier": 1.3, "key_multiplier": 0.9,
                                "ssm_in_multiplier": 1.1, "ssm_out_multiplier": 0.8,
                                "ssm_multipliers": [1.2, 0.6, 1.5, 0.4, 0.9], "mlp_multipliers": [1.4, 0.6]},
    # Hybrid rows: blocks of two kinds, in an order that puts each kind first somewhere.
    "lfm2": _LLAMA_LIKE | {"layer_types": ["conv", "full_attention", "conv"], "block_ff_dim": FFN,
                           "block_auto_adjust_ff_dim": False},
    "qwen3_next": _LLAMA_LIKE | {"layer_types": ["linear_attention", "full_attention", "linear_attention"],
                                 "num_experts": 4, "num_experts_per_tok": 2, "moe_intermediate_size": 24,
                                 "shared_expert_intermediate_size": 48, "head_dim": 8, "linear_num_value_heads": 2,
                                 "linear_num_key_heads": 2, "linear_key_head_dim": 8, "linear_value_head_dim": 8},
}
MOE_ROWS = sorted(name for name, adapter in ADAPTERS.items() if adapter.experts)


def tiny_model(model_type: str, **overrides):
    config = transformers.CONFIG_MAPPING[model_type](**(TINY_CONFIGS[model_type] | overrides))
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    return model.eval()


def test_every_row_has_a_test():
    assert set(TINY_CONFIGS) == set(ADAPTERS)


@pytest.mark.parametrize("model_type", sorted(ADAPTERS))
def test_adapter_row(model_type):
    model = tiny_model(model_type)
    loaded = wrap_model(model, tokenizer=None)
    adapter = loaded.adapter
    assert loaded.n_blocks == 3
    for path in (adapter.embed, adapter.final_norm, adapter.lm_head):
        model.get_submodule(path)

    # Every linear named in the table exists; weights come out as [out, in] whatever the module type.
    linears = block_linears(model, adapter)
    assert len(linears) == sum(len(adapter.linear_paths(index)) for index in range(3))
    for index, block in enumerate(blocks_of(model, adapter)):
        for role in ("attn_in", "mlp_in"):
            for path in adapter.linears_of(index)[role]:
                assert linear_weight(block.get_submodule(path)).shape[1] == HIDDEN, path
        for role in ("attn_out", "mlp_out"):
            for path in adapter.linears_of(index)[role]:
                assert linear_weight(block.get_submodule(path)).shape[0] == HIDDEN, path

    ids = torch.randint(3, VOCAB, (2, 16))
    calls = []
    with torch.no_grad(), capture_blocks(model, adapter, calls.append, keep_call=True):
        logits = model(input_ids=ids, use_cache=False).logits
    assert [c.index for c in calls] == [0, 1, 2]
    for call in calls:
        # The sublayer deltas the table points at are exactly what the block adds to the residual.
        torch.testing.assert_close(call.h_in + call.attn_delta + call.mlp_delta, call.h_out, atol=1e-5, rtol=1e-5)
        if adapter.mlp_down is not None:
            assert call.mlp_hidden.shape[:-1] == call.h_in.shape[:-1]
    # Final norm + head on the last block's output reproduces the model's logits (logit lens at the top).
    torch.testing.assert_close(hidden_to_logits(model, adapter, calls[-1].h_out), logits, atol=1e-5, rtol=1e-5)
    # Re-running the blocks from a cached input reproduces the model's logits (ablation replays).
    torch.testing.assert_close(hidden_to_logits(model, adapter, hidden_without(model, adapter, calls, 1, None)),
                               logits, atol=1e-5, rtol=1e-5)


def test_unknown_architecture_lists_the_supported_ones():
    with pytest.raises(LayerwiseError) as error:
        get_adapter("bloom")
    message = str(error.value)
    assert "bloom" in message
    for name in supported_architectures():
        assert name in message


def test_unsupported_variant_of_a_known_family():
    model = tiny_model("opt", do_layer_norm_before=False)
    with pytest.raises(LayerwiseError, match="post-layer-norm"):
        wrap_model(model, tokenizer=None)


@pytest.mark.parametrize("model_type", MOE_ROWS)
def test_split_experts_compute_what_the_fused_ones_did(model_type, tmp_path):
    model = tiny_model(model_type)
    with torch.no_grad():  # biases start at zero: random ones check where each one goes (gpt-oss)
        for name, parameter in model.named_parameters():
            if name.endswith("bias"):
                parameter.normal_(0, 0.1)
    ids = torch.randint(3, VOCAB, (2, 16))
    with torch.no_grad():
        before = model(input_ids=ids).logits
    loaded = wrap_model(model, tokenizer=None)
    first = next(i for i in range(3) if i not in loaded.adapter.dense_blocks)  # DeepSeek's block 0 is dense
    experts = model.get_submodule(f"{loaded.adapter.blocks}.{first}.{loaded.adapter.experts}")
    assert isinstance(experts, SplitExperts) and len(experts) == 4 == loaded.adapter.n_experts
    # One linear per expert and projection, expert-major, plus the shared expert's where there is one.
    paths = loaded.adapter.linear_paths(first)
    assert "mlp.experts.3.down_proj" in paths and "mlp.experts.0.gate_proj" in paths
    assert any(".shared_expert" in path for path in paths) == (model_type in ("qwen2_moe", "qwen3_next",
                                                                               "deepseek_v3"))
    with torch.no_grad():
        after = model(input_ids=ids).logits
    torch.testing.assert_close(after, before, atol=1e-5, rtol=1e-5)

    # Saved with transformers' own fused module (its checkpoint names), read back by plain transformers.
    with fused_experts(model, loaded.adapter):
        assert not isinstance(model.get_submodule(f"{loaded.adapter.blocks}.{first}.{loaded.adapter.experts}"),
                              SplitExperts)
        model.save_pretrained(tmp_path)
    assert isinstance(model.get_submodule(f"{loaded.adapter.blocks}.{first}.{loaded.adapter.experts}"), SplitExperts)
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path, dtype=torch.float32).eval()
    with torch.no_grad():
        torch.testing.assert_close(reloaded(input_ids=ids).logits, before, atol=1e-5, rtol=1e-5)


def test_moe_with_dense_blocks():
    """Qwen's dense blocks among MoE ones (`mlp_only_layers`, `decoder_sparse_step`) hold a plain MLP:
    the table and the block itself agree on which."""
    for overrides, dense in (({"mlp_only_layers": [1]}, (1,)), ({"decoder_sparse_step": 2}, (0, 2))):
        model = tiny_model("qwen2_moe", **overrides)
        adapter = wrap_model(model, tokenizer=None).adapter
        assert adapter.dense_blocks == dense
        for index, block in enumerate(blocks_of(model, adapter)):
            assert block_layout(block, adapter)[1] == adapter.linears_of(index)
            assert ("mlp.down_proj" in adapter.linear_paths(index)) == (index in dense)


def test_folded_multipliers_change_nothing_the_model_computes(tmp_path):
    """Falcon-H1's multipliers go into the weights on load: same logits, a config whose multipliers
    are 1, and a saved checkpoint plain transformers runs to the same logits."""
    model = tiny_model("falcon_h1")
    ids = torch.randint(3, VOCAB, (2, 16))
    with torch.no_grad():
        before = model(input_ids=ids).logits
    layer = model.model.layers[0]
    unfolded = layer.self_attn.k_proj.weight.detach().clone()
    loaded = wrap_model(model, tokenizer=None)
    torch.testing.assert_close(layer.self_attn.k_proj.weight, unfolded * 0.7 * 0.9)
    assert model.config.ssm_multipliers == [1.0] * 5 and model.config.embedding_multiplier == 1.0
    with torch.no_grad():
        torch.testing.assert_close(model(input_ids=ids).logits, before, atol=1e-5, rtol=1e-5)
    wrap_model(model, tokenizer=None)  # folding twice would scale twice
    with torch.no_grad():
        torch.testing.assert_close(model(input_ids=ids).logits, before, atol=1e-5, rtol=1e-5)
    loaded.model.save_pretrained(tmp_path)
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path, dtype=torch.float32).eval()
    with torch.no_grad():
        torch.testing.assert_close(reloaded(input_ids=ids).logits, before, atol=1e-5, rtol=1e-5)


def test_deepseek_without_query_latent_is_refused():
    model = tiny_model("deepseek_v3", q_lora_rank=None)
    with pytest.raises(LayerwiseError, match="q_lora_rank"):
        wrap_model(model, tokenizer=None)
