"""Each statistic against a value known in closed form, on synthetic tensors."""
from __future__ import annotations

import math

import pytest
import torch

from layerwise import LayerwiseError
from layerwise.engine.hooks import BlockCall
from layerwise.profile import METRICS, WEIGHT_METRICS, resolve_metric
from layerwise.profile.metrics import combine


def call_with(h_in, h_out, attn=None, mlp=None, hidden=None) -> BlockCall:
    attn = torch.zeros_like(h_in) if attn is None else attn
    mlp = h_out - h_in - attn if mlp is None else mlp
    hidden = torch.ones(*h_in.shape[:-1], 8) if hidden is None else hidden
    return BlockCall(0, h_in=h_in, h_out=h_out, attn_delta=attn, mlp_delta=mlp, mlp_hidden=hidden)


def finalized(name: str, *calls: BlockCall) -> float:
    partials = {}
    for call in calls:
        combine(partials, METRICS[name].compute(call))
    return METRICS[name].finalize(partials)


def test_identity_block_scores_zero():
    h = torch.randn(2, 16, 32)
    call = call_with(h, h.clone())
    assert finalized("lim", call) == pytest.approx(0.0, abs=1e-6)
    assert finalized("rel_update", call) == pytest.approx(0.0, abs=1e-6)
    assert finalized("angular_distance", call) == pytest.approx(0.0, abs=2e-3)


def test_orthogonal_update_scores_known_values():
    h_in = torch.zeros(1, 4, 2)
    h_in[..., 0] = 1.0
    h_out = torch.zeros(1, 4, 2)
    h_out[..., 1] = 2.0  # orthogonal: cos = 0, so LIM = 1 and angular distance = 1/2
    call = call_with(h_in, h_out, attn=torch.zeros(1, 4, 2))
    assert finalized("lim", call) == pytest.approx(1.0)
    assert finalized("angular_distance", call) == pytest.approx(0.5)
    assert finalized("rel_update", call) == pytest.approx(math.sqrt(5))
    assert finalized("mlp_rel_update", call) == pytest.approx(math.sqrt(5))
    assert finalized("attn_rel_update", call) == pytest.approx(0.0)
    assert finalized("hidden_norm", call) == pytest.approx(2.0)


def test_tokens_with_a_zero_input_are_left_out_of_relative_updates():
    h_in = torch.randn(1, 5, 8)
    h_out = h_in * 2
    h_in[0, 2] = 0.0  # a zero embedding row (a padding token's): no relative update to speak of
    h_out[0, 2] = 1.0
    call = call_with(h_in, h_out)
    for name in ("rel_update", "mlp_rel_update"):
        assert finalized(name, call) == pytest.approx(1.0), name  # the other four tokens doubled


def test_running_statistics_equal_one_pass_statistics():
    torch.manual_seed(1)
    a, b = torch.randn(2, 64, 32), torch.randn(2, 64, 32) * 3 + 1
    pooled = torch.cat([a, b])
    for name in ("lim", "hidden_norm", "act_kurtosis"):
        split = finalized(name, call_with(a * 0.5, a), call_with(b * 0.5, b))
        whole = finalized(name, call_with(pooled * 0.5, pooled))
        assert split == pytest.approx(whole, rel=1e-6), name


def test_gaussian_kurtosis_and_zd():
    torch.manual_seed(2)
    x = torch.randn(4, 256, 256)
    assert finalized("act_kurtosis", call_with(x, x)) == pytest.approx(3.0, abs=0.05)
    weight = torch.randn(512, 512)
    assert WEIGHT_METRICS["zd"].compute(weight) == pytest.approx(0.3173, abs=0.005)
    assert WEIGHT_METRICS["weight_kurtosis"].compute(weight) == pytest.approx(3.0, abs=0.05)


def test_massive_activations_and_max_over_median():
    h = torch.ones(1, 10, 100)
    h[0, 0, 5] = 5000.0  # one massive entry: > 100 and > 1000 x median
    h[0, 3, 7] = 500.0  # large, but below 1000 x median
    call = call_with(h, h)
    assert finalized("massive_activations", call) == 1
    assert finalized("max_over_median", call) == pytest.approx(5000.0)
    assert finalized("max_over_median", call, call_with(h * 2, h * 2)) == pytest.approx(10000.0 / 1.5)


def test_mlp_sparsity_counts_near_zero_activations():
    hidden = torch.tensor([[[10.0, 0.0, 0.05, 5.0]]])  # 0.0 and 0.05 are <= 1% of 10
    h = torch.randn(1, 1, 4)
    assert finalized("mlp_sparsity", call_with(h, h, hidden=hidden)) == pytest.approx(0.5)


def test_effective_rank_of_known_spectra():
    assert WEIGHT_METRICS["effective_rank"].compute(torch.eye(16)) == pytest.approx(16.0, rel=1e-5)
    rank_one = torch.outer(torch.randn(20), torch.randn(10))
    assert WEIGHT_METRICS["effective_rank"].compute(rank_one) == pytest.approx(1.0, abs=1e-3)


def test_metric_names_and_aliases():
    assert resolve_metric("bi") == "lim"
    assert resolve_metric("block_influence") == "lim"
    with pytest.raises(LayerwiseError, match="unknown metric 'nope'; known: .*lim"):
        resolve_metric("nope")
