"""KL against a stored base: exact for float32, and accurate for float16 storage."""
from __future__ import annotations

import pytest
import torch

from layerwise.engine.divergence import Reference, kl_per_token, top1_agreement


def direct_kl(base_logits, other_logits):
    p = torch.log_softmax(base_logits.double(), -1)
    q = torch.log_softmax(other_logits.double(), -1)
    return (p.exp() * (p - q)).sum(-1)


@pytest.mark.parametrize("store", [torch.float32, torch.float16])
def test_kl_matches_the_definition(store):
    torch.manual_seed(0)
    base = torch.randn(4, 64, 49152) * 3 + 12  # raw logits far from normalised, as real models give
    for noise in (1e-3, 1e-2, 1.0):
        other = base + noise * torch.randn_like(base)
        expected = direct_kl(base, other)
        got = kl_per_token(Reference.from_logits(base, store=store), other).double()
        # float16 probabilities change KL by a relative ~1e-3, never by an absolute offset.
        # Below ~1e-6 nats float32 log-probabilities themselves run out of precision.
        assert got.mean().item() == pytest.approx(expected.mean().item(), rel=2e-2 if store == torch.float16 else 1e-3, abs=2e-6)


@pytest.mark.parametrize("store", [torch.float32, torch.float16])
def test_kl_of_a_model_with_itself_is_zero(store):
    logits = torch.randn(2, 32, 49152) * 4 + 20
    kl = kl_per_token(Reference.from_logits(logits, store=store), logits)
    assert kl.abs().max().item() < 2e-5
    assert top1_agreement(Reference.from_logits(logits), logits).mean().item() == 1.0
