"""Objectives over calibration domains: exact under each against brute force, the planted fragile
domain, and a never-worse check that holds on every domain."""
import itertools

import numpy as np
import pytest

from layerwise.errors import LayerwiseError
from layerwise.plan.allocate import allocate
from layerwise.plan.problem import Allocation, AllocationProblem
from layerwise.plan.check import check_against_uniform
from layerwise.plan.objectives import OBJECTIVES, objective_named
from layerwise.plan.table import SensitivityTable
from layerwise.plan.units import Unit


def _problem(domain_loss, cost, budget, objective):
    units = tuple(f"u{i}" for i in range(cost.shape[0]))
    options = tuple(f"o{j}" for j in range(cost.shape[1]))
    return AllocationProblem(units, options, cost, objective_named(objective).unit_loss(domain_loss), budget,
                             domain_loss, objective)


@pytest.mark.parametrize("objective", list(OBJECTIVES))
def test_exact_is_the_brute_force_optimum_of_every_objective(objective):
    rng = np.random.default_rng(7)
    for _ in range(40):
        units, options, domains = 4, 3, 3
        cost = np.sort(rng.integers(1, 9, size=(units, options)), axis=1).astype(float)
        domain_loss = rng.random((domains, units, options)) * np.sort(rng.random((units, options)), axis=1)[:, ::-1]
        budget = rng.uniform(cost.min(axis=1).sum(), cost.max(axis=1).sum())
        problem = _problem(domain_loss, cost, budget, objective)
        best = min((c for c in itertools.product(range(options), repeat=units) if problem.total_cost(c) <= budget),
                   key=problem.total_loss)
        found = allocate(problem, "exact")
        assert problem.total_loss(found.choice) == pytest.approx(problem.total_loss(best), abs=1e-12)


def test_objectives_score_the_domain_totals_as_documented():
    domain_loss = np.array([[[1.0, 0.0]], [[0.2, 0.3]]])  # 2 domains, 1 unit, 2 options
    cost = np.array([[1.0, 2.0]])
    assert _problem(domain_loss, cost, 2, "mean").total_loss((0,)) == pytest.approx(0.6)
    assert _problem(domain_loss, cost, 2, "worst").total_loss((0,)) == pytest.approx(1.0)
    assert _problem(domain_loss, cost, 2, "cautious").total_loss((1,)) == pytest.approx(0.3)
    assert list(_problem(domain_loss, cost, 2, "mean").domain_totals((1,))) == [0.0, 0.3]
    with pytest.raises(LayerwiseError, match="unknown objective 'median'"):
        _problem(domain_loss, cost, 2, "mean").__class__(("u",), ("a", "b"), cost, domain_loss[0], 2, domain_loss,
                                                         "median")
    with pytest.raises(LayerwiseError, match="domain_loss has shape"):
        AllocationProblem(("u",), ("a", "b"), cost, domain_loss[0], 2, domain_loss[:, :, :1], "mean")
    with pytest.raises(LayerwiseError, match="cannot minimise the worst domain"):
        allocate(_problem(domain_loss, cost, 2, "worst"), "exact", solver="dp")


def _planted_table() -> SensitivityTable:
    """Six units at int2/int3/int4 (2, 3, 4 bits per weight, 100 weights each). Units 0 and 1 gain
    much from int4; ordinary units lose 0.35 nats at int2 on every domain. Unit 3 looks nearly free
    at int2 on prose and code, and is fragile on the planted domain (it drives a path only that
    text uses): 0.9 there. The mean over three domains (0.31) hides it."""
    options = ["int2", "int3", "int4"]
    ordinary = [0.40, 0.05, 0.01]
    important = [1.0, 0.50, 0.05]
    base = np.array([important, important, ordinary, ordinary, ordinary, ordinary])
    fragile = base.copy()
    base[3] = [0.02, 0.01, 0.005]
    fragile[3] = [0.90, 0.01, 0.005]
    domain_kl = {"prose": base, "code": base.copy(), "planted": fragile}
    units = [Unit(f"model.layers.{i}.mlp", i, (f"model.layers.{i}.mlp.up_proj",), "mlp") for i in range(6)]
    cost = np.tile([200.0, 300.0, 400.0], (6, 1))
    return SensitivityTable("fingerprint", "sublayer", units, options, cost,
                            np.mean(np.stack(list(domain_kl.values())), axis=0), np.full(6, 100), 0,
                            {"domains": {name: {} for name in domain_kl}}, {}, domain_kl=domain_kl)


def test_a_planted_fragile_domain_keeps_its_unit_at_more_bits_under_the_robust_objectives():
    table = _planted_table()
    budget = table.budget_bits(3.0)
    chosen = {objective: allocate(table.problem(budget, objective), "exact").labels(table.problem(budget, objective))
              for objective in OBJECTIVES}
    assert chosen["mean"][3] == "int2"  # the mean trades the fragile unit for an int4 elsewhere
    for objective in ("worst", "cautious"):
        assert chosen[objective][3] != "int2", objective
        assert "int4" in chosen[objective]  # still a mixed plan: an ordinary unit pays for the upgrade
    # Leaving the planted domain out, the robust objectives cannot know: they behave as the mean.
    without = table.restricted(["prose", "code"])
    problem = without.problem(budget, "cautious")
    assert allocate(problem, "exact").labels(problem)[3] == "int2"


def test_the_check_returns_a_safer_plan_or_uniform_unless_the_plan_wins_on_every_domain():
    table = _planted_table()
    budget = table.budget_bits(3.0)
    problem = table.problem(budget, "mean")
    mean_plan = allocate(problem, "exact")
    safer = Allocation.of(problem, allocate(table.problem(budget, "worst"), "exact").choice, "exact (worst domain)")
    domains = ["prose", "code", "planted"] * 4

    def window_kl(choice):  # the table's prediction per domain, as if measured on 4 windows each
        totals = dict(zip(table.domains, table.problem(budget, "mean").domain_totals(choice)))
        return np.array([totals[d] for d in domains]) * np.repeat([0.98, 1.0, 1.02, 1.0], 3)

    check = check_against_uniform(problem, mean_plan, window_kl, domains, [safer])
    assert check.candidates[0]["passed"] is False and check.candidates[1]["passed"] is True
    assert check.returned.choice == safer.choice
    assert set(check.domains) == {"prose", "code", "planted"}
    assert all(entry["margin"] > 0 and entry["ratio"] < 1 for entry in check.domains.values())
    # With no safer plan, uniform int3 (the best uniform plan on every domain) comes back.
    check = check_against_uniform(problem, mean_plan, window_kl, domains)
    assert check.returned.allocator == "uniform" and check.best_uniform == "int3"
    assert check.candidates == [check.candidates[0]] and not check.candidates[0]["passed"]
    # One domain alone behaves as before domains existed: the lower mean wins.
    one = check_against_uniform(problem, mean_plan, lambda c: window_kl(c)[0::3], None)
    assert one.returned.choice == mean_plan.choice and set(one.domains) == {"calibration"}


def test_the_relative_objective_weighs_a_domain_by_its_share_of_uniform_not_by_its_nats():
    """A quiet domain (tables: every option loses a tenth of what it loses on prose) where unit 3
    is fragile at int2. In nats the quiet domain barely moves the mean; as a share of what uniform
    int3 loses there it counts as much as prose, and the relative objective keeps unit 3 off int2."""
    options = ["int2", "int3", "int4"]
    ordinary = np.array([0.40, 0.05, 0.01])
    important = np.array([1.0, 0.50, 0.05])
    prose = np.array([important, important, ordinary, ordinary, ordinary, ordinary])
    prose[3] = [0.02, 0.01, 0.005]
    tables = prose * 0.1
    tables[3] = [0.30, 0.001, 0.0005]
    domain_kl = {"prose": prose, "tables": tables}
    units = [Unit(f"model.layers.{i}.mlp", i, (f"model.layers.{i}.mlp.up_proj",), "mlp") for i in range(6)]
    table = SensitivityTable("fingerprint", "sublayer", units, options, np.tile([200.0, 300.0, 400.0], (6, 1)),
                             (prose + tables) / 2, np.full(6, 100), 0, {"domains": {name: {} for name in domain_kl}},
                             {}, domain_kl=domain_kl)
    budget = table.budget_bits(3.0)
    chosen = {objective: allocate(table.problem(budget, objective), "exact").labels(table.problem(budget, objective))
              for objective in ("mean", "relative")}
    assert chosen["mean"][3] == "int2"
    assert chosen["relative"][3] != "int2" and "int4" in chosen["relative"]
    # Each domain is divided by its total under uniform int3, the best uniform plan that fits 3 bits.
    relative = table.problem(budget, "relative").domain_loss
    assert relative[0].sum(axis=0)[1] == pytest.approx(1.0) and relative[1].sum(axis=0)[1] == pytest.approx(1.0)
    assert relative[1, 3, 0] == pytest.approx(0.30 / tables[:, 1].sum())
    # A plan's score is the geometric mean of its KL over domains: scaling one domain scales every
    # plan's score alike, so which plan scores better does not depend on a domain's nats.
    score = objective_named("relative").plan_score
    assert score(np.array([4.0, 1.0])) == pytest.approx(2.0)
    assert (score(np.array([0.5, 0.1])) < score(np.array([0.4, 0.2]))) == \
        (score(np.array([0.5, 10.0])) < score(np.array([0.4, 20.0])))


def test_a_tail_weight_buys_bits_for_the_unit_whose_damage_falls_on_few_tokens():
    """Four units at int2 or int4, room for two at int4. By mean KL, units 0 and 1 gain most from
    int4 (0.95 and 0.45 nats against unit 3's 0.39); but unit 3's damage falls on few tokens: its
    tail KL (the mean of the worst 1% of tokens) is 20 times its mean, the others' 3 times. With a
    tail weight the upgrade goes to unit 3 instead of unit 1. The tail survives option subsets and
    a restriction to every domain; a subset of domains has no pooled tail."""
    kl = np.array([[1.0, 0.05], [0.5, 0.05], [0.2, 0.01], [0.4, 0.01]])
    tail = kl * 3.0
    tail[3, 0] = 20 * kl[3, 0]
    units = [Unit(f"model.layers.{i}.mlp", i, (f"model.layers.{i}.mlp.up_proj",), "mlp") for i in range(4)]
    table = SensitivityTable("fingerprint", "sublayer", units, ["int2", "int4"], np.tile([200.0, 400.0], (4, 1)),
                             kl, np.full(4, 100), 0, {"domains": {"prose": {}, "code": {}}}, {},
                             domain_kl={"prose": kl, "code": kl}, tail_kl=tail)
    budget = table.budget_bits(3.0)
    plain = table.problem(budget, "mean")
    weighted = table.problem(budget, "mean", tail_weight=0.2)
    assert allocate(plain, "exact").labels(plain) == ("int4", "int4", "int2", "int2")
    assert allocate(weighted, "exact").labels(weighted) == ("int4", "int2", "int2", "int4")
    np.testing.assert_allclose(weighted.loss, plain.loss + 0.2 * tail)
    assert table.with_options(["int4", "int2"]).tail_kl.tolist() == tail[:, [1, 0]].tolist()
    assert table.restricted(["code", "prose"]).tail_kl is tail
    assert table.restricted(["prose"]).tail_kl is None
    with pytest.raises(LayerwiseError, match="no tail KL"):
        table.restricted(["prose"]).problem(budget, "mean", tail_weight=0.2)
    with pytest.raises(LayerwiseError, match="must be a finite number"):
        table.problem(budget, "mean", tail_weight=-1.0)


def test_tail_mean_is_the_mean_of_the_largest_share_at_least_one():
    from layerwise.plan.table import tail_mean

    values = np.arange(1000, dtype=float)
    assert tail_mean(values) == pytest.approx(np.mean(values[-10:]))
    assert tail_mean(values, share=0.0015) == pytest.approx(np.mean([998.0, 999.0]))  # ceil(1.5) = 2
    assert tail_mean(np.array([[3.0, 1.0], [2.0, 0.5]]), share=0.01) == 3.0
