""""drop" as an allocation option: measured, allocated, planned, quantized and sized as a pruned unit."""
import pytest
import torch

from conftest import CALIBRATION_TEXT, STORIES
from layerwise import load_model, token_windows
from layerwise.apply.run import run_quantize
from layerwise.apply.storage import apply_quantized, load_quantized
from layerwise.engine.divergence import Reference, kl_per_token
from layerwise.errors import LayerwiseError
from layerwise.measure.fitness import KLFitness
from layerwise.measure.run import plan_from_choice
from layerwise.measure.sensitivity import measure_sensitivity
from layerwise.plan.allocate import allocate
from layerwise.plan.plan import Plan
from layerwise.prune import choose_drops


@pytest.fixture(scope="module")
def loaded():
    return load_model(STORIES)


@pytest.fixture(scope="module")
def windows(loaded):
    return token_windows(loaded.tokenizer, CALIBRATION_TEXT, tokens=1024, seq_len=256)


@pytest.fixture(scope="module")
def table(loaded, windows):
    return measure_sensitivity(loaded, windows, "int4pc,int8pc,drop", "sublayer", progress=False)


def test_drop_costs_nothing_and_its_kl_is_the_ablation_kl(loaded, windows, table):
    assert (table.cost_bits[:, 2] == 0).all()
    ablation = choose_drops(loaded, windows, "attn", loaded.n_blocks - 1, "ablation", progress=False)
    measured = ablation.history[0]["kl"]
    for unit_index, unit in enumerate(table.units):
        if unit.kind == "attn":
            assert table.kl[unit_index, 2] == pytest.approx(measured[unit.block], rel=1e-3)
    assert table.kl[:, 2].min() > table.kl[:, 1].max(), "dropping hurts more than 8-bit rounding"


def test_a_plan_with_drops_quantizes_sizes_and_reloads_as_measured(loaded, table, tmp_path):
    problem = table.problem(table.budget_bits(3.2))  # below int4 everywhere: something must go
    allocation = allocate(problem, "exact")
    plan = plan_from_choice(table, allocation.choice)
    assert plan.drop and all(name.endswith((".attn", ".mlp")) for name in plan.drop)
    assert Plan.from_dict(plan.to_dict()).drop == plan.drop

    fresh = load_model(STORIES)
    eval_windows = token_windows(fresh.tokenizer, CALIBRATION_TEXT, tokens=512, seq_len=256, seed=3)
    with KLFitness(fresh, table, eval_windows, batch_size=1) as fitness:
        expected = fitness.full(allocation.choice)
    batches = list(eval_windows.batches(1))
    with torch.no_grad():
        references = [Reference.from_logits(fresh.model(input_ids=b, use_cache=False).logits[:, :-1]) for b in batches]
    _, quantized, sizes = run_quantize(fresh, plan, out=tmp_path / "q", progress=False)
    assert sizes["linear_bits_per_weight"] == pytest.approx(allocation.total_cost / table.total_weights)

    reloaded = load_model(STORIES)
    document, stored = load_quantized(tmp_path / "q")
    apply_quantized(reloaded, document, stored)
    with torch.no_grad():
        total = sum(kl_per_token(r, reloaded.model(input_ids=b, use_cache=False).logits[:, :-1]).sum().item()
                    for r, b in zip(references, batches))
    assert total / (2 * 255) == pytest.approx(expected, rel=1e-3)


def test_drop_needs_blocks_or_sublayers(loaded, windows):
    with pytest.raises(LayerwiseError, match="whole blocks or sublayers"):
        measure_sensitivity(loaded, windows, "int4pc,drop", "linear", progress=False)
    with pytest.raises(LayerwiseError, match="cannot drop"):
        run_quantize(loaded, Plan(None, drop=("model.layers.7",)), progress=False)
