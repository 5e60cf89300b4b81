"""Per-window values behind `evaluate`'s numbers, and their intervals, on stories260K."""
import math

import numpy as np
import pytest
import torch

from conftest import EVALUATION_TEXT
from layerwise import token_windows
from layerwise.engine.divergence import Reference, kl_per_token
from layerwise.evaluate import base_outputs, evaluate


@torch.no_grad()
def test_window_values_add_up_to_the_reported_numbers(stories):
    windows = token_windows(stories.tokenizer, EVALUATION_TEXT, tokens=2048, seq_len=256, seed=None)
    base = base_outputs(stories, windows, progress=False)
    one_window = windows.input_ids[3:4]
    base_logits = stories.model(input_ids=windows.input_ids, use_cache=False).logits[:, :-1]
    reference = Reference.from_logits(stories.model(input_ids=one_window, use_cache=False).logits[:, :-1])
    weight = stories.model.model.layers[1].mlp.down_proj.weight
    original = weight.detach().clone()
    weight.data.add_(0.02 * torch.randn_like(weight))
    try:
        quality = evaluate(stories, base, progress=False)
        # Independently: the KL of one window by a plain forward pass, and of every token.
        direct = kl_per_token(reference, stories.model(input_ids=one_window, use_cache=False).logits[:, :-1])
        every = kl_per_token(Reference.from_logits(base_logits), stories.model(input_ids=windows.input_ids,
                                                                              use_cache=False).logits[:, :-1])
    finally:
        weight.data.copy_(original)
    assert len(quality.window_kl) == 8 and quality.window_tokens == (255,) * 8
    assert quality.window_kl[3] == pytest.approx(direct.mean().item(), rel=2e-3)
    assert quality.kl == pytest.approx(np.mean(quality.window_kl))
    assert quality.perplexity == pytest.approx(math.exp(sum(quality.window_nll) / (8 * 255)))
    low, high = quality.kl_ci
    assert low < quality.kl < high
    low, high = quality.perplexity_ci
    assert low < quality.perplexity < high
    assert quality.to_dict()["kl_ci"] == quality.kl_ci
    # the tail of the per-token KL, as llama-perplexity reports it
    assert quality.kl_p99 == pytest.approx(np.percentile(every.flatten().numpy(), 99.0), rel=5e-3)
    assert quality.kl_p999 == pytest.approx(np.percentile(every.flatten().numpy(), 99.9), rel=5e-3)
    assert quality.kl < quality.kl_p99 < quality.kl_p999


@torch.no_grad()
def test_base_outputs_applied_a_chunk_at_a_time_equal_a_plain_forward(stories, monkeypatch):
    """The head is applied a few positions at a time (here 100, so windows span several chunks)."""
    from layerwise.engine import replay as module

    monkeypatch.setattr(module, "HEAD_CHUNK_ELEMENTS", 100 * stories.model.config.vocab_size)
    windows = token_windows(stories.tokenizer, EVALUATION_TEXT, tokens=1024, seq_len=256, seed=None)
    base = base_outputs(stories, windows, batch_size=2, progress=False)
    logits = stories.model(input_ids=windows.input_ids[2:4], use_cache=False).logits[:, :-1]
    direct = Reference.from_logits(logits, store=torch.float16)
    kept = base.references[1]
    assert torch.allclose(kept.probs.float(), direct.probs.float(), atol=1e-6)
    assert torch.allclose(kept.neg_entropy, direct.neg_entropy, rtol=1e-6)
    assert torch.equal(kept.top1, direct.top1)
    nll = -torch.log_softmax(logits.float(), dim=-1).gather(-1, windows.input_ids[2:4, 1:, None]).double().sum(dim=(1, 2))
    assert base.quality.window_nll[2:4] == pytest.approx(nll.tolist(), rel=1e-9)
