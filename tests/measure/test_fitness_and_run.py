"""Whole-plan fitness, `run_plan` and `run_pareto` on stories260K."""
import hashlib
import json

import numpy as np
import pytest
import torch

from conftest import CALIBRATION_TEXT, EVALUATION_TEXT, STORIES
from layerwise import load_model, token_windows
from layerwise.apply.quantize import quantize_
from layerwise.data.overlap import rebuild_windows, shared_windows
from layerwise.engine.divergence import Reference, kl_per_token
from layerwise.errors import LayerwiseError
from layerwise.evaluate.run import run_eval
from layerwise.measure.fitness import KLFitness
from layerwise.measure.run import plan_from_choice, run_plan, sensitivity_for
from layerwise.report.pareto import budgets_between, run_pareto
from layerwise.measure.sensitivity import measure_sensitivity
from layerwise.models.layout import block_linears, blocks_of, linear_weight
from layerwise.plan.allocate import allocate
from layerwise.plan.options import parse_option
from layerwise.plan.plan import Plan
from layerwise.plan.table import SensitivityTable
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


@torch.no_grad()
def test_the_fitness_keeps_stored_weights_not_a_float_copy_per_option(loaded, table):
    """Every uniform plan measured (as the never-worse check does) leaves stored codes in an
    unbounded bank, int8 codes and scales, not float copies; between and after evaluations the
    model holds its own weight tensors (plans are decoded a block at a time)."""
    windows = token_windows(loaded.tokenizer, CALIBRATION_TEXT, tokens=256, seq_len=256, seed=1)
    with KLFitness(loaded, table, windows, batch_size=1, bank_bytes=10**12) as fitness:
        own = {name: module.weight for name, module in fitness.modules.items()}
        pointers = {name: weight.data_ptr() for name, weight in own.items()}
        for option in range(len(table.options)):
            fitness.full((option,) * len(table.units))
            assert all(module.weight.data_ptr() == pointers[name] for name, module in fitness.modules.items())
        stored = [qtensor for entry in fitness.bank.values() for qtensor in entry.values()]
        assert len(stored) == len(table.options) * len(own)
        stored_bytes = sum(q.codes.numel() * q.codes.element_size() + sum(v.numel() * v.element_size()
                                                                          for v in q.params.values())
                           for q in stored)
        float_bytes = len(table.options) * sum(w.numel() * 4 for w in own.values())
        assert stored_bytes < 0.3 * float_bytes
        fitness.apply((0,) * len(table.units))  # the whole-model state, for other evaluations
        assert all(module.weight.data_ptr() != pointers[name] for name, module in fitness.modules.items())
    # The same parameters, holding their own storage again (nothing was copied into or out of it).
    assert all(module.weight is own[name] and module.weight.data_ptr() == pointers[name]
               for name, module in fitness.modules.items())


@torch.no_grad()
def test_a_whole_plan_is_measured_with_one_block_decoded_at_a_time(loaded, table):
    """While any block runs, only that block's linears hold decoded weights: no float copy of the
    model is made for a plan (issue 17)."""
    windows = token_windows(loaded.tokenizer, CALIBRATION_TEXT, tokens=256, seq_len=256, seed=1)
    blocks = blocks_of(loaded.model, loaded.adapter)
    seen = []
    with KLFitness(loaded, table, windows, batch_size=1) as fitness:
        pointers = {name: module.weight.data_ptr() for name, module in fitness.modules.items()}

        def watch(index):
            def hook(module, args):
                decoded = {name for name, m in fitness.modules.items() if m.weight.data_ptr() != pointers[name]}
                seen.append((index, decoded))
            return hook

        handles = [block.register_forward_pre_hook(watch(index)) for index, block in enumerate(blocks)]
        try:
            fitness.full((1,) * len(table.units))
        finally:
            for handle in handles:
                handle.remove()
    assert {index for index, _ in seen} == set(range(len(blocks)))
    prefix = loaded.adapter.blocks
    for index, decoded in seen:
        assert decoded and all(name.startswith(f"{prefix}.{index}.") for name in decoded), (index, decoded)


@torch.no_grad()
def test_a_bounded_bank_gives_the_same_kl_and_stays_within_its_bytes(loaded, table):
    """A bank too small for a plan's codes requantizes what it let go, to the same values; it never
    holds more than its bound."""
    windows = token_windows(loaded.tokenizer, CALIBRATION_TEXT, tokens=512, seq_len=256, seed=2)
    plans = [(0,) * len(table.units), (2,) * len(table.units), allocate(table.problem(table.budget_bits(4.0)), "exact").choice]
    with KLFitness(loaded, table, windows, batch_size=1, bank_bytes=10**12) as unbounded:
        expected = [unbounded.window_kl(choice) for choice in plans + plans]
        quantized = unbounded.quantizations
    # A third of the weights, and none (what `plan` uses when no search revisits plans).
    for bound in (sum(m.weight.numel() for m in unbounded.modules.values()) // 3, 0):
        with KLFitness(loaded, table, windows, batch_size=1, bank_bytes=bound) as bounded:
            for choice, values in zip(plans + plans, expected):
                assert np.array_equal(bounded.window_kl(choice), values)
                assert sum(bounded._bank_sizes.values()) <= bound
            assert bounded.quantizations > quantized


def test_plan_from_choice_sizes_to_the_allocated_cost(loaded, table):
    allocation = allocate(table.problem(table.budget_bits(5.0)), "exact")
    plan = plan_from_choice(table, allocation.choice)
    sizes = size_report(loaded, {name: config for name, config in plan.rules})
    assert sizes["linear_bits_per_weight"] == pytest.approx(allocation.total_cost / table.total_weights)
    assert sizes["linear_bits_per_weight"] <= 5.0
    assert plan.model_fingerprint == loaded.fingerprint
    assert Plan.from_dict(plan.to_dict()) == plan


def _kl_on(loaded, windows, plan) -> np.ndarray:
    """Per-window KL of `plan` applied by quantize_, by plain forward passes: independent of KLFitness."""
    original = _weights(loaded)
    with torch.no_grad():
        references = [Reference.from_logits(loaded.model(input_ids=b, use_cache=False).logits[:, :-1])
                      for b in windows.batches(1)]
        quantize_(loaded, plan, progress=False)
        try:
            return np.array([kl_per_token(ref, loaded.model(input_ids=b, use_cache=False).logits[:, :-1]).mean().item()
                             for ref, b in zip(references, windows.batches(1))])
        finally:
            for _, name, module in block_linears(loaded.model, loaded.adapter):
                module.weight.data.copy_(original[name])


@pytest.mark.parametrize("allocator", ["hybrid", "exact", "greedy"])
def test_run_plan_meets_the_budget_and_is_never_worse_than_uniform(loaded, table, tmp_path, allocator):
    path = table.save(tmp_path / "sens.json")
    outcome = run_plan(loaded, bits_per_weight=4.5, table=path, allocator=allocator, generations=3, calib=CALIBRATION_TEXT,
                       estimator="measured",
                       fitness_tokens=512, check_tokens=1024, out=tmp_path / "plan.json", progress=False)
    report = outcome.report
    assert report["bits_per_weight"] <= 4.5
    assert (tmp_path / "plan.json").exists() and (tmp_path / "plan.report.json").exists()
    assert Plan.load(tmp_path / "plan.json") == outcome.plan
    # Independently of the check's machinery: re-cut the check's windows from the recorded slots,
    # apply the returned plan and the uniform plan that fits (int4 per row) with quantize_, and
    # compare plain forward passes.
    jobs = outcome.plan.meta["provenance"]["calibration"]["jobs"]
    windows = rebuild_windows(loaded.tokenizer, jobs["check"])
    returned = _kl_on(loaded, windows, outcome.plan)
    uniform = _kl_on(loaded, windows, Plan(parse_option("int4pc")))
    assert returned.mean() <= uniform.mean() + 1e-9
    check = report["check"]
    assert check["plan_kl"] == pytest.approx(returned.mean(), rel=1e-3)
    assert check["uniform"]["int4pc"]["kl"] == pytest.approx(uniform.mean(), rel=1e-3)
    low, high = check["ratio_ci"]
    assert low <= check["ratio"] <= high


def test_plan_jobs_get_disjoint_windows_and_the_plan_records_them(loaded, tmp_path):
    outcome = run_plan(loaded, bits_per_weight=4.5, options=OPTIONS, allocator="hybrid", generations=2,
                       calib=CALIBRATION_TEXT, tokens=1024, fitness_tokens=512, check_tokens=1024, seed=3,
                       table=tmp_path / "sens.json", out=tmp_path / "plan.json", progress=False)
    provenance = Plan.load(tmp_path / "plan.json").meta["provenance"]
    calibration = provenance["calibration"]
    assert calibration["text_sha256"] == hashlib.sha256(CALIBRATION_TEXT.read_text().encode()).hexdigest()
    assert provenance["layerwise_version"] and provenance["command"] and provenance["options"] == OPTIONS.split(",")
    assert provenance["seeds"] == {"sensitivity": 3, "search": 4, "check": 5, "allocator": 3}
    jobs = calibration["jobs"]
    assert set(jobs) == {"sensitivity", "search", "check"}
    assert jobs["sensitivity"] == outcome.table.calibration
    slots = {job: set(description["slots"]) for job, description in jobs.items()}
    assert len(slots["sensitivity"]) == 2 and len(slots["search"]) == 1 and len(slots["check"]) == 2
    assert not (slots["sensitivity"] & slots["search"] or slots["sensitivity"] & slots["check"]
                or slots["search"] & slots["check"])
    # On the tokens themselves, not only the slot numbers.
    windows = {job: rebuild_windows(loaded.tokenizer, description) for job, description in jobs.items()}
    for first, second in [("sensitivity", "search"), ("sensitivity", "check"), ("search", "check")]:
        assert shared_windows(windows[first], windows[second]) == []
    assert shared_windows(windows["check"], windows["check"]) == [(0, 0), (1, 1)]  # the comparison can fail


@pytest.mark.slow  # a whole GPTQ plan end to end
def test_gptq_options_are_fitted_on_windows_no_job_judges_on(loaded, tmp_path):
    outcome = run_plan(loaded, bits_per_weight=4.5, options="int2pc,gptq:int4pc,int8pc", calib=CALIBRATION_TEXT,
                       tokens=1024, check_tokens=1024, seed=3, table=tmp_path / "sens.json",
                       out=tmp_path / "plan.json", progress=False)
    provenance = Plan.load(tmp_path / "plan.json").meta["provenance"]
    assert provenance["seeds"]["statistics"] == 6
    jobs = provenance["calibration"]["jobs"]
    assert set(jobs) == {"sensitivity", "statistics", "check"}
    assert outcome.table.meta["statistics"] == jobs["statistics"]
    windows = {job: rebuild_windows(loaded.tokenizer, description) for job, description in jobs.items()}
    for first, second in [("sensitivity", "statistics"), ("statistics", "check"), ("sensitivity", "check")]:
        assert shared_windows(windows[first], windows[second]) == []
    # A reused table keeps its statistics windows, and a grown column is fitted on them too.
    again = run_plan(loaded, bits_per_weight=4.5, options="int2pc,gptq:int4pc,gptq:int8pc,int8pc",
                     calib=CALIBRATION_TEXT, tokens=1024, check_tokens=1024, seed=3, table=tmp_path / "sens.json",
                     progress=False)
    assert again.plan.meta["provenance"]["calibration"]["jobs"]["statistics"] == jobs["statistics"]
    assert SensitivityTable.load(tmp_path / "sens.json").meta["statistics"] == jobs["statistics"]


def test_table_fits_calibrated_options_on_the_statistics_windows(loaded):
    windows = token_windows(loaded.tokenizer, CALIBRATION_TEXT, tokens=512, seq_len=256, seed=1)
    other = token_windows(loaded.tokenizer, CALIBRATION_TEXT, tokens=512, seq_len=256, seed=2)
    in_sample = measure_sensitivity(loaded, windows, "int2pc,gptq:int2pc", progress=False)
    held_out = measure_sensitivity(loaded, windows, "int2pc,gptq:int2pc", statistics=other, progress=False)
    assert in_sample.meta["statistics"] is None and held_out.meta["statistics"] == other.describe()
    np.testing.assert_array_equal(in_sample.kl[:, 0], held_out.kl[:, 0])  # rounding to nearest needs none
    assert not np.allclose(in_sample.kl[:, 1], held_out.kl[:, 1])


def test_eval_refuses_windows_that_share_text_with_the_plan_calibration(loaded, tmp_path):
    lines = CALIBRATION_TEXT.read_text().splitlines(keepends=True)[:120]
    (tmp_path / "calib.txt").write_text("".join(lines))
    run_plan(loaded, bits_per_weight=4.5, options=OPTIONS, allocator="exact", calib=tmp_path / "calib.txt",
             tokens=1024, fitness_tokens=512, check_tokens=512, out=tmp_path / "plan.json", progress=False)
    # Not the same file: a copy with another first line is refused on its tokens.
    (tmp_path / "copy.txt").write_text("A different first line .\n" + "".join(lines[1:]))
    every_token = len(loaded.tokenizer((tmp_path / "copy.txt").read_text())["input_ids"]) // 512 * 512
    with pytest.raises(LayerwiseError, match=r"evaluation window \d+ of .*copy.txt shares text with calibration "
                                             r"window \d+ of .*calib.txt \(used for the plan's "):
        run_eval(STORIES, data=tmp_path / "copy.txt", plan=tmp_path / "plan.json", tokens=every_token,
                 progress=False)
    report = run_eval(STORIES, data=EVALUATION_TEXT, plan=tmp_path / "plan.json", tokens=every_token, progress=False)
    assert report["quantized"]["kl"] > 0


def test_eval_refuses_wikitext_valid_for_a_plan_calibrated_on_the_shipped_excerpt(loaded, table, tmp_path):
    outcome = run_plan(loaded, bits_per_weight=4.5, options=OPTIONS, tokens=1024, check_tokens=1024, seq_len=128,
                       progress=False)
    prose = outcome.plan.meta["provenance"]["calibration"]["domains"]["prose"]
    assert prose["default_excerpt_of"]["name"] == "WikiText-2 valid"
    outcome.plan.save(tmp_path / "plan.json")
    with pytest.raises(LayerwiseError, match="WikiText-2 valid, the text layerwise's default calibration excerpt"):
        run_eval(STORIES, data=CALIBRATION_TEXT, plan=tmp_path / "plan.json", tokens=2048, progress=False)


def test_run_plan_bad_input(loaded, table, tmp_path):
    path = table.save(tmp_path / "sens.json")
    with pytest.raises(LayerwiseError, match="below the smallest"):
        run_plan(loaded, bits_per_weight=1.0, table=path, estimator="measured", progress=False)
    with pytest.raises(LayerwiseError, match="unknown allocator"):
        run_plan(loaded, bits_per_weight=4.0, table=path, allocator="magic", estimator="measured", progress=False)
    assert not (tmp_path / "plan.json").exists()


def test_a_table_grows_by_the_options_it_lacks_and_serves_any_subset(loaded, table, tmp_path):
    path = table.save(tmp_path / "sens.json")
    asked = sensitivity_for(loaded, table=path, options="int8pc,int3pc,int2pc", estimator="measured", progress=False)
    assert asked.options == ["int8pc", "int3pc", "int2pc"]
    grown = SensitivityTable.load(path)
    assert grown.options == ["int2pc", "int4pc", "int8pc", "int3pc"] and grown.calibration == table.calibration
    np.testing.assert_array_equal(grown.kl[:, :3], table.kl)
    alone = measure_sensitivity(loaded, rebuild_windows(loaded.tokenizer, table.calibration), "int3pc", "sublayer",
                                progress=False)
    np.testing.assert_allclose(grown.kl[:, 3], alone.kl[:, 0], rtol=1e-5)
    np.testing.assert_array_equal(asked.kl, grown.kl[:, [2, 3, 0]])
    np.testing.assert_array_equal(asked.cost_bits, grown.cost_bits[:, [2, 3, 0]])
    assert not (tmp_path / "sens.json.progress").exists()
    moved = json.loads(path.read_text())
    moved["calibration"]["source"] = str(tmp_path / "gone.txt")
    (tmp_path / "moved.json").write_text(json.dumps(moved))
    with pytest.raises(LayerwiseError, match="cannot be found"):
        sensitivity_for(loaded, table=tmp_path / "moved.json", options="int6pc", estimator="measured", progress=False)
    with pytest.raises(LayerwiseError, match="different calibration windows"):
        table.joined(SensitivityTable.load(tmp_path / "moved.json").with_options(["int3pc"]))


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


def test_a_plan_on_several_domains_keeps_each_domain_apart(loaded, tmp_path):
    """Two calibration files: the table has one column set per file, equal to measuring that
    file's windows alone; every job takes disjoint windows of every file; the check reports each
    domain; and evaluation on a copy of one domain's text is refused."""
    from layerwise.data.domains import DEFAULT_DOMAINS
    from layerwise.data.windows import read_text

    code = tmp_path / "code.txt"
    code.write_text(read_text(DEFAULT_DOMAINS["code"])[0])
    outcome = run_plan(loaded, bits_per_weight=4.5, options=OPTIONS, calib=[CALIBRATION_TEXT, code], objective="worst",
                       estimator="measured", tokens=1024, check_tokens=1024, seq_len=128, table=tmp_path / "sens.json",
                       out=tmp_path / "plan.json", progress=False)
    table = outcome.table
    assert table.domains == ["valid", "code"]
    for name, description in table.calibration["domains"].items():
        alone = measure_sensitivity(loaded, rebuild_windows(loaded.tokenizer, description), OPTIONS, "sublayer",
                                    progress=False)
        np.testing.assert_allclose(table.domain_kl[name], alone.kl, rtol=1e-4, equal_nan=True)
    np.testing.assert_allclose(table.kl, (table.domain_kl["valid"] + table.domain_kl["code"]) / 2, equal_nan=True)
    report = outcome.report
    assert report["objective"] == "worst" and report["domains"] == ["valid", "code"]
    assert set(report["check"]["domains"]) == {"valid", "code"}
    for entry in report["check"]["domains"].values():
        assert entry["ratio_ci"][0] <= entry["ratio"] <= entry["ratio_ci"][1]
    if report["returned"] != "uniform":  # the promise: at least as good as uniform on every domain
        assert all(entry["margin"] >= 0 for entry in report["check"]["domains"].values())
    domains = Plan.load(tmp_path / "plan.json").meta["provenance"]["calibration"]["domains"]
    for name, record in domains.items():
        assert set(record["jobs"]) == {"sensitivity", "check"}
        slots = [set(job["slots"]) for job in record["jobs"].values()]
        assert len(slots[0]) == 4 and len(slots[1]) == 4 and not slots[0] & slots[1]
    copy = tmp_path / "copy.txt"
    copy.write_text("# another first line\n" + code.read_text())
    with pytest.raises(LayerwiseError, match=r"shares text with calibration window \d+ of .*code.txt \(used for the "
                                             r"plan's (sensitivity|check) \(code domain\)"):
        run_eval(STORIES, data=copy, plan=tmp_path / "plan.json", tokens=20 * 512, progress=False)


@torch.no_grad()
def test_the_checks_block_by_block_fitness_measures_what_klfitness_measures(loaded):
    """The never-worse check in memory on the CPU runs plans block by block a window at a time
    (`StreamedFitness`, a planned tied embedding looked up row by row and its head applied a slice
    at a time, never decoded whole): KLFitness's per-window KL, with GPTQ fitted on its own windows."""
    from layerwise.measure.streamed import StreamedFitness

    windows = token_windows(loaded.tokenizer, CALIBRATION_TEXT, tokens=512, seq_len=128, seed=3)
    statistics = token_windows(loaded.tokenizer, CALIBRATION_TEXT, tokens=512, seq_len=128, seed=4)
    table = measure_sensitivity(loaded, windows, "q4_0,q8_0,int3pc,gptq:int4pc", "sublayer", edges=True,
                                statistics=statistics, progress=False)
    assert table.units[0].kind == "embed"
    choices = [allocate(table.problem(table.budget_bits(bits)), "exact").choice for bits in (3.5, 5.0)]
    choices.append((0, *choices[0][1:]))  # the embedding at q4_0
    assert len({choice[0] for choice in choices}) == 3
    check = token_windows(loaded.tokenizer, CALIBRATION_TEXT, tokens=512, seq_len=128, seed=5)
    original = _weights(loaded)
    with KLFitness(loaded, table, check, statistics=statistics) as theirs, \
            StreamedFitness(loaded, table, check, statistics=statistics) as ours:
        for choice in choices:
            np.testing.assert_allclose(ours.window_kl(choice), theirs.window_kl(choice), rtol=1e-5, atol=1e-7)
    assert all(torch.equal(original[name], weight) for name, weight in _weights(loaded).items())
