"""The one table that says where each architecture keeps its blocks, sublayers and linears.

Adding an architecture is adding one row here and one test in tests/models/test_adapters.py;
no other module may branch on `model_type`.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Mapping

from layerwise.errors import LayerwiseError

# Linear roles, in the order a block computes them. Later stages use them for constraints that
# real engines impose (q/k/v share a format; gate/up share a format).
LINEAR_ROLES = ("attn_in", "attn_out", "mlp_in", "mlp_out")


@dataclass(frozen=True)
class Adapter:
    """Module paths of one architecture family (paths inside a block are relative to it)."""

    blocks: str
    attn: str
    # None where the MLP is not a module of its own (OPT keeps fc1/fc2 directly in the block).
    mlp: str | None
    # Modules whose *output* is exactly what the sublayer adds to the residual stream. They differ
    # from `attn`/`mlp` where a norm sits after the sublayer (Gemma 2/3) or a dropout module wraps
    # it (GPT-NeoX); zeroing their output removes the sublayer and nothing else.
    attn_delta: str
    mlp_delta: str
    # The MLP's output projection: its *input* is the MLP hidden activation (sparsity statistic).
    mlp_down: str
    linears: Mapping[str, tuple[str, ...]]
    embed: str
    final_norm: str
    lm_head: str
    # Returns a reason when a particular config of this family breaks the layout's assumptions.
    unsupported_reason: Callable[[object], str | None] = field(default=lambda config: None, compare=False)

    def linear_paths(self) -> list[str]:
        return [path for role in LINEAR_ROLES for path in self.linears.get(role, ())]


def _opt_reason(config: object) -> str | None:
    if not getattr(config, "do_layer_norm_before", True):
        return "OPT variants with post-layer-norm blocks (opt-350m) are not supported"
    if getattr(config, "word_embed_proj_dim", None) not in (None, getattr(config, "hidden_size", None)):
        return "OPT variants with a projected embedding (word_embed_proj_dim != hidden_size) are not supported"
    return None


_LLAMA_LINEARS = {
    "attn_in": ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"),
    "attn_out": ("self_attn.o_proj",),
    "mlp_in": ("mlp.gate_proj", "mlp.up_proj"),
    "mlp_out": ("mlp.down_proj",),
}

LLAMA_LAYOUT = Adapter(
    blocks="model.layers", attn="self_attn", mlp="mlp",
    attn_delta="self_attn", mlp_delta="mlp", mlp_down="mlp.down_proj",
    linears=_LLAMA_LINEARS, embed="model.embed_tokens", final_norm="model.norm", lm_head="lm_head",
)

# Gemma 2 and 3 normalise each sublayer's output before adding it to the residual stream.
GEMMA2_LAYOUT = Adapter(
    blocks="model.layers", attn="self_attn", mlp="mlp",
    attn_delta="post_attention_layernorm", mlp_delta="post_feedforward_layernorm", mlp_down="mlp.down_proj",
    linears=_LLAMA_LINEARS, embed="model.embed_tokens", final_norm="model.norm", lm_head="lm_head",
)

ADAPTERS: dict[str, Adapter] = {
    "llama": LLAMA_LAYOUT,
    "mistral": LLAMA_LAYOUT,
    "qwen2": LLAMA_LAYOUT,
    "qwen3": LLAMA_LAYOUT,
    "gemma": LLAMA_LAYOUT,
    "gemma2": GEMMA2_LAYOUT,
    "gemma3_text": GEMMA2_LAYOUT,
    "phi3": Adapter(
        blocks="model.layers", attn="self_attn", mlp="mlp",
        attn_delta="resid_attn_dropout", mlp_delta="resid_mlp_dropout", mlp_down="mlp.down_proj",
        linears={
            "attn_in": ("self_attn.qkv_proj",),
            "attn_out": ("self_attn.o_proj",),
            "mlp_in": ("mlp.gate_up_proj",),
            "mlp_out": ("mlp.down_proj",),
        },
        embed="model.embed_tokens", final_norm="model.norm", lm_head="lm_head",
    ),
    "gpt2": Adapter(
        blocks="transformer.h", attn="attn", mlp="mlp",
        attn_delta="attn", mlp_delta="mlp", mlp_down="mlp.c_proj",
        linears={
            "attn_in": ("attn.c_attn",),
            "attn_out": ("attn.c_proj",),
            "mlp_in": ("mlp.c_fc",),
            "mlp_out": ("mlp.c_proj",),
        },
        embed="transformer.wte", final_norm="transformer.ln_f", lm_head="lm_head",
    ),
    "gpt_neox": Adapter(
        blocks="gpt_neox.layers", attn="attention", mlp="mlp",
        attn_delta="post_attention_dropout", mlp_delta="post_mlp_dropout", mlp_down="mlp.dense_4h_to_h",
        linears={
            "attn_in": ("attention.query_key_value",),
            "attn_out": ("attention.dense",),
            "mlp_in": ("mlp.dense_h_to_4h",),
            "mlp_out": ("mlp.dense_4h_to_h",),
        },
        embed="gpt_neox.embed_in", final_norm="gpt_neox.final_layer_norm", lm_head="lm_head",
    ),
    "opt": Adapter(
        blocks="model.decoder.layers", attn="self_attn", mlp=None,
        attn_delta="self_attn", mlp_delta="fc2", mlp_down="fc2",
        linears={
            "attn_in": ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"),
            "attn_out": ("self_attn.out_proj",),
            "mlp_in": ("fc1",),
            "mlp_out": ("fc2",),
        },
        embed="model.decoder.embed_tokens", final_norm="model.decoder.final_layer_norm", lm_head="lm_head",
        unsupported_reason=_opt_reason,
    ),
}


def supported_architectures() -> list[str]:
    return sorted(ADAPTERS)


def get_adapter(model_type: str, config: object | None = None) -> Adapter:
    """The adapter for a `config.model_type`; a clear error for anything not in the table."""
    adapter = ADAPTERS.get(model_type)
    if adapter is None:
        raise LayerwiseError(
            f"unknown architecture {model_type!r}; supported: {', '.join(supported_architectures())}"
        )
    reason = adapter.unsupported_reason(config) if config is not None else None
    if reason:
        raise LayerwiseError(f"architecture {model_type!r}: {reason}")
    return adapter
