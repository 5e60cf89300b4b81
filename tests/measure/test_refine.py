"""Measuring the entries a plan hinges on (`layerwise.measure.refine`), on stories260K: the entries
refined into a fisher table are the measured table's, the passes stay within the share, and a
saved table keeps them."""
import math

import numpy as np
import pytest

from layerwise.data.overlap import rebuild_windows
from layerwise.errors import LayerwiseError
from layerwise.measure.refine import hinges, measured_entries, refine_table
from layerwise.measure.run import run_plan, sensitivity_for
from layerwise.measure.sensitivity import measured_passes
from layerwise.plan.allocate import allocate
from layerwise.plan.problem import AllocationProblem
from layerwise.plan.table import SensitivityTable

OPTIONS = "int2pc,int3pc,int4pc,int5pc,int6pc,int8pc"
SETTINGS = dict(options=OPTIONS, tokens=2048, check_tokens=2048, progress=False)
# A measured table sums each entry's KL over slices of the head, a block's entries at a time; a
# refined entry is measured alone, replayed from cached block inputs against stored base
# distributions: the same quantity, its sums ordered otherwise (measured: up to 1.1e-7 nats apart,
# 4e-6 of a 0.03 entry).
REPLAYED = dict(rel=1e-5, abs=2e-7)


def test_hinges_put_the_next_moves_up_and_down_first():
    # Costs 1, 2, 3 for every unit, convex losses: moving up saves less than moving down loses.
    loss = [[4.0, 1.0, 0.5],   # taken 1: up saves 0.5 per bit, down loses 3
            [4.0, 1.0, 0.45],  # taken 1: up saves 0.55, down loses 3
            [9.0, 2.0, 0.1]]   # taken 2: down loses 1.9
    problem = AllocationProblem(("a", "b", "c"), ("low", "mid", "high"), [[1, 2, 3]] * 3, loss, budget=7)
    chosen = allocate(problem, "exact")
    assert chosen.choice == (1, 1, 2)  # c moved up: its 1.9 per bit beat a's and b's
    order = hinges(problem, chosen.choice)
    # The price of a bit lies between b's move up (the next a larger budget buys) and c's move
    # down (the next a smaller one gives up): those two are the closest, equally, on a log scale.
    price = math.sqrt(0.55 * 1.9)
    assert {order[0][1:], order[1][1:]} == {(1, 1, 2), (2, 2, 1)}
    assert order[0][0] == pytest.approx(abs(math.log(0.55 / price)))
    assert order[2][1:] == (0, 1, 2)  # a's move up, 0.5 per bit, is next
    assert {(u, o) for _, u, _, o in order} == {(0, 2), (0, 0), (1, 2), (1, 0), (2, 1)}


def test_an_option_of_the_same_cost_is_a_move_by_how_close_its_loss_is():
    # Like q4_0 and q4_k: the same bits, and only the estimate says which loses less.
    problem = AllocationProblem(("a", "b"), ("low", "same-1", "same-2"), [[1, 2, 2], [1, 2, 2]],
                                [[5.0, 1.0, 1.02], [5.0, 1.0, 2.0]], budget=4)
    chosen = allocate(problem, "exact")
    assert chosen.choice == (1, 1)
    order = {(u, taken, other): closeness for closeness, u, taken, other in hinges(problem, chosen.choice)}
    assert order[0, 1, 2] == pytest.approx(math.log(1.02))
    assert order[1, 1, 2] == pytest.approx(math.log(2.0))  # b's twin loses twice as much: far


def test_the_move_up_is_the_best_costlier_option_not_the_next_one():
    # The next costlier option saves nothing; the one after saves much: that is the move up.
    problem = AllocationProblem(("a",), ("low", "mid", "high"), [[1, 2, 3]], [[4.0, 4.0, 1.0]], budget=1)
    order = hinges(problem, (0,))
    assert [(u, taken, other) for _, u, taken, other in order] == [(0, 0, 2)]


def test_a_costlier_option_that_is_no_better_is_no_hinge():
    problem = AllocationProblem(("a", "b"), ("low", "high"), [[1, 2], [1, 2]], [[1.0, 1.2], [1.0, 0.5]], budget=3)
    order = hinges(problem, allocate(problem, "exact").choice)
    assert order[-1][0] == math.inf and order[-1][1] == 0


@pytest.fixture(scope="module")
def refined(stories, tmp_path_factory):
    """A plan from a fisher table refined with half the measured table's passes, and the measured
    table on the same windows."""
    folder = tmp_path_factory.mktemp("refine")
    outcome = run_plan(stories, bits_per_weight=4.25, estimator="auto", refine=0.5, table=folder / "fisher.json",
                       **SETTINGS)
    fisher = SensitivityTable.load(folder / "fisher.json")
    windows = rebuild_windows(stories.tokenizer, fisher.calibration)
    measured = sensitivity_for(stories, table=folder / "measured.json", options=OPTIONS, windows=windows,
                               estimator="measured", progress=False)
    return outcome, fisher, measured, folder


def test_refined_entries_are_the_measured_tables(refined):
    outcome, fisher, measured, _ = refined
    entries = outcome.report["refinement"]["entries"]
    assert len(entries) >= 4 and fisher.meta["measured_entries"] == entries
    names = [unit.name for unit in fisher.units]
    for entry in entries:
        unit, option = entry.split(" ")
        u, o = names.index(unit), fisher.options.index(option)
        assert fisher.kl[u, o] == pytest.approx(measured.kl[u, o], **REPLAYED)
        for domain in measured.domains:
            assert fisher.domain_kl[domain][u, o] == pytest.approx(measured.domain_kl[domain][u, o], **REPLAYED)
    # Entries not refined keep the estimate (which is not the measurement).
    untouched = [(u, o) for u in range(len(names)) for o in range(len(fisher.options))
                 if (u, o) not in measured_entries(fisher)]
    assert untouched and not np.allclose([fisher.kl[e] for e in untouched], [measured.kl[e] for e in untouched])


def test_refinement_spends_at_most_its_share(refined, stories):
    outcome, fisher, measured, _ = refined
    record = outcome.report["refinement"]
    total = fisher.cost["forward_equivalents"]
    assert fisher.cost["refined_forward_equivalents"] == pytest.approx(record["passes"])
    assert total - record["passes"] == pytest.approx(4.0)  # fisher's own: base, forward, backward
    assert total <= 0.5 * measured_passes(stories, measured) + 1e-9
    # Counted as measure_sensitivity counts: the measured table's passes are what it reports.
    assert measured_passes(stories, measured) == pytest.approx(measured.cost["forward_equivalents"])


def test_a_second_plan_on_the_saved_table_measures_only_new_entries(refined, stories):
    outcome, _, _, folder = refined
    again = run_plan(stories, bits_per_weight=3.5, estimator="auto", refine=0.5, table=folder / "fisher.json",
                     **SETTINGS)
    first, second = outcome.report["refinement"]["entries"], again.report["refinement"]["entries"]
    assert not set(first) & set(second)
    assert SensitivityTable.load(folder / "fisher.json").meta["measured_entries"] == first + second


def test_a_plain_fisher_plan_and_a_measured_table_are_not_refined(refined, stories):
    _, _, measured, folder = refined
    plain = run_plan(stories, bits_per_weight=4.25, estimator="fisher", table=folder / "plain.json", **SETTINGS)
    assert plain.report["refinement"] is None
    windows = rebuild_windows(stories.tokenizer, measured.calibration)
    same, record = refine_table(stories, measured, windows, lambda table: table.problem(table.budget_bits(4.25)))
    assert same is measured and record["entries"] == []


def test_a_plan_on_fewer_options_refines_the_saved_table_in_place(refined, stories, tmp_path):
    """The table file keeps every option's column; the entries a plan on three of them measured
    land in their own columns, the others untouched."""
    _, _, measured, folder = refined
    path = tmp_path / "fisher.json"
    run_plan(stories, bits_per_weight=4.25, estimator="fisher", refine=0.0, table=path, **SETTINGS)
    before = SensitivityTable.load(path)
    fewer = "int3pc,int5pc,int8pc"
    outcome = run_plan(stories, bits_per_weight=4.25, estimator="auto", refine=0.5, table=path,
                       **(SETTINGS | {"options": fewer}))
    after = SensitivityTable.load(path)
    assert after.options == before.options
    entries = outcome.report["refinement"]["entries"]
    assert entries and after.meta["measured_entries"] == entries
    names = [unit.name for unit in after.units]
    changed = {(u, o) for u in range(len(names)) for o in range(len(after.options))
               if after.kl[u, o] != before.kl[u, o]}
    assert changed == {(names.index(e.split(" ")[0]), after.options.index(e.split(" ")[1])) for e in entries}
    for u, o in changed:
        assert after.options[o] in fewer.split(",")
        assert after.kl[u, o] == pytest.approx(measured.kl[u, o], **REPLAYED)
        for domain in after.domains:
            assert after.domain_kl[domain][u, o] == pytest.approx(measured.domain_kl[domain][u, o], **REPLAYED)


def test_a_share_outside_zero_to_one_is_refused(stories):
    with pytest.raises(LayerwiseError, match="refine=1.5"):
        run_plan(stories, bits_per_weight=4.25, estimator="auto", refine=1.5, **SETTINGS)
