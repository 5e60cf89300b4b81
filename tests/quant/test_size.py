"""A plan's predicted size (from configs and shapes) is the size of what quantizing stores."""
from __future__ import annotations

import copy

import pytest

from conftest import CALIBRATION_TEXT
from layerwise import token_windows
from layerwise.apply.quantize import plan_targets
from layerwise.models.layout import linear_weight
from layerwise.plan import Plan
from layerwise.apply import quantize_
from layerwise.quant import QuantConfig
from layerwise.quant.qtensor import storage_bits
from layerwise.quant.size import size_report

# Group sizes that fit stories260K's 64- and 172-column rows: per row, g4, or a tail.
CONFIGS = [
    QuantConfig("int", 4, None, algorithm="awq"),
    QuantConfig("int", 3, 32, symmetric=False, algorithm="awq", remainder="tail"),
    QuantConfig("int", 4, None),
    QuantConfig("int", 3, 4, symmetric=False),
    QuantConfig("int", 3, 32, algorithm="gptq", remainder="tail"),
    QuantConfig("nf4", group_size=4, algorithm="gptq"),
]


@pytest.fixture(scope="module")
def calibration(stories):
    return token_windows(stories.tokenizer, CALIBRATION_TEXT, tokens=1024, seq_len=256, seed=0)


@pytest.mark.parametrize("config", CONFIGS, ids=lambda c: c.label)
def test_predicted_size_equals_the_quantized_size(stories, calibration, config):
    # Two real linears, 64 and 172 input columns (the whole model is slow with AWQ on a CPU).
    plan = Plan(None).override("re:model.layers.1.(self_attn.q_proj|mlp.down_proj)", config)
    targets = plan_targets(stories, plan)
    predicted = size_report(stories, targets)
    stored = quantize_(copy.deepcopy(stories), plan, calibration, progress=False)
    assert len(stored) == 2 and size_report(stories, stored) == predicted
    for name, q in stored.items():
        shape = tuple(linear_weight(stories.model.get_submodule(name)).shape)
        assert q.n_bits == storage_bits(targets[name], shape), name
        # AWQ's fp16 per-input-column scales are counted on both sides.
        assert (q.channel_scale is not None) == (config.algorithm == "awq")
        assert q.n_bits - storage_bits(config.replace(algorithm="rtn"), shape) == \
            (16 * shape[1] if config.algorithm == "awq" else 0)
