"""The sensitivity table on stories260K: each entry is what quantizing that one unit really does."""
import json
import math

import numpy as np
import pytest
import torch

from conftest import CALIBRATION_TEXT, STORIES
from layerwise import load_model, token_windows
from layerwise.engine.divergence import Reference, kl_per_token
from layerwise.errors import LayerwiseError
from layerwise.measure.sensitivity import measure_sensitivity
from layerwise.models.layout import linear_weight, set_linear_weight
from layerwise.plan.options import parse_option
from layerwise.plan.table import SensitivityTable
from layerwise.quant.qtensor import storage_bits
from layerwise.quant.rtn import quantize_weight

OPTIONS = "int2pc,int4pc,gptq:int4pc,int8pc,q4_0"


@pytest.fixture(scope="module")
def loaded():
    return load_model(STORIES)  # a private copy: these tests change weights and put them back


@pytest.fixture(scope="module")
def windows(loaded):
    return token_windows(loaded.tokenizer, CALIBRATION_TEXT, tokens=1024, seq_len=256)


@pytest.fixture(scope="module")
def table(loaded, windows):
    return measure_sensitivity(loaded, windows, OPTIONS, "sublayer", progress=False)


def _full_forward_kl(loaded, windows) -> tuple[float, float]:
    """Mean KL over every next-token position, and the mean of the worst 1% of them."""
    tokens = []
    for batch in windows.batches(4):
        logits = loaded.model(input_ids=batch, use_cache=False).logits[:, :-1]
        tokens.append(kl_per_token(_reference(loaded, batch), logits).flatten())
    tokens = torch.cat(tokens).sort().values
    return tokens.mean().item(), tokens[-math.ceil(0.01 * tokens.numel()):].mean().item()


_base_cache = {}


def _reference(loaded, batch):
    return _base_cache[batch.data_ptr()]


@torch.no_grad()
def test_an_entry_equals_quantizing_that_unit_alone_in_a_full_forward(loaded, windows, table):
    for batch in windows.batches(4):
        _base_cache[batch.data_ptr()] = Reference.from_logits(loaded.model(input_ids=batch, use_cache=False)
                                                              .logits[:, :-1], store=torch.float16)
    for u, o in [(0, 1), (5, 0), (9, 3)]:  # block 0 attention int4, block 2 MLP int2, block 4 MLP int8
        unit, config = table.units[u], parse_option(table.options[o])
        originals = {}
        for name in unit.modules:
            module = loaded.model.get_submodule(name)
            originals[name] = linear_weight(module).detach().clone()
            set_linear_weight(module, quantize_weight(originals[name], config, name).dequantize())
        try:
            direct, tail = _full_forward_kl(loaded, windows)
        finally:
            for name, weight in originals.items():
                set_linear_weight(loaded.model.get_submodule(name), weight)
        assert table.kl[u, o] == pytest.approx(direct, rel=1e-4, abs=1e-7)
        # The worst 1% of the 1020 positions: 11 tokens, several times the mean.
        assert table.tail_kl[u, o] == pytest.approx(tail, rel=1e-3)  # 11 tokens: less averaging of rounding
        assert table.tail_kl[u, o] > 2 * table.kl[u, o]
        assert table.cost_bits[u, o] == sum(storage_bits(config, tuple(linear_weight(
            loaded.model.get_submodule(name)).shape)) for name in unit.modules)


def test_table_shape_order_and_what_cannot_apply(table, loaded):
    assert table.kl.shape == (2 * loaded.n_blocks, 5)
    assert table.units[0].name == "model.layers.0.attn" and table.units[1].name == "model.layers.0.mlp"
    fine = np.isfinite(table.kl)
    # More bits, less damage (per channel RTN), on every unit.
    assert (table.kl[:, 0] > table.kl[:, 1]).all() and (table.kl[:, 1] > table.kl[:, 3]).all()
    # GPTQ with base-input Hessians beats rounding at 4 bits on most units.
    assert (table.kl[:, 2] < table.kl[:, 1]).mean() >= 0.7
    # q4_0 needs rows that are multiples of 32; stories' 48-wide key/value rows are not.
    assert not fine[:, 4].all() and all("q4_0" in key for key in table.skipped)
    assert table.cost["forward_equivalents"] > 1.0
    assert (table.unit_weights > 0).all()


def test_save_load_round_trip_and_model_check(table, loaded, tmp_path):
    path = table.save(tmp_path / "sens.json")
    again = SensitivityTable.load(path)
    np.testing.assert_array_equal(again.kl, table.kl)
    np.testing.assert_array_equal(again.tail_kl, table.tail_kl)
    np.testing.assert_array_equal(again.cost_bits, table.cost_bits)
    assert again.units == table.units and again.options == table.options
    again.check_model(loaded)
    data = json.loads(path.read_text())
    data["model_fingerprint"] = "0" * 64
    (tmp_path / "other.json").write_text(json.dumps(data))
    with pytest.raises(LayerwiseError, match="another model"):
        SensitivityTable.load(tmp_path / "other.json").check_model(loaded)
    (tmp_path / "cut.json").write_text(path.read_text()[:200])
    with pytest.raises(LayerwiseError, match="not a valid"):
        SensitivityTable.load(tmp_path / "cut.json")


def test_budgets_outside_the_options_are_errors(table):
    sizes = table.option_bits()
    cheapest = table.budget_bits(sizes["int2pc"])  # int2 applies everywhere, so it is the floor
    assert cheapest == pytest.approx(sizes["int2pc"] * table.total_weights)
    with pytest.raises(LayerwiseError, match="below the smallest"):
        table.budget_bits(sizes["int2pc"] - 0.01)
    with pytest.raises(LayerwiseError, match="above the largest"):
        table.budget_bits(sizes["int8pc"] + 0.01)
    with pytest.raises(LayerwiseError, match="exactly one budget"):
        table.budget_bits()
    by_bytes = table.budget_bits(total_bytes=(4.5 * table.total_weights + table.other_bits) / 8)
    assert by_bytes == pytest.approx(4.5 * table.total_weights)


def test_empty_options_are_an_error(loaded, windows):
    with pytest.raises(LayerwiseError, match="empty"):
        measure_sensitivity(loaded, windows, "", progress=False)


def test_options_that_fit_no_row_of_a_unit_fail_before_any_pass(loaded, windows, monkeypatch):
    import layerwise.measure.sensitivity as sensitivity

    def no_pass(*_args, **_kwargs):
        raise AssertionError("the base pass ran")

    monkeypatch.setattr(sensitivity, "base_pass", no_pass)
    # stories260K's MLP rows are 172 wide: no group of 64 divides them (attention's 64 are fine).
    with pytest.raises(LayerwiseError, match=r"no option applies to model\.layers\.0\.mlp: .*172.*int4pc"):
        measure_sensitivity(loaded, windows, "int3g64,int4g64", progress=False)


@pytest.mark.parametrize("path", ["block-major", "replay"])
def test_an_interrupted_measurement_resumes_to_the_same_table(loaded, windows, table, tmp_path, monkeypatch, path):
    """Both ways of measuring a table save their progress and resume from it: a block's entries at
    a time (the measured table in memory, as streamed), and an entry at a time from cached block
    inputs (estimated tables, the embedding and head as units)."""
    import layerwise.measure.sensitivity as sensitivity
    import layerwise.measure.streamed as streamed

    if path == "replay":
        monkeypatch.setattr(sensitivity, "runs_block_major", lambda *args: False)
        table = measure_sensitivity(loaded, windows, OPTIONS, "sublayer", progress=False)
    owner, name = (sensitivity, "_kl_from") if path == "replay" else (streamed.SlicedKL, "token_kl")
    # Partway through the fourth unit (an entry at a time), or at the third block's round.
    calls_before_stop = 3 * len(table.options) + 2 if path == "replay" else 2
    real = getattr(owner, name)
    calls = 0

    def interrupted(*args, **kwargs):
        nonlocal calls
        calls += 1
        if calls > calls_before_stop:
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    checkpoint = tmp_path / "table.progress"
    monkeypatch.setattr(owner, name, interrupted)
    with pytest.raises(KeyboardInterrupt):
        measure_sensitivity(loaded, windows, OPTIONS, "sublayer", progress=False, checkpoint=checkpoint)
    assert json.loads(checkpoint.read_text())["units_done"] == (3 if path == "replay" else 4)
    monkeypatch.setattr(owner, name, real)
    resumed = measure_sensitivity(loaded, windows, OPTIONS, "sublayer", progress=False, checkpoint=checkpoint)
    np.testing.assert_array_equal(resumed.kl, table.kl)
    np.testing.assert_array_equal(resumed.cost_bits, table.cost_bits)
    if path == "replay":  # an entry at a time keeps window means only
        assert table.tail_kl is None and resumed.tail_kl is None
    else:
        np.testing.assert_array_equal(resumed.tail_kl, table.tail_kl)
    assert resumed.skipped == table.skipped
    assert resumed.cost["forward_equivalents"] == pytest.approx(table.cost["forward_equivalents"])
    with pytest.raises(LayerwiseError, match="checkpoint of another measurement"):
        measure_sensitivity(loaded, windows, "int2pc,int8pc", "sublayer", progress=False, checkpoint=checkpoint)


def test_block_major_and_replayed_tables_agree(loaded, windows, table, monkeypatch):
    """The measured table in memory runs a block's entries together and sums KL over head slices;
    replaying each entry from cached block inputs against stored base distributions (the way of
    estimated tables) measures the same quantity, its sums ordered otherwise."""
    import layerwise.measure.sensitivity as sensitivity

    monkeypatch.setattr(sensitivity, "runs_block_major", lambda *args: False)
    replayed = measure_sensitivity(loaded, windows, OPTIONS, "sublayer", progress=False)
    assert np.isfinite(table.kl).sum() > 20 and np.nanmax(table.kl) > 0.1
    np.testing.assert_allclose(table.kl, replayed.kl, rtol=1e-5, atol=2e-7)
    np.testing.assert_array_equal(table.cost_bits, replayed.cost_bits)
    assert table.skipped == replayed.skipped
    assert table.cost["forward_equivalents"] == pytest.approx(replayed.cost["forward_equivalents"])


def test_block_major_and_replayed_tables_with_the_embedding_agree(loaded, windows, monkeypatch):
    """The embedding as a unit (tied to the head, as in plans like a GGUF file): block-major, its
    entries look up quantized rows of the calibration's tokens and apply the head quantized a slice
    of rows at a time; replayed, the whole matrix is quantized. The module is left as it was."""
    import layerwise.measure.sensitivity as sensitivity

    options = "q4_0,q8_0,int4pc"
    block_major = measure_sensitivity(loaded, windows, options, "sublayer", edges=True, progress=False)
    embedding = loaded.model.get_submodule(loaded.adapter.embed)
    assert "forward" not in vars(embedding)  # its own forward again
    monkeypatch.setattr(sensitivity, "runs_block_major", lambda *args: False)
    replayed = measure_sensitivity(loaded, windows, options, "sublayer", edges=True, progress=False)
    assert block_major.units[0].kind == "embed" and np.all(block_major.kl[0] > 0)
    np.testing.assert_allclose(block_major.kl, replayed.kl, rtol=1e-5, atol=2e-7)
    np.testing.assert_array_equal(block_major.cost_bits, replayed.cost_bits)
    assert block_major.skipped == replayed.skipped
    assert block_major.cost["forward_equivalents"] == pytest.approx(replayed.cost["forward_equivalents"])
