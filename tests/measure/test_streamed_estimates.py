"""Estimated sensitivity tables (every estimator) and the entries an `auto` plan refines, on a
streamed model (one block's weights in memory at a time) against the same in memory, on
stories260K (which ties its head to the embedding: with `edges` the two are one measured unit)."""
import numpy as np
import pytest

from conftest import CALIBRATION_TEXT, STORIES
from layerwise import load_model, token_windows
from layerwise.measure.run import run_plan
from layerwise.measure.sensitivity import measure_sensitivity
from layerwise.models.layout import blocks_of

# Rounding, GPTQ (statistics from windows of their own), a GGUF type that fits only the attention's
# rows (skipped for the MLP) and dropping a sublayer.
OPTIONS = "int2pc,int4pc,gptq:int4pc,q4_0,drop"


@pytest.fixture(scope="module")
def windows():
    tokenizer = load_model(STORIES).tokenizer
    return (token_windows(tokenizer, CALIBRATION_TEXT, tokens=512, seq_len=128),
            token_windows(tokenizer, CALIBRATION_TEXT, tokens=512, seq_len=128, seed=7))


@pytest.mark.parametrize("estimator", ["weights", "fisher", "local", "noise"])
@pytest.mark.parametrize("edges", [False, True], ids=["blocks", "with-embedding"])
def test_a_streamed_estimate_is_the_in_memory_estimate(estimator, edges, windows, resident_parameters):
    """Fisher's gradients come back a block at a time (the tokens drawn as in memory, in the same
    order); all gather what they need as each block runs: one block's linears at a time. What local
    and noise measure downstream (their gains) is measured from kept block inputs, after a base
    pass of its own (one forward pass more than in memory)."""
    calibration, statistics = windows
    whole = measure_sensitivity(load_model(STORIES), calibration, OPTIONS, "sublayer", statistics=statistics,
                                estimator=estimator, edges=edges, progress=False)
    streamed = measure_sensitivity(load_model(STORIES, streaming=True), calibration, OPTIONS, "sublayer",
                                   statistics=statistics, estimator=estimator, edges=edges, progress=False)
    in_memory = load_model(STORIES)
    assert resident_parameters and max(resident_parameters) == sum(p.numel() for p in blocks_of(in_memory.model, in_memory.adapter)[0]
                                             .parameters())
    assert streamed.estimator == whole.estimator == estimator
    assert np.array_equal(np.isnan(streamed.kl), np.isnan(whole.kl))
    np.testing.assert_allclose(streamed.kl, whole.kl, rtol=1e-5, atol=1e-9)
    np.testing.assert_array_equal(streamed.cost_bits, whole.cost_bits)
    assert streamed.skipped == whole.skipped
    extra = 1.0 if estimator in ("local", "noise") else 0.0
    assert streamed.cost["forward_equivalents"] == pytest.approx(whole.cost["forward_equivalents"] + extra)


def test_a_streamed_auto_plan_refines_the_entries_it_refines_in_memory():
    """`auto`: fisher's table, then the entries the plan hinges on measured (all the passes it
    likes here, refine=1), a streamed entry reading its block's kept inputs and the blocks after."""
    settings = dict(bits_per_weight=4.0, options="int2pc,int4pc,gptq:int3pc,int8pc,drop", granularity="sublayer",
                    tokens=512, check_tokens=512, statistics_tokens=512, seq_len=128, estimator="auto", refine=1.0,
                    progress=False)
    whole = run_plan(STORIES, **settings)
    streamed = run_plan(STORIES, streaming=True, **settings)
    entries = whole.report["refinement"]["entries"]
    assert len(entries) > 4
    # Hinges equally close under the estimate's float rounding may be taken in another order.
    assert sorted(streamed.report["refinement"]["entries"]) == sorted(entries)
    assert streamed.report["refinement"]["passes"] == pytest.approx(whole.report["refinement"]["passes"])
    np.testing.assert_allclose(streamed.table.kl, whole.table.kl, rtol=1e-5, atol=1e-6)
    assert streamed.report["options"] == whole.report["options"]
    assert streamed.report["check"]["plan_kl"] == pytest.approx(whole.report["check"]["plan_kl"], abs=1e-6)
