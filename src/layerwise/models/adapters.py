"""The one table that says where each architecture keeps its blocks, sublayers and linears.

Adding an architecture is adding one row here and one test in tests/models/test_adapters.py;
no other module may branch on `model_type`.
"""
from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Callable, Mapping

from layerwise.errors import LayerwiseError

# Linear roles, in the order a block computes them. Later stages use them for constraints that
# real engines impose (q/k/v share a format; gate/up share a format).
LINEAR_ROLES = ("attn_in", "attn_out", "mlp_in", "mlp_out")


@dataclass(frozen=True)
class Mixer:
    """A token mixer a hybrid model's block holds in place of attention (a short convolution, a
    linear attention, ...): the module whose output is its residual update, and its linears under
    the attention roles."""

    delta: str
    linears: Mapping[str, tuple[str, ...]]


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
    # The MLP's output projection: its *input* is the MLP hidden activation (sparsity statistic);
    # None in mixture-of-experts blocks, where each expert sees only the tokens routed to it.
    mlp_down: str | None
    # Paths may hold "{e}", one path per routed expert once `get_adapter` knows the config.
    linears: Mapping[str, tuple[str, ...]]
    embed: str
    final_norm: str
    lm_head: str
    # Returns a reason when a particular config of this family breaks the layout's assumptions.
    unsupported_reason: Callable[[object], str | None] = field(default=lambda config: None, compare=False)
    # Mixture-of-experts blocks: the routed experts (split into one module per expert on load,
    # models/experts.py), the router (kept in float), and the config attribute that counts the
    # experts; `n_experts` is filled in from the config.
    experts: str | None = None
    router: str | None = None
    expert_count: str | None = None
    n_experts: int = 0
    # Hybrid models: the token mixer of each kind of block (the config's `layer_types` names each
    # block's kind); `attn_delta` and the attention roles of `linears` then come from the block's
    # mixer. `block_kinds` is filled in from the config.
    mixers: Mapping[str, Mixer] | None = None
    block_kinds: tuple[str, ...] = ()
    # Extra arguments for llama.cpp's convert_hf_to_gguf.py (GGUF export of a Hugging Face model).
    converter_args: tuple[str, ...] = ()

    def linears_of(self, index: int) -> Mapping[str, tuple[str, ...]]:
        """The linears of block `index` by role (the same for every block unless hybrid)."""
        if not self.mixers:
            return self.linears
        return {**self.linears, **self.mixers[self.block_kinds[index]].linears}

    def linear_paths(self, index: int = 0) -> list[str]:
        linears = self.linears_of(index)
        return [path for role in LINEAR_ROLES for path in linears.get(role, ())]


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


_MOE_LINEARS = {
    "attn_in": _LLAMA_LINEARS["attn_in"],
    "attn_out": _LLAMA_LINEARS["attn_out"],
    "mlp_in": ("mlp.experts.{e}.gate_proj", "mlp.experts.{e}.up_proj"),
    "mlp_out": ("mlp.experts.{e}.down_proj",),
}


def _mixed_moe_reason(config: object) -> str | None:
    if getattr(config, "mlp_only_layers", None) or getattr(config, "decoder_sparse_step", 1) != 1:
        return "models with dense MLP blocks among the mixture-of-experts blocks are not supported yet"
    return None


def _moe_layout(expert_count: str, shared: bool = False, **reasons) -> Adapter:
    linears = dict(_MOE_LINEARS)
    if shared:
        # The shared expert runs on every token (its sigmoid gate, a 1-wide linear, stays in float).
        linears["mlp_in"] = ("mlp.shared_expert.gate_proj", "mlp.shared_expert.up_proj") + linears["mlp_in"]
        linears["mlp_out"] = ("mlp.shared_expert.down_proj",) + linears["mlp_out"]
    return Adapter(
        blocks="model.layers", attn="self_attn", mlp="mlp",
        attn_delta="self_attn", mlp_delta="mlp", mlp_down=None,
        linears=linears, embed="model.embed_tokens", final_norm="model.norm", lm_head="lm_head",
        experts="mlp.experts", router="mlp.gate", expert_count=expert_count, **reasons,
    )


ADAPTERS.update({
    "mixtral": _moe_layout("num_local_experts"),
    "qwen2_moe": _moe_layout("num_experts", shared=True, unsupported_reason=_mixed_moe_reason),
    "qwen3_moe": _moe_layout("num_experts", unsupported_reason=_mixed_moe_reason),
    "olmoe": _moe_layout("num_experts"),
})

# gpt-oss: biased attention with sinks, routed experts with biases and a clamped gate (split
# alike), a router with a bias, named "router".
ADAPTERS["gpt_oss"] = replace(_moe_layout("num_local_experts"), router="mlp.router")

_ATTENTION = Mixer("self_attn", {"attn_in": _LLAMA_LINEARS["attn_in"], "attn_out": _LLAMA_LINEARS["attn_out"]})
_MLP_ROLES = ("mlp_in", "mlp_out")

# Hybrids: blocks of attention and of another token mixer, named by the config's layer_types.
ADAPTERS.update({
    # LFM2: short gated convolutions or attention, then a SwiGLU feed-forward; the final norm is
    # called embedding_norm.
    "lfm2": Adapter(
        blocks="model.layers", attn="self_attn", mlp="feed_forward",
        attn_delta="self_attn", mlp_delta="feed_forward", mlp_down="feed_forward.w2",
        linears={"mlp_in": ("feed_forward.w1", "feed_forward.w3"), "mlp_out": ("feed_forward.w2",)},
        embed="model.embed_tokens", final_norm="model.embedding_norm", lm_head="lm_head",
        mixers={"full_attention": Mixer("self_attn", {"attn_in": _LLAMA_LINEARS["attn_in"],
                                                      "attn_out": ("self_attn.out_proj",)}),
                "conv": Mixer("conv", {"attn_in": ("conv.in_proj",), "attn_out": ("conv.out_proj",)})},
    ),
    # Qwen3-Next: gated DeltaNet linear attention or gated attention, then routed experts and a
    # shared expert. Its multi-token-prediction head is not part of the transformers model, and
    # llama.cpp's converter insists on it unless told to leave it out.
    "qwen3_next": replace(
        ADAPTERS["qwen2_moe"],
        linears={role: paths for role, paths in ADAPTERS["qwen2_moe"].linears.items() if role in _MLP_ROLES},
        mixers={"full_attention": _ATTENTION,
                "linear_attention": Mixer("linear_attn", {"attn_in": ("linear_attn.in_proj_qkvz",
                                                                      "linear_attn.in_proj_ba"),
                                                          "attn_out": ("linear_attn.out_proj",)})},
        converter_args=("--no-mtp",),
    ),
})


def with_experts(adapter: Adapter, n_experts: int) -> Adapter:
    """The adapter with one linear path per routed expert where the table says "{e}"."""
    def expand(paths: tuple[str, ...]) -> tuple[str, ...]:
        # Paths outside the routed experts first, then expert-major (expert 0's gate and up, then
        # expert 1's ...), as the experts run.
        fixed = [path for path in paths if "{e}" not in path]
        return tuple(fixed + [path.format(e=e) for e in range(n_experts) for path in paths if "{e}" in path])

    return replace(adapter, linears={role: expand(paths) for role, paths in adapter.linears.items()},
                   n_experts=n_experts)


def expert_of(path: str) -> int:
    """The routed expert a linear's path belongs to, or -1 (attention, shared expert, dense MLP)."""
    marker = ".experts."
    if marker not in path:
        return -1
    return int(path.split(marker, 1)[1].split(".", 1)[0])


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
    if adapter.expert_count and config is not None:
        adapter = with_experts(adapter, int(getattr(config, adapter.expert_count)))
    if adapter.mixers and config is not None:
        kinds = tuple(getattr(config, "layer_types", None) or ())
        unknown = sorted(set(kinds) - set(adapter.mixers))
        if unknown or len(kinds) != config.num_hidden_layers:
            raise LayerwiseError(f"architecture {model_type!r}: layer types {unknown or kinds} are not supported; "
                                 f"known: {', '.join(adapter.mixers)}")
        adapter = replace(adapter, block_kinds=kinds)
    return adapter
