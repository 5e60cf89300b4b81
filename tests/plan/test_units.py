import pytest

from layerwise.errors import LayerwiseError
from layerwise.models.adapters import ADAPTERS, with_experts
from layerwise.plan.units import GRANULARITIES, units_of

EXPERTS = 4
# Units per block: one per block, two sublayers, four linear roles; with experts, the attention,
# the shared expert (qwen2_moe) and each routed expert.
UNITS_PER_BLOCK = {"block": 1, "sublayer": 2, "linear": 4, "expert": {"mixtral": 1 + EXPERTS, "qwen2_moe": 2 + EXPERTS}}


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
    assert len(units) == 3 * (per_block[architecture] if granularity == "expert" else per_block)


def test_engine_constraints_keep_fused_linears_together():
    units = {unit.name: unit.modules for unit in units_of(ADAPTERS["llama"], 1, "linear")}
    assert units["model.layers.0.attn_in"] == ("model.layers.0.self_attn.q_proj", "model.layers.0.self_attn.k_proj",
                                              "model.layers.0.self_attn.v_proj")
    assert units["model.layers.0.mlp_in"] == ("model.layers.0.mlp.gate_proj", "model.layers.0.mlp.up_proj")


def test_unknown_granularity():
    with pytest.raises(LayerwiseError, match="granularity"):
        units_of(ADAPTERS["llama"], 2, "head")
