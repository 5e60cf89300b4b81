"""Cheap sensitivity estimators on stories260K, each against a computation of its own."""
import numpy as np
import pytest
import torch

from conftest import CALIBRATION_TEXT, STORIES
from layerwise import load_model, token_windows
from layerwise.errors import LayerwiseError
from layerwise.measure.estimators import AUTO_ESTIMATOR, FISHER_SAMPLES, rounding_noise
from layerwise.measure.run import run_plan, sensitivity_for
from layerwise.measure.sensitivity import measure_sensitivity
from layerwise.models.layout import blocks_of, linear_weight, set_linear_weight
from layerwise.plan.options import parse_option
from layerwise.quant.linear import quantize_linear

OPTIONS = "int2pc,int4pc,int8pc,drop"


@pytest.fixture(scope="module")
def loaded():
    return load_model(STORIES)


@pytest.fixture(scope="module")
def windows(loaded):
    return token_windows(loaded.tokenizer, CALIBRATION_TEXT, tokens=1024, seq_len=256)


@pytest.fixture(scope="module")
def tables(loaded, windows):
    return {name: measure_sensitivity(loaded, windows, OPTIONS, "sublayer", estimator=name, progress=False)
            for name in ("measured", "local", "weights", "fisher", "noise")}


def _unit(table, name):
    return [unit.name for unit in table.units].index(name)


def _quantized(loaded, module_names, option):
    """The unit's weights under `option`, put in place; returns the originals to restore."""
    config = parse_option(option)
    originals = {}
    for name in module_names:
        module = loaded.model.get_submodule(name)
        originals[name] = linear_weight(module).detach().clone()
        set_linear_weight(module, quantize_linear(name, module, config, None).dequantize())
    return originals


def _restore(loaded, originals):
    for name, weight in originals.items():
        set_linear_weight(loaded.model.get_submodule(name), weight)


@torch.no_grad()
def _block_output_error(loaded, windows, unit) -> float:
    """Mean over windows of the per-position squared error of the unit's block output, from a
    plain forward with hooks (not the table's cached inputs), the unit already quantized."""
    block = blocks_of(loaded.model, loaded.adapter)[unit.block]
    errors = []
    for batch in windows.batches(4):
        outputs = {}
        handle = block.register_forward_hook(lambda m, a, out: outputs.__setitem__("out", out[0] if isinstance(out, tuple) else out))
        loaded.model(input_ids=batch, use_cache=False)
        handle.remove()
        errors.append(outputs["out"])
    return errors


def test_local_entries_scale_the_block_output_error_and_hit_the_measured_kl_once_per_block(loaded, windows, tables):
    local, measured = tables["local"], tables["measured"]
    unit = local.units[_unit(local, "model.layers.2.mlp")]
    u = _unit(local, "model.layers.2.mlp")
    base_out = _block_output_error(loaded, windows, unit)
    errors = {}
    for option in ("int2pc", "int4pc"):
        originals = _quantized(loaded, unit.modules, option)
        try:
            quantized_out = _block_output_error(loaded, windows, unit)
        finally:
            _restore(loaded, originals)
        errors[option] = np.mean([(q.float() - b.float()).pow(2).sum(-1)[:, :-1].mean().item()
                                  for q, b in zip(quantized_out, base_out)])
    # One gain per block: the ratio of two options' entries is the ratio of their output errors.
    o2, o4 = local.options.index("int2pc"), local.options.index("int4pc")
    assert local.kl[u, o2] / local.kl[u, o4] == pytest.approx(errors["int2pc"] / errors["int4pc"], rel=1e-3)
    # ... and in every block one entry (the gain's) is the measured KL itself.
    for block in range(loaded.n_blocks):
        rows = [i for i, unit in enumerate(local.units) if unit.block == block]
        assert np.isclose(local.kl[rows], measured.kl[rows], rtol=1e-4).sum() >= 1
    assert local.estimator == "local" and local.cost["forward_equivalents"] < measured.cost["forward_equivalents"]


def _input_mean_squares_and_logprobs(loaded, windows, module_names):
    """Per module, the mean square of every input column per window, and the model's next-token
    log-probabilities per batch, from plain forward passes with hooks."""
    squares = {name: [] for name in module_names}
    handles = [loaded.model.get_submodule(name).register_forward_pre_hook(
        lambda m, args, name=name: squares[name].append(args[0][:, :-1].double().pow(2).mean(1)))
        for name in module_names]
    try:
        logprobs = [loaded.model(input_ids=batch, use_cache=False).logits[:, :-1].double().log_softmax(-1)
                    for batch in windows.batches(4)]
    finally:
        for handle in handles:
            handle.remove()
    return squares, logprobs


@torch.no_grad()
def test_weights_entries_are_weight_errors_weighted_by_input_mean_squares(loaded, windows, tables):
    table = tables["weights"]
    u = _unit(table, "model.layers.1.attn")
    unit = table.units[u]
    squares, _ = _input_mean_squares_and_logprobs(loaded, windows, unit.modules)
    for option in ("int2pc", "int8pc", "drop"):
        total = 0.0
        for name in unit.modules:
            module = loaded.model.get_submodule(name)
            weight = linear_weight(module).double()
            now = 0 * weight if option == "drop" else \
                quantize_linear(name, module, parse_option(option), None).dequantize().double()
            per_window = torch.cat(squares[name]) @ (weight - now).pow(2).sum(0)
            total += per_window.mean().item()
        assert table.kl[u, table.options.index(option)] == pytest.approx(total, rel=1e-6)
    assert table.cost["forward_equivalents"] == pytest.approx(2.0)  # the base pass and one to collect


def test_estimators_rank_entries_like_the_measurement(tables):
    from scipy.stats import spearmanr

    measured = tables["measured"].kl.ravel()
    for name in ("local", "weights", "fisher", "noise"):
        estimate = tables[name].kl.ravel()
        finite = np.isfinite(measured) & np.isfinite(estimate)
        assert spearmanr(measured[finite], estimate[finite]).statistic > 0.7, name


def test_fisher_entries_are_the_kl_to_second_order(tables):
    # Against the KL measured by running the model (int4: small enough for the quadratic term to
    # dominate, large enough to be well above float noise); measured on stories260K: 0.72-1.37x.
    fisher, measured = tables["fisher"], tables["measured"]
    o = measured.options.index("int4pc")
    ratios = fisher.kl[:, o] / measured.kl[:, o]
    assert np.all((ratios > 0.6) & (ratios < 1.6)), ratios
    # The base pass, then per window a forward and FISHER_SAMPLES backwards (two forwards each).
    assert fisher.cost["forward_equivalents"] == pytest.approx(2.0 + 2.0 * FISHER_SAMPLES)


@torch.no_grad()
def test_noise_entries_are_weighted_errors_times_one_measured_gain_per_unit(loaded, windows, tables):
    noise, weights, measured = tables["noise"], tables["weights"], tables["measured"]
    u = _unit(noise, "model.layers.3.mlp")
    unit = noise.units[u]
    squares, base = _input_mean_squares_and_logprobs(loaded, windows, unit.modules)
    # The gain's noise, drawn again as the estimator draws it (seeded by the unit's index).
    generator = torch.Generator().manual_seed(u)
    originals = {name: linear_weight(loaded.model.get_submodule(name)).detach().clone() for name in unit.modules}
    error = 0.0
    try:
        for name, weight in originals.items():
            disturbance = rounding_noise(weight, generator)
            set_linear_weight(loaded.model.get_submodule(name), weight + disturbance)
            error += (torch.cat(squares[name]) @ disturbance.double().pow(2).sum(0)).mean().item()
        noisy = [loaded.model(input_ids=batch, use_cache=False).logits[:, :-1].double().log_softmax(-1)
                 for batch in windows.batches(4)]
    finally:
        _restore(loaded, originals)
    kl = torch.cat([(b.exp() * (b - q)).sum(-1).mean(-1) for b, q in zip(base, noisy)]).mean().item()
    for option in ("int2pc", "int4pc", "drop"):
        o = noise.options.index(option)
        assert noise.kl[u, o] == pytest.approx(weights.kl[u, o] * kl / error, rel=1e-3)
    assert noise.cost["forward_equivalents"] < measured.cost["forward_equivalents"] / 2


def test_rounding_noise_stays_within_half_a_step_of_a_4_bit_grid():
    weight = torch.randn(8, 128)
    disturbance = rounding_noise(weight, torch.Generator().manual_seed(0))
    groups = weight.reshape(8, 2, 64)
    step = (groups.amax(-1) - groups.amin(-1)) / 15
    spread = disturbance.reshape(8, 2, 64).abs().amax(-1)
    assert torch.all(spread <= step / 2) and torch.all(spread > step / 4)


def test_plan_with_an_estimator_records_it_and_refuses_a_table_of_another(loaded, windows, tmp_path):
    outcome = run_plan(loaded, bits_per_weight=4.5, options="int2pc,int4pc,int8pc", estimator="local",
                       calib=CALIBRATION_TEXT, tokens=1024, check_tokens=1024, table=tmp_path / "local.json",
                       progress=False)
    assert outcome.table.estimator == "local" and outcome.plan.meta["provenance"]["estimator"] == "local"
    with pytest.raises(LayerwiseError, match="filled by the 'local' estimator, not 'measured'"):
        sensitivity_for(loaded, table=tmp_path / "local.json")
    # auto is the estimator the bench supports, and tables record which one ran.
    with pytest.raises(LayerwiseError, match=f"filled by the 'local' estimator, not '{AUTO_ESTIMATOR}'"):
        sensitivity_for(loaded, table=tmp_path / "local.json", estimator="auto")
    table = sensitivity_for(loaded, table=tmp_path / "auto.json", options="int2pc,int4pc", windows=windows,
                            estimator="auto")
    assert table.estimator == AUTO_ESTIMATOR == sensitivity_for(loaded, table=tmp_path / "auto.json",
                                                                estimator=AUTO_ESTIMATOR).estimator
    with pytest.raises(LayerwiseError, match="unknown sensitivity estimator 'magic'"):
        run_plan(loaded, bits_per_weight=4.5, estimator="magic", calib=CALIBRATION_TEXT, progress=False)
