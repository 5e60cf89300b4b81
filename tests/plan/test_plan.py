from __future__ import annotations

import json

import pytest

from layerwise import LayerwiseError
from layerwise.plan import Plan
from layerwise.quant import QuantConfig

LINEARS = [f"model.layers.{i}.{p}" for i in range(3) for p in ("self_attn.q_proj", "mlp.down_proj")]
OTHERS = ["model.embed_tokens", "lm_head"]


def test_uniform_applies_to_block_linears_only():
    targets = Plan.uniform(bits=4, group_size=64).resolve(LINEARS, OTHERS)
    assert set(targets) == set(LINEARS)
    assert all(config == QuantConfig("int", 4, 64) for config in targets.values())


def test_overrides_later_rules_win_and_none_keeps_float():
    plan = (Plan.uniform(bits=4, group_size=64)
            .override("re:model.layers.(1|2).*", bits=3)
            .override("model.layers.2.mlp.down_proj", QuantConfig("nf4", group_size=64))
            .override("model.layers.0.self_attn.q_proj", None)
            .override("lm_head", QuantConfig("int", 8, None)))
    targets = plan.resolve(LINEARS, OTHERS)
    assert "model.layers.0.self_attn.q_proj" not in targets
    assert targets["model.layers.1.self_attn.q_proj"].bits == 3
    assert targets["model.layers.2.mlp.down_proj"].format == "nf4"
    assert targets["model.layers.0.mlp.down_proj"].bits == 4
    assert targets["lm_head"].bits == 8 and "model.embed_tokens" not in targets


def test_save_load_round_trip(tmp_path):
    plan = Plan.uniform(bits=3, group_size=64, algorithm="gptq").override("re:.*down_proj", bits=4)
    plan.save(tmp_path / "plan.json")
    loaded = Plan.load(tmp_path / "plan.json")
    assert loaded == plan
    data = json.loads((tmp_path / "plan.json").read_text())
    assert data["schema"] == "layerwise.plan" and data["schema_version"] == 1


def test_validation_errors(tmp_path):
    with pytest.raises(LayerwiseError, match="matches no quantizable module"):
        Plan.uniform().override("model.layers.9.mlp.down_proj", bits=3).resolve(LINEARS, OTHERS)
    with pytest.raises(LayerwiseError, match="not a valid regular expression"):
        Plan.uniform().override("re:model.layers.(", bits=3)
    (tmp_path / "bad.json").write_text(json.dumps({"schema": "layerwise.plan", "schema_version": 1,
                                                   "default": {"format": "int", "bits": 12}}))
    with pytest.raises(LayerwiseError, match="bits=12 is outside"):
        Plan.load(tmp_path / "bad.json")
    (tmp_path / "future.json").write_text(json.dumps({"schema": "layerwise.plan", "schema_version": 99}))
    with pytest.raises(LayerwiseError, match="schema version 99"):
        Plan.load(tmp_path / "future.json")
    (tmp_path / "typo.json").write_text(json.dumps({"schema": "layerwise.plan", "schema_version": 1,
                                                    "default": {"format": "int", "bitz": 3}}))
    with pytest.raises(LayerwiseError, match="unknown quantizer field"):
        Plan.load(tmp_path / "typo.json")
