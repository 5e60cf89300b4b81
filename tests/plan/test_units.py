import pytest

from layerwise.errors import LayerwiseError
from layerwise.models.adapters import ADAPTERS, with_experts
from layerwise.plan.units import GRANULARITIES, units_of

EXPERTS = 4
# Units per block: one per block, two sublayers, four linear roles; with experts, the attention,
# the shared expert (qwen2_moe) and each routed expert; per tensor, each linear path of a block
# (routed experts merged per projection, as GGUF stores them).
UNITS_PER_BLOCK = {"block": 1, "sublayer": 2, "linear": 4, "expert": {"mixtral": 1 + EXPERTS, "qwen2_moe": 2 + EXPERTS},
                   "tensor": {"llama": 7, "gpt2": 4, "opt": 6, "phi3": 4, "mixtral": 4 + 3, "qwen2_moe": 4 + 3 + 3}}


@pytest.mark.parametrize("architecture", ["llama", "gpt2", "opt", "phi3", "mixtral", "qwen2_moe"])
@pytest.mark.parametrize("granularity", GRANULARITIES)
def test_units_cover_every_linear_once(architecture, granularity):
    adapter = ADAPTERS[architecture]
    if adapter.experts:
        adapter = with_experts(adapter, EXPERTS)
    elif granularity == "expert":
        with pytest.raises(LayerwiseError, match="needs a mixture-of-experts model"):
            units_of(adapter, 3, granularity)
        return
    units = units_of(adapter, 3, granularity)
    modules = [name for unit in units for name in unit.modules]
    expected = [f"{adapter.blocks}.{i}.{path}" for i in range(3) for path in adapter.linear_paths()]
    assert sorted(modules) == sorted(expected)
    assert len(set(unit.name for unit in units)) == len(units)
    assert [unit.block for unit in units] == sorted(unit.block for unit in units)
    per_block = UNITS_PER_BLOCK[granularity]
    assert len(units) == 3 * (per_block[architecture] if isinstance(per_block, dict) else per_block)


def test_engine_constraints_keep_fused_linears_together():
    units = {unit.name: unit.modules for unit in units_of(ADAPTERS["llama"], 1, "linear")}
    assert units["model.layers.0.attn_in"] == ("model.layers.0.self_attn.q_proj", "model.layers.0.self_attn.k_proj",
                                              "model.layers.0.self_attn.v_proj")
    assert units["model.layers.0.mlp_in"] == ("model.layers.0.mlp.gate_proj", "model.layers.0.mlp.up_proj")


def test_tensor_units_free_each_linear_but_keep_routed_experts_merged():
    units = {unit.name: unit for unit in units_of(ADAPTERS["llama"], 1, "tensor")}
    assert units["model.layers.0.self_attn.v_proj"].modules == ("model.layers.0.self_attn.v_proj",)
    assert units["model.layers.0.self_attn.v_proj"].kind == "attn_in"
    moe = {unit.name: unit.modules for unit in units_of(with_experts(ADAPTERS["mixtral"], EXPERTS), 1, "tensor")}
    merged = [modules for name, modules in moe.items() if ".experts." in name]
    assert len(merged) == 3 and all(len(modules) == EXPERTS for modules in merged)


def test_unknown_granularity():
    with pytest.raises(LayerwiseError, match="granularity"):
        units_of(ADAPTERS["llama"], 2, "head")


def test_hybrid_blocks_take_their_own_mixers_linears():
    from types import SimpleNamespace

    from layerwise.models.adapters import get_adapter

    config = SimpleNamespace(model_type="lfm2", num_hidden_layers=3, layer_types=["conv", "full_attention", "conv"])
    adapter = get_adapter("lfm2", config)
    units = {unit.name: unit.modules for unit in units_of(adapter, 3, "sublayer")}
    assert units["model.layers.0.attn"] == ("model.layers.0.conv.in_proj", "model.layers.0.conv.out_proj")
    assert units["model.layers.1.attn"] == tuple(f"model.layers.1.self_attn.{p}_proj" for p in ("q", "k", "v", "out"))
    assert units["model.layers.2.mlp"] == tuple(f"model.layers.2.feed_forward.{w}" for w in ("w1", "w3", "w2"))
    with pytest.raises(LayerwiseError, match="layer types"):
        get_adapter("lfm2", SimpleNamespace(num_hidden_layers=2, layer_types=["conv", "mamba"]))
