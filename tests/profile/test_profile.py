"""The profiler on real, trained models: checked against independent computations."""
from __future__ import annotations

import copy
import json

import pytest
import torch

from conftest import CALIBRATION_TEXT, STORIES
from layerwise import ProfileResult, load_model, token_windows
from layerwise.evaluate import Reference, kl_per_token
from layerwise.models.layout import blocks_of
from layerwise.profile import METRICS, WEIGHT_METRICS, profile_model, run_profile


def lim_from_hidden_states(loaded, windows) -> list[float]:
    """1 - cos(h_in, h_out) per block from output_hidden_states, without any layerwise hooks.

    transformers' last hidden state is taken after the final norm, so for the last block the
    model is run once more with that norm replaced by the identity."""
    model = loaded.model
    unnormed = copy.deepcopy(model)
    unnormed.get_submodule(loaded.adapter.final_norm).forward = lambda x: x
    sums = torch.zeros(loaded.n_blocks, dtype=torch.float64)
    count = 0
    with torch.no_grad():
        for batch in windows.batches(2):
            states = model(input_ids=batch, output_hidden_states=True, use_cache=False).hidden_states
            last = unnormed(input_ids=batch, output_hidden_states=True, use_cache=False).hidden_states[-1]
            outputs = list(states[1:-1]) + [last]
            for index in range(loaded.n_blocks):
                cos = torch.nn.functional.cosine_similarity(states[index], outputs[index], dim=-1)
                sums[index] += (1 - cos).double().sum()
            count += batch.numel()
    return (sums / count).tolist()


def kl_without_block(loaded, windows, block: int) -> float:
    """KL(model || model with block `block` actually deleted from its layer list)."""
    pruned = copy.deepcopy(loaded.model)
    blocks = blocks_of(pruned, loaded.adapter)
    del blocks[block]
    pruned.config.num_hidden_layers -= 1
    total, count = 0.0, 0
    with torch.no_grad():
        for batch in windows.batches(2):
            base = Reference.from_logits(loaded.model(input_ids=batch, use_cache=False).logits)
            kl = kl_per_token(base, pruned(input_ids=batch, use_cache=False).logits)
            total += kl.double().sum().item()
            count += kl.numel()
    return total / count


@pytest.fixture(scope="module")
def stories_windows(stories):
    return token_windows(stories.tokenizer, CALIBRATION_TEXT, tokens=2048, seq_len=256, seed=0)


@pytest.fixture(scope="module")
def stories_profile(stories, stories_windows):
    return profile_model(stories, stories_windows, ablation=True, progress=False)


def test_every_statistic_for_every_block(stories_profile):
    assert len(stories_profile.blocks) == 5
    expected = set(METRICS) | {"block", "logit_lens_kl", "logit_lens_top1", "zd",
                               "ablation_kl_block", "ablation_kl_attn", "ablation_kl_mlp"}
    assert set(stories_profile.blocks[0]) == expected
    assert len(stories_profile.linears) == 5 * 7
    assert set(WEIGHT_METRICS) <= set(stories_profile.linears[0])
    assert set(stories_profile.columns) >= expected


def test_lim_agrees_with_output_hidden_states(stories, stories_windows, stories_profile):
    expected = lim_from_hidden_states(stories, stories_windows)
    assert stories_profile.column("lim") == pytest.approx(expected, abs=1e-4)


def test_block_ablation_equals_removing_the_block(stories, stories_windows, stories_profile):
    for block in (0, 2, 4):
        expected = kl_without_block(stories, stories_windows, block)
        assert stories_profile.blocks[block]["ablation_kl_block"] == pytest.approx(expected, rel=1e-4, abs=1e-6)


def test_ablation_through_a_head_that_is_not_a_plain_linear(stories, stories_windows, stories_profile, monkeypatch):
    """A head module other than nn.Linear (a quantized one) is applied whole to fewer positions at
    a time instead of a slice of rows at a time: the same KLs."""
    import layerwise.engine.sliced_kl as sliced_kl

    monkeypatch.setattr(sliced_kl, "plain_head", lambda loaded: False)
    result = profile_model(stories, stories_windows, ablation=["block", "mlp"], weights=False, progress=False)
    for row, expected in zip(result.blocks, stories_profile.blocks):
        for kind in ("block", "mlp"):
            assert row[f"ablation_kl_{kind}"] == pytest.approx(expected[f"ablation_kl_{kind}"], rel=1e-5)


@pytest.mark.parametrize("at_once", [1, 2])
def test_ablation_in_waves_gives_the_same_numbers(stories, stories_windows, stories_profile, monkeypatch, at_once):
    """Ablations run through the later blocks together (eight at a time in memory; streamed,
    stories260K's one at a time: its states are large beside its blocks), here each alone (1) or
    a block's three spread over two waves (2): the numbers do not depend on how they are grouped,
    and the block runs counted are the ones announced."""
    from layerwise.profile import ablation

    assert ablation.wave_size(load_model(STORIES, streaming=True), torch.zeros(2, 256, 64)) == 1
    monkeypatch.setattr(ablation, "wave_size", lambda loaded, state: at_once)
    result = profile_model(stories, stories_windows, ablation=True, weights=False, progress=False)
    for row, expected in zip(result.blocks, stories_profile.blocks):
        for kind in ("block", "attn", "mlp"):
            assert row[f"ablation_kl_{kind}"] == pytest.approx(expected[f"ablation_kl_{kind}"], rel=1e-6)
    batches = len(stories_windows.batches(2))
    assert result.meta["ablation_cost_forward_equivalents"] == pytest.approx(
        batches * ablation.block_runs(stories, ("block", "attn", "mlp")) / stories.n_blocks)
    assert stories_profile.meta["ablation_cost_forward_equivalents"] == result.meta["ablation_cost_forward_equivalents"]


def test_ablations_are_positive_and_ordered(stories_profile):
    for row in stories_profile.blocks:
        assert row["ablation_kl_block"] > 0 and row["ablation_kl_attn"] > 0 and row["ablation_kl_mlp"] > 0
    # Skipping a whole block costs more than skipping either half of it in most blocks.
    larger = sum(row["ablation_kl_block"] >= max(row["ablation_kl_attn"], row["ablation_kl_mlp"])
                 for row in stories_profile.blocks)
    assert larger >= 3


def test_logit_lens_is_exact_at_the_top(stories_profile):
    top = stories_profile.blocks[-1]
    assert top["logit_lens_kl"] == pytest.approx(0.0, abs=1e-5)
    assert top["logit_lens_top1"] == 1.0
    assert stories_profile.blocks[0]["logit_lens_kl"] > top["logit_lens_kl"]


def test_memory_does_not_grow_with_tokens(stories):
    """Only running sums are kept: the profiler holds no tensor whose size scales with tokens."""
    small = token_windows(stories.tokenizer, CALIBRATION_TEXT, tokens=512, seq_len=256)
    large = token_windows(stories.tokenizer, CALIBRATION_TEXT, tokens=4096, seq_len=256)
    import layerwise.profile.runner as runner
    seen = []
    original = runner._profile_batch

    def spy(loaded, batch, acc, *args):
        original(loaded, batch, acc, *args)
        # Everything accumulated is a Python float, whatever the number of batches.
        seen.append(all(isinstance(v, float) for block in acc.metrics for p in block.values() for v in p.values()))

    runner._profile_batch = spy
    try:
        for windows in (small, large):
            profile_model(stories, windows, weights=False, progress=False)
    finally:
        runner._profile_batch = original
    assert seen and all(seen)


def test_save_and_load_round_trip(stories, tmp_path):
    result = run_profile(stories, tokens=1024, seq_len=256, out=tmp_path / "run", progress=False)
    data = json.loads((tmp_path / "run" / "profile.json").read_text())
    assert data["schema"] == "layerwise.profile" and data["schema_version"] == 1
    meta = data["meta"]
    for key in ("layerwise_version", "created", "command"):
        assert meta[key]
    assert meta["model"]["fingerprint"] == stories.fingerprint
    assert meta["data"]["source"] == "layerwise:wikitext2_valid_excerpt"
    assert meta["data"]["tokens"] == 1024 and meta["data"]["seed"] == 0 and len(meta["data"]["text_sha256"]) == 64
    rows = (tmp_path / "run" / "blocks.csv").read_text().splitlines()
    assert len(rows) == 1 + 5 and rows[0].startswith("block,lim,")
    assert len((tmp_path / "run" / "linears.csv").read_text().splitlines()) == 1 + 35
    loaded = ProfileResult.load(tmp_path / "run")
    assert loaded.column("lim") == pytest.approx(result.column("lim"))
    assert not [p for p in (tmp_path / "run").iterdir() if p.name.startswith(".")]


@pytest.mark.slow
def test_smollm2_profile_checks(smollm2):
    """The Done-when checks on the 30-block model: every statistic, LIM vs output_hidden_states,
    and the ablation KL of one block against the model with that block removed."""
    windows = token_windows(smollm2.tokenizer, CALIBRATION_TEXT, tokens=1024, seq_len=512, seed=0)
    result = profile_model(smollm2, windows, ablation=("block",), progress=False, weights=False)
    assert len(result.blocks) == 30
    assert result.column("lim") == pytest.approx(lim_from_hidden_states(smollm2, windows), abs=1e-4)
    for block in (3, 17):
        assert result.blocks[block]["ablation_kl_block"] == pytest.approx(
            kl_without_block(smollm2, windows, block), rel=1e-3, abs=1e-5)
    # The depth-efficiency finding this profile exists to show: on this model the first block
    # changes the residual stream far more than the median block.
    lim = result.column("lim")
    assert lim[0] > 5 * sorted(lim)[15]
