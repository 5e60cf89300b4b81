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
    # it (GPT-NeoX); zeroing their output removes the sublayer and nothing else. "a+b": the update
    # is the sum of the outputs of a and b (Falcon-H1 runs attention and a state-space mixer side
    # by side).
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
    # A per-expert router buffer added to the routing scores (DeepSeek's load-balancing bias): an
    # expert is masked by setting its entry to -inf where the router's rows cannot be sliced
    # (grouped routing views the experts as groups of a fixed size).
    router_mask: str | None = None
    # MoE families whose blocks are not all MoE: the MLP linears of the dense blocks, and which
    # blocks are dense for a config (filled in as `dense_blocks`).
    dense_linears: Mapping[str, tuple[str, ...]] | None = None
    dense_blocks_of: Callable[[object], tuple[int, ...]] = field(default=lambda config: (), compare=False)
    dense_blocks: tuple[int, ...] = ()
    # Hybrid models: the token mixer of each kind of block (the config's `layer_types` names each
    # block's kind); `attn_delta` and the attention roles of `linears` then come from the block's
    # mixer. `block_kinds` is filled in from the config.
    mixers: Mapping[str, Mixer] | None = None
    block_kinds: tuple[str, ...] = ()
    # Extra arguments for llama.cpp's convert_hf_to_gguf.py (GGUF export of a Hugging Face model),
    # and the linears it splits by rows into several GGUF tensors (path in the block -> their names
    # in "blk.N.", which gguf-py's name map does not give).
    converter_args: tuple[str, ...] = ()
    gguf_splits: Mapping[str, tuple[str, ...]] = field(default_factory=dict)
    # Constant multipliers folded into the weights on load (`models/multipliers.py` FOLDS).
    fold: str | None = None

    def linears_of(self, index: int) -> Mapping[str, tuple[str, ...]]:
        """The linears of block `index` by role (the same for every block unless hybrid, or an
        MoE model with some dense blocks)."""
        linears = self.linears
        if index in self.dense_blocks:
            linears = {**linears, **self.dense_linears}
        if self.mixers:
            linears = {**linears, **self.mixers[self.block_kinds[index]].linears}
        return linears

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


def _qwen_dense_blocks(config: object) -> tuple[int, ...]:
    """Qwen's MoE families put a dense MLP in the blocks `mlp_only_layers` names and in those the
    sparse step skips (transformers' Qwen2MoeDecoderLayer)."""
    step = getattr(config, "decoder_sparse_step", 1) or 1
    only = set(getattr(config, "mlp_only_layers", None) or ())
    return tuple(i for i in range(config.num_hidden_layers)
                 if i in only or not (getattr(config, "num_experts", 0) > 0 and (i + 1) % step == 0))


def _moe_layout(expert_count: str, shared: str | None = None, **fields) -> Adapter:
    linears = dict(_MOE_LINEARS)
    if shared:
        # The shared expert runs on every token (Qwen's sigmoid gate for it, a 1-wide linear, stays
        # in float).
        linears["mlp_in"] = (f"{shared}.gate_proj", f"{shared}.up_proj") + linears["mlp_in"]
        linears["mlp_out"] = (f"{shared}.down_proj",) + linears["mlp_out"]
    return Adapter(**{
        **dict(blocks="model.layers", attn="self_attn", mlp="mlp",
               attn_delta="self_attn", mlp_delta="mlp", mlp_down=None,
               linears=linears, embed="model.embed_tokens", final_norm="model.norm", lm_head="lm_head",
               experts="mlp.experts", router="mlp.gate", expert_count=expert_count,
               dense_linears={role: _LLAMA_LINEARS[role] for role in ("mlp_in", "mlp_out")}),
        **fields})


def _deepseek_reason(config: object) -> str | None:
    if getattr(config, "q_lora_rank", None) is None:
        return "DeepSeek variants without a low-rank query projection (q_lora_rank null) are not supported yet"
    return None


ADAPTERS.update({
    "mixtral": _moe_layout("num_local_experts"),
    "qwen2_moe": _moe_layout("num_experts", shared="mlp.shared_expert", dense_blocks_of=_qwen_dense_blocks),
    "qwen3_moe": _moe_layout("num_experts", dense_blocks_of=_qwen_dense_blocks),
    "olmoe": _moe_layout("num_experts"),
    # DeepSeek-V3 (and Kimi K2 etc.): multi-head latent attention (low-rank query and key/value
    # projections), dense MLPs in the first `first_k_dense_replace` blocks, then routed experts
    # chosen by grouped sigmoid scores plus shared experts. `kv_b_proj` (the key/value expansion,
    # ~0.2% of the weights) is not planned: llama.cpp stores it split, the key half transposed per
    # head, so no row-wise code of ours could be placed in a GGUF; it stays in float everywhere.
    "deepseek_v3": _moe_layout(
        "n_routed_experts", shared="mlp.shared_experts", router_mask="e_score_correction_bias",
        dense_blocks_of=lambda config: tuple(range(min(config.first_k_dense_replace or 0, config.num_hidden_layers))),
        unsupported_reason=_deepseek_reason),
})
ADAPTERS["deepseek_v3"] = replace(ADAPTERS["deepseek_v3"], linears={
    **ADAPTERS["deepseek_v3"].linears,
    "attn_in": ("self_attn.q_a_proj", "self_attn.q_b_proj", "self_attn.kv_a_proj_with_mqa"),
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
        gguf_splits={"linear_attn.in_proj_qkvz": ("attn_qkv", "attn_gate")},
    ),
})


def _falcon_h1_reason(config: object) -> str | None:
    if getattr(config, "tie_word_embeddings", False) and config.embedding_multiplier != config.lm_head_multiplier:
        return "tied embeddings with different embedding and head multipliers are not supported"
    return None


# Falcon-H1: every block runs attention and a Mamba-2 mixer side by side on the same normed input
# (their outputs summed: one token-mixing sublayer), then a SwiGLU feed-forward. Its muP
# multipliers are folded into the weights on load, as llama.cpp's converter folds them.
ADAPTERS["falcon_h1"] = Adapter(
    blocks="model.layers", attn="self_attn", mlp="feed_forward",
    attn_delta="mamba+self_attn", mlp_delta="feed_forward", mlp_down="feed_forward.down_proj",
    linears={"attn_in": _LLAMA_LINEARS["attn_in"] + ("mamba.in_proj",),
             "attn_out": _LLAMA_LINEARS["attn_out"] + ("mamba.out_proj",),
             "mlp_in": ("feed_forward.gate_proj", "feed_forward.up_proj"), "mlp_out": ("feed_forward.down_proj",)},
    embed="model.embed_tokens", final_norm="model.final_layernorm", lm_head="lm_head",
    fold="falcon_h1", unsupported_reason=_falcon_h1_reason,
)


def with_experts(adapter: Adapter, n_experts: int) -> Adapter:
    """The adapter with one linear path per routed expert where the table says "{e}"."""
    def expand(paths: tuple[str, ...]) -> tuple[str, ...]:
        # Paths outside the routed experts first, then expert-major (expert 0's gate and up, then
        # expert 1's ...), as the experts run.
        fixed = [path for path in paths if "{e}" not in path]
        return tuple(fixed + [path.format(e=e) for e in range(n_experts) for path in paths if "{e}" in path])

    return replace(adapter, linears={role: expand(paths) for role, paths in adapter.linears.items()},
                   n_experts=n_experts)


def merged_expert_path(path: str) -> str:
    """A routed expert's linear named as its block's merged tensor holds it ("mlp.experts.gate_proj"
    for "mlp.experts.3.gate_proj"); any other path unchanged."""
    expert = expert_of(path)
    return path if expert < 0 else path.replace(f".experts.{expert}.", ".experts.")


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
        adapter = replace(adapter, dense_blocks=tuple(adapter.dense_blocks_of(config)))
    if adapter.mixers and config is not None:
        kinds = tuple(getattr(config, "layer_types", None) or ())
        unknown = sorted(set(kinds) - set(adapter.mixers))
        if unknown or len(kinds) != config.num_hidden_layers:
            raise LayerwiseError(f"architecture {model_type!r}: layer types {unknown or kinds} are not supported; "
                                 f"known: {', '.join(adapter.mixers)}")
        adapter = replace(adapter, block_kinds=kinds)
    return adapter
