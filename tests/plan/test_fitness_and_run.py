"""Whole-plan fitness, `run_plan` and `run_pareto` on stories260K."""
import numpy as np
import pytest
import torch

from conftest import CALIBRATION_TEXT, STORIES
from layerwise import load_model, token_windows
from layerwise.errors import LayerwiseError
from layerwise.evaluate.divergence import Reference, kl_per_token
from layerwise.models.layout import block_linears, linear_weight
from layerwise.plan.allocate import allocate
from layerwise.plan.fitness import KLFitness
from layerwise.plan.plan import Plan
from layerwise.plan.run import budgets_between, plan_from_choice, run_pareto, run_plan
from layerwise.plan.sensitivity import measure_sensitivity
from layerwise.quant.apply import quantize_
from layerwise.quant.size import size_report

OPTIONS = "int2pc,int4pc,int8pc"


@pytest.fixture(scope="module")
def loaded():
    return load_model(STORIES)


@pytest.fixture(scope="module")
def table(loaded):
    windows = token_windows(loaded.tokenizer, CALIBRATION_TEXT, tokens=1024, seq_len=256)
    return measure_sensitivity(loaded, windows, OPTIONS, "sublayer", progress=False)


def _weights(loaded):
    return {name: linear_weight(module).detach().clone() for _, name, module in block_linears(loaded.model, loaded.adapter)}


@torch.no_grad()
def test_fitness_equals_the_kl_of_the_plan_applied_by_quantize_(loaded, table):
    original = _weights(loaded)
    windows = token_windows(loaded.tokenizer, CALIBRATION_TEXT, tokens=512, seq_len=256, seed=1)
    choice = allocate(table.problem(table.budget_bits(4.0)), "exact").choice
    with KLFitness(loaded, table, windows, batch_size=1) as fitness:
        value = fitness.full(choice)
        assert fitness(choice, 0) == pytest.approx(table.problem(1e12).total_loss(choice))
        fitness.full(tuple(0 for _ in choice))  # another state in between: only changed units are rewritten
        assert fitness.full(choice) == value
    after = _weights(loaded)
    assert all(torch.equal(original[name], after[name]) for name in original), "restore() must undo the plan"

    references = [Reference.from_logits(loaded.model(input_ids=b, use_cache=False).logits[:, :-1])
                  for b in windows.batches(1)]
    quantize_(loaded, plan_from_choice(table, choice), progress=False)
    try:
        total = sum(kl_per_token(ref, loaded.model(input_ids=b, use_cache=False).logits[:, :-1]).sum().item()
                    for ref, b in zip(references, windows.batches(1)))
        assert value == pytest.approx(total / (2 * 255), rel=1e-3)
    finally:
        for _, name, module in block_linears(loaded.model, loaded.adapter):
            module.weight.data.copy_(original[name])


def test_plan_from_choice_sizes_to_the_allocated_cost(loaded, table):
    allocation = allocate(table.problem(table.budget_bits(5.0)), "exact")
    plan = plan_from_choice(table, allocation.choice)
    sizes = size_report(loaded, {name: config for name, config in plan.rules})
    assert sizes["linear_bits_per_weight"] == pytest.approx(allocation.total_cost / table.total_weights)
    assert sizes["linear_bits_per_weight"] <= 5.0
    assert plan.model_fingerprint == loaded.fingerprint
    assert Plan.from_dict(plan.to_dict()) == plan


@pytest.mark.parametrize("allocator", ["hybrid", "exact", "greedy"])
def test_run_plan_meets_the_budget_and_is_never_worse_than_uniform(loaded, table, tmp_path, allocator):
    path = table.save(tmp_path / "sens.json")
    outcome = run_plan(loaded, bits_per_weight=4.5, table=path, allocator=allocator, generations=3,
                       fitness_tokens=512, out=tmp_path / "plan.json", progress=False)
    report = outcome.report
    assert report["bits_per_weight"] <= 4.5
    assert (tmp_path / "plan.json").exists() and (tmp_path / "plan.report.json").exists()
    assert Plan.load(tmp_path / "plan.json") == outcome.plan
    # The uniform plan that fits (int4 everywhere), judged the same way, is not better.
    windows = token_windows(loaded.tokenizer, None, tokens=512, seq_len=512, seed=1)
    with KLFitness(loaded, outcome.table, windows) as fitness:
        uniform = fitness.full((1,) * len(outcome.table.units))
    assert report["calibration_kl"] <= uniform + 1e-12


def test_run_plan_bad_input(loaded, table, tmp_path):
    path = table.save(tmp_path / "sens.json")
    with pytest.raises(LayerwiseError, match="not int3pc"):
        run_plan(loaded, bits_per_weight=4.0, table=path, options="int3pc", progress=False)
    with pytest.raises(LayerwiseError, match="below the smallest"):
        run_plan(loaded, bits_per_weight=1.0, table=path, progress=False)
    with pytest.raises(LayerwiseError, match="unknown allocator"):
        run_plan(loaded, bits_per_weight=4.0, table=path, allocator="magic", progress=False)
    assert not (tmp_path / "plan.json").exists()


def test_pareto_curve_from_one_table(table, tmp_path):
    budgets = budgets_between(table, step=0.5)
    rows = run_pareto(table, budgets=budgets, out=tmp_path)
    assert len(rows) == len(budgets)
    predicted = [row["predicted_kl"] for row in rows]
    assert all(a >= b - 1e-12 for a, b in zip(predicted, predicted[1:])), "more budget never predicts more loss"
    assert all(row["bits_per_weight"] <= row["budget_bits_per_weight"] + 1e-9 for row in rows)
    assert (tmp_path / "pareto.json").exists() and (tmp_path / "pareto.png").stat().st_size > 1000
    assert (tmp_path / "sensitivity.png").stat().st_size > 1000
    with pytest.raises(LayerwiseError, match="table alone"):
        run_pareto(table, budgets=budgets, allocator="hybrid")
    assert np.isclose(rows[0]["predicted_kl"], table.kl[:, 0].sum())
