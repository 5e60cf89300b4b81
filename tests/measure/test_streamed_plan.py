"""The sensitivity table and the plan of a streamed model (one block's weights in memory at a
time) against the same measured with the whole model in memory, on stories260K."""
import json

import numpy as np
import pytest
import torch

from conftest import CALIBRATION_TEXT, STORIES
from layerwise import load_model, token_windows
from layerwise.errors import LayerwiseError
from layerwise.measure import streamed as streamed_measure
from layerwise.measure.run import run_plan
from layerwise.measure.sensitivity import measure_sensitivity
from layerwise.models.layout import blocks_of
from layerwise.util.tensor_files import TensorSlots

# Rounding, GPTQ (statistics from windows of their own), a GGUF type that fits only the attention's
# rows (the MLP's 172 columns split into no block of 32: skipped there) and dropping a sublayer.
OPTIONS = "int2pc,int4pc,gptq:int4pc,q4_0,drop"


@pytest.fixture(scope="module")
def in_memory():
    return load_model(STORIES)


@pytest.fixture(scope="module")
def windows(in_memory):
    return token_windows(in_memory.tokenizer, CALIBRATION_TEXT, tokens=768, seq_len=128)


@pytest.fixture(scope="module")
def statistics(in_memory):
    return token_windows(in_memory.tokenizer, CALIBRATION_TEXT, tokens=512, seq_len=128, seed=7)


@pytest.fixture(scope="module")
def whole_table(in_memory, windows, statistics):
    return measure_sensitivity(in_memory, windows, OPTIONS, "sublayer", statistics=statistics, progress=False)


def _streamed_table(windows, statistics, **kwargs):
    return measure_sensitivity(load_model(STORIES, streaming=True), windows, OPTIONS, "sublayer",
                               statistics=statistics, progress=False, **kwargs)


def test_a_streamed_table_is_the_in_memory_table_and_holds_one_block_at_a_time(in_memory, windows, statistics,
                                                                              whole_table, resident_parameters):
    block = sum(p.numel() for p in blocks_of(in_memory.model, in_memory.adapter)[0].parameters())
    table = _streamed_table(windows, statistics)
    assert resident_parameters and max(resident_parameters) == block  # never two blocks (nor the head) at once
    assert np.array_equal(np.isnan(table.kl), np.isnan(whole_table.kl))
    np.testing.assert_allclose(table.kl, whole_table.kl, rtol=0, atol=1e-6)
    np.testing.assert_array_equal(table.cost_bits, whole_table.cost_bits)
    assert table.skipped == whole_table.skipped and any("q4_0" in key for key in table.skipped)
    assert table.cost["forward_equivalents"] == pytest.approx(whole_table.cost["forward_equivalents"])
    assert table.cost["positions"] == whole_table.cost["positions"]


def test_an_interrupted_streamed_table_resumes_to_the_same_table(windows, statistics, tmp_path, monkeypatch):
    whole = _streamed_table(windows, statistics)
    rounds = 0
    real = streamed_measure.SlicedKL.token_kl

    def interrupted(self, *args, **kwargs):
        nonlocal rounds
        rounds += 1
        if rounds > 2:  # the third block's round of entries
            raise KeyboardInterrupt
        return real(self, *args, **kwargs)

    checkpoint = tmp_path / "table.progress"
    monkeypatch.setattr(streamed_measure.SlicedKL, "token_kl", interrupted)
    with pytest.raises(KeyboardInterrupt):
        _streamed_table(windows, statistics, checkpoint=checkpoint)
    assert json.loads(checkpoint.read_text())["units_done"] == 4  # two blocks of two sublayers
    monkeypatch.setattr(streamed_measure.SlicedKL, "token_kl", real)
    resumed = _streamed_table(windows, statistics, checkpoint=checkpoint)
    np.testing.assert_array_equal(resumed.kl, whole.kl)
    np.testing.assert_array_equal(resumed.cost_bits, whole.cost_bits)
    np.testing.assert_array_equal(resumed.tail_kl, whole.tail_kl)  # streamed tables keep tails too
    assert resumed.cost["forward_equivalents"] == pytest.approx(whole.cost["forward_equivalents"])


def test_a_streamed_plan_chooses_and_checks_as_in_memory():
    settings = dict(bits_per_weight=4.0, options="int2pc,int4pc,gptq:int3pc,int8pc,drop", granularity="sublayer",
                    tokens=512, check_tokens=512, statistics_tokens=512, seq_len=128, progress=False)
    whole = run_plan(STORIES, **settings)
    streamed = run_plan(STORIES, streaming=True, **settings)
    assert streamed.report["options"] == whole.report["options"]
    assert streamed.report["returned"] == whole.report["returned"]
    np.testing.assert_allclose(streamed.table.kl, whole.table.kl, rtol=0, atol=1e-6)
    ours, theirs = streamed.report["check"], whole.report["check"]
    assert ours["plan_kl"] == pytest.approx(theirs["plan_kl"], abs=1e-6)
    assert ours["uniform"].keys() == theirs["uniform"].keys()
    for option, measured in theirs["uniform"].items():
        assert ours["uniform"][option]["kl"] == pytest.approx(measured["kl"], abs=1e-6), option
        for domain, value in measured["domains"].items():
            assert ours["uniform"][option]["domains"][domain] == pytest.approx(value, abs=1e-6), (option, domain)


@pytest.mark.slow  # two searches each
@pytest.mark.parametrize("allocator", ["evolutionary", "hybrid"])
def test_a_streamed_search_measures_plans_as_in_memory(allocator):
    """A search's fitness (the table's prediction, the first windows, all of them) and the check
    of what it returns: KLFitness's numbers, block by block from disk."""
    settings = dict(bits_per_weight=4.0, options="int2pc,int4pc,gptq:int3pc,int8pc", granularity="sublayer",
                    allocator=allocator, generations=2, offspring=4, tokens=512, fitness_tokens=512,
                    check_tokens=512, statistics_tokens=512, seq_len=128, progress=False)
    whole = run_plan(STORIES, **settings)
    streamed = run_plan(STORIES, streaming=True, **settings)
    assert streamed.report["options"] == whole.report["options"]
    assert streamed.report["search_kl"] == pytest.approx(whole.report["search_kl"], abs=1e-6)
    assert streamed.report["search"]["fitness_calls"] == whole.report["search"]["fitness_calls"] > 0
    assert streamed.report["search"]["forward_equivalents"] > 0
    assert streamed.report["check"]["plan_kl"] == pytest.approx(whole.report["check"]["plan_kl"], abs=1e-6)


def test_slots_are_written_over_in_place_and_read_by_rows(tmp_path):
    shapes = [(6, 4), (2, 4)]
    slots = TensorSlots(shapes, torch.bfloat16, directory=tmp_path)
    first = [torch.arange(24.0).reshape(6, 4).bfloat16(), -torch.ones(2, 4).bfloat16()]
    second = [torch.full((6, 4), 3.0).bfloat16(), torch.zeros(2, 4).bfloat16()]
    slots.write(1, second)
    slots.write(0, first)
    slots.write(1, [t + 1 for t in second])
    assert all(torch.equal(a, b) for a, b in zip(slots.read(0), first))
    assert all(torch.equal(a, b + 1) for a, b in zip(slots.read(1), second))
    assert torch.equal(slots.read_rows(0, 0, 2, 5), first[0][2:5])
    with pytest.raises(LayerwiseError, match="other shapes"):
        slots.write(0, [torch.zeros(6, 4), torch.zeros(2, 4)])
    with pytest.raises(LayerwiseError, match="no slot 5"):
        slots.read(5)
    slots.close()


def test_a_streamed_gpt2_table_with_transposed_linears_and_a_tied_head_is_the_in_memory_table(tmp_path):
    """GPT-2 keeps its linears transposed (Conv1D) and ties its head to the embedding (a random
    model: shapes and layout only)."""
    from transformers import GPT2Config, GPT2LMHeadModel

    from layerwise.models.loading import load_tokenizer

    config = GPT2Config(n_layer=2, n_embd=64, n_head=2, n_positions=128, vocab_size=512)  # stories260K's tokenizer
    torch.manual_seed(0)
    GPT2LMHeadModel(config).save_pretrained(tmp_path / "gpt2")
    tokenizer = load_tokenizer(STORIES)
    windows = token_windows(tokenizer, CALIBRATION_TEXT, tokens=256, seq_len=64)
    tables = [measure_sensitivity(load_model(tmp_path / "gpt2", tokenizer=tokenizer, streaming=streaming), windows,
                                  "int3g32,gptq:int4g32,drop", "sublayer", progress=False)
              for streaming in (False, True)]
    np.testing.assert_allclose(tables[1].kl, tables[0].kl, rtol=0, atol=1e-6)
    np.testing.assert_array_equal(tables[1].cost_bits, tables[0].cost_bits)
