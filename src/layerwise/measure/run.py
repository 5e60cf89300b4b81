"""`layerwise plan` from Python: a sensitivity table (measured or reused), an allocation under a
budget, checked against uniform on held-out windows, and the plan that applies it."""
from __future__ import annotations

import json
import math
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Sequence

import numpy as np

from layerwise.data.domains import Calibration, domain_slots, parts_of, take_from_domains
from layerwise.data.overlap import rebuild_windows
from layerwise.data.windows import (DEFAULT_CALIBRATION_NAME, DEFAULT_CALIBRATION_PARENT, TextSlots, TokenWindows,
                                    token_windows)
from layerwise.engine.sliced_kl import plain_head
from layerwise.errors import LayerwiseError
from layerwise.measure.estimators import DEFAULT_ESTIMATOR, estimator_named
from layerwise.measure.refine import REFINE_SHARE, check_share, refine_table, save_refined
from layerwise.measure.sensitivity import measure_sensitivity, runs_block_major
from layerwise.models.loading import LoadedModel, load_model
from layerwise.plan.allocate import ALLOCATORS, SEARCHING, allocate, uniform_choices_that_fit
from layerwise.plan.problem import Allocation, AllocationProblem
from layerwise.plan.check import check_against_uniform
from layerwise.plan.objectives import DEFAULT_OBJECTIVE, objective_named
from layerwise.plan.options import DROP, option_name, parse_option, parse_options
from layerwise.plan.plan import Plan
from layerwise.plan.table import SensitivityTable, check_tail_weight, edge_config
from layerwise.quant.activations import check_emulation
from layerwise.quant.imatrix import importance_digest
from layerwise.util.files import check_output, write_text_atomic
from layerwise.util.meta import file_fingerprint, run_metadata
from layerwise.util.progress import progress_bars

DEFAULT_OPTIONS = "int2g64,int3g64,int4g64,int5g64,int6g64,int8g64"
# Allocators that search under the measured KL of whole plans rather than the table alone.


def plan_from_choice(table: SensitivityTable, choice: Sequence[int], meta: dict | None = None) -> Plan:
    """One rule per linear, naming it exactly: the plan reads the same in any tool. Units whose
    option is "drop" go to the plan's drop list instead."""
    configs = table.configs
    rules = tuple((module, edge_config(unit, configs[option])) for unit, option in zip(table.units, choice)
                  if configs[option] != DROP for module in unit.modules)
    drop = tuple(unit.name for unit, option in zip(table.units, choice) if configs[option] == DROP)
    return Plan(None, rules, table.model_fingerprint, meta or {}, drop)


def sensitivity_for(
    loaded: LoadedModel,
    *,
    table: str | Path | None = None,
    options: str | Sequence[str] | None = None,
    granularity: str | None = None,
    calib: str | Path | None = None,
    tokens: int = 4096,
    seq_len: int = 512,
    seed: int = 0,
    windows: TokenWindows | None = None,
    importance: dict | None = None,
    edges: bool = False,
    statistics: TokenWindows | None = None,
    estimator: str = DEFAULT_ESTIMATOR,
    emulation: str = "float",
    progress: bool = True,
) -> SensitivityTable:
    """The table at `table` if it exists (checked against the model and granularity asked for),
    else a new measurement on `windows` (default: `tokens` of `calib` drawn with `seed`), saved to
    `table` when a path is given. An existing table serves any subset of its options; options it
    lacks are measured on its own calibration windows (re-cut from their files) and added to it.
    `importance` (module -> importance-matrix column weights) weights GGUF options; a table
    measured with other weights (or none) is refused. `edges`: the embedding and head are units
    (`measure_sensitivity`); a table measured with or without them serves only the same.
    `statistics`: the windows GPTQ/AWQ options take their input statistics from (`measure_sensitivity`).
    `estimator`: how entries are obtained (`layerwise.measure.estimators`); a table filled by another
    is refused. `emulation`: how quantized units compute (`measure_sensitivity`); a table measured
    otherwise is refused."""
    digest = importance_digest(importance) if importance else None
    if table is not None and Path(table).exists():
        found = SensitivityTable.load(table)
        found.check_model(loaded)
        if found.meta.get("importance_sha256") != digest:
            def said(value):
                return f"importance matrix {value}" if value else "no importance matrix"
            raise LayerwiseError(f"{table} was measured with {said(found.meta.get('importance_sha256'))}, this plan "
                                 f"asks for {said(digest)}; measure a new table (another --table path)")
        asked = estimator_named(estimator).name
        if found.estimator != asked:
            raise LayerwiseError(f"{table} was filled by the {found.estimator!r} estimator, not {asked!r}; "
                                 "measure a new table (another --table path) or ask for the same estimator")
        if granularity is not None and granularity != found.granularity:
            raise LayerwiseError(f"{table} was measured per {found.granularity}, not per {granularity}")
        if found.meta.get("emulation", "float") != emulation:
            raise LayerwiseError(f"{table} was measured with emulation {found.meta.get('emulation', 'float')!r}, this "
                                 f"plan asks for {emulation!r}; measure a new table (another --table path)")
        if found.edges != edges:
            raise LayerwiseError(f"{table} was measured {'with' if found.edges else 'without'} the embedding and "
                                 f"head as units; this plan needs a table {'with' if edges else 'without'} them "
                                 "(another --table path)")
        if options is None:
            return found
        wanted = [option_name(config) for config in parse_options(options)]
        missing = [name for name in wanted if name not in found.options]
        if missing:
            found = _grown(loaded, found, table, missing, importance, statistics, progress, emulation)
        return found.with_options(wanted)
    if windows is None:
        windows = token_windows(loaded.tokenizer, calib, tokens=tokens, seq_len=seq_len, seed=seed)
    checkpoint = progress_file(table) if table is not None else None
    measured = measure_sensitivity(loaded, windows, options or DEFAULT_OPTIONS, granularity or "sublayer",
                                   importance=importance, edges=edges, statistics=statistics, estimator=estimator,
                                   progress=progress, checkpoint=checkpoint, emulation=emulation)
    if table is not None:
        measured.save(table)
        checkpoint.unlink(missing_ok=True)
    return measured


def _grown(loaded: LoadedModel, found: SensitivityTable, table: str | Path, missing: list[str],
           importance: dict | None, statistics: TokenWindows | None, progress: bool,
           emulation: str = "float") -> SensitivityTable:
    """`found` with columns for the `missing` options, measured on its own windows; saved."""
    windows = rebuild_windows(loaded.tokenizer, found.calibration)
    if windows is None:
        raise LayerwiseError(f"{table} lacks option(s) {','.join(missing)} and its calibration text cannot be "
                             "found to measure them on the same windows; measure a new table (another --table path)")
    checkpoint = progress_file(table)
    extra = measure_sensitivity(loaded, windows, missing, found.granularity, importance=importance, edges=found.edges,
                                statistics=statistics, estimator=found.estimator, progress=progress,
                                checkpoint=checkpoint, emulation=emulation)
    grown = found.joined(extra)
    grown.save(table)
    checkpoint.unlink(missing_ok=True)
    return grown


def progress_file(output: str | Path) -> Path:
    """Where a long run that writes `output` keeps its checkpoint: beside it, until it is done."""
    output = Path(output)
    return output.with_name(output.name + ".progress")


@dataclass
class PlanOutcome:
    plan: Plan
    allocation: Allocation
    table: SensitivityTable
    report: dict = field(default_factory=dict)


def taken_slots(slots: dict[str, TextSlots], *descriptions: dict | None) -> dict[str, set[int]]:
    """Per domain, the slots that windows `descriptions` (`TokenWindows.describe()`s) share text with."""
    return {name: set().union(*(text.touched_by(part) for description in descriptions if description
                                for part in parts_of(description).values()))
            for name, text in slots.items()}


def statistics_windows(loaded: LoadedModel, slots: dict[str, TextSlots], table_calibration: dict,
                       recorded: dict | None, tokens: int, seed: int) -> TokenWindows:
    """The windows GPTQ/AWQ options are fitted on in the table, the search and the check: those a
    reused table recorded (when they can be re-cut), else `tokens` drawn with `seed` + 3 from slots
    the table does not use. The search and the check are then drawn from slots outside them too, so
    no job judges a calibrated quantizer on the text it was fitted on."""
    known = {text.text_sha256 for text in slots.values()}
    if recorded and all(part.get("text_sha256") in known for part in parts_of(recorded).values()):
        rebuilt = rebuild_windows(loaded.tokenizer, recorded)
        if rebuilt is not None:
            return rebuilt
    return take_from_domains(slots, tokens, seed + 3, exclude=taken_slots(slots, table_calibration))


def calibration_jobs(slots: dict[str, TextSlots], table_calibration: dict, fitness_tokens: int,
                     check_tokens: int, seed: int, search: bool = True,
                     statistics: TokenWindows | None = None) -> dict[str, TokenWindows]:
    """Windows for the search's fitness (if `search`) and for the never-worse check: in every
    domain, slots that neither the sensitivity table, the GPTQ/AWQ `statistics` nor the other job
    uses. The statistics are recorded as a job of their own."""
    taken = taken_slots(slots, table_calibration, statistics.describe() if statistics is not None else None)
    jobs = {} if statistics is None else {"statistics": statistics}
    if search:
        jobs["search"] = take_from_domains(slots, fitness_tokens, seed + 1, exclude=taken)
        for name, part in _parts(jobs["search"], list(slots)).items():
            taken[name] |= set(part.slots)
    jobs["check"] = take_from_domains(slots, check_tokens, seed + 2, exclude=taken)
    return jobs


def _parts(windows: TokenWindows, names: list[str]) -> dict[str, TokenWindows]:
    """Each domain's windows of a job (`names`: the domains, in order; one name for one text)."""
    return dict(windows.parts) if windows.parts is not None else {names[0]: windows}


def calibration_provenance(slots: dict[str, TextSlots], table: SensitivityTable,
                           jobs: dict[str, TokenWindows]) -> dict:
    """What plan.json records of its calibration: the text of every domain, and the windows of
    every job (one text: as before domains existed; several: one such record per domain)."""
    table_parts = parts_of(table.calibration)

    def record(name: str, text: TextSlots) -> dict:
        same_text = [part for part in table_parts.values() if part.get("text_sha256") == text.text_sha256]
        table_windows = same_text[0] if same_text else (table.calibration if len(slots) == 1 else None)
        document = {"source": text.source, "text_sha256": text.text_sha256, "seq_len": text.seq_len,
                    "bos_token_id": text.bos_id,
                    "jobs": {"sensitivity": table_windows} | {job: _parts(w, list(slots))[name].describe()
                                                              for job, w in jobs.items()}}
        if text.source == DEFAULT_CALIBRATION_NAME:
            document["default_excerpt_of"] = DEFAULT_CALIBRATION_PARENT
        return document

    if len(slots) == 1:
        return record(*next(iter(slots.items())))
    document = {"domains": {name: record(name, text) for name, text in slots.items()}}
    known = {text.text_sha256 for text in slots.values()}
    elsewhere = {name: part for name, part in table_parts.items() if part.get("text_sha256") not in known}
    if elsewhere:  # a reused table measured on other texts: its windows are calibration too
        document["table_elsewhere"] = {"jobs": {f"sensitivity ({name})": part for name, part in elsewhere.items()}}
    return document


def table_for_domains(table: SensitivityTable, slots: dict[str, TextSlots]) -> SensitivityTable:
    """The table's columns for exactly the calibration domains given, when it has them all (same
    names, same texts): a table measured on four domains serves a plan calibrated on three."""
    parts = parts_of(table.calibration)
    if table.domains and all(parts.get(name, {}).get("text_sha256") == text.text_sha256
                             for name, text in slots.items()):
        return table.restricted(list(slots)) if len(slots) > 1 else _one_domain(table, next(iter(slots)))
    return table


def _one_domain(table: SensitivityTable, name: str) -> SensitivityTable:
    return replace(table, kl=table.domain_kl[name], domain_kl={}, calibration=parts_of(table.calibration)[name])


def run_plan(
    model: str | Path | LoadedModel,
    *,
    bits_per_weight: float | None = None,
    total_bytes: float | None = None,
    budget_like: str | Path | None = None,
    options: str | Sequence[str] | None = None,
    allocator: str = "exact",
    objective: str = DEFAULT_OBJECTIVE,
    tail_weight: float = 0.0,
    granularity: str | None = None,
    table: str | Path | None = None,
    calib: Calibration = None,
    tokens: int = 4096,
    fitness_tokens: int = 2048,
    check_tokens: int = 4096,
    statistics_tokens: int = 16384,
    estimator: str = DEFAULT_ESTIMATOR,
    refine: float | None = None,
    seq_len: int = 512,
    generations: int = 10,
    offspring: int = 16,
    seed: int = 0,
    out: str | Path | None = None,
    overwrite: bool = False,
    imatrix: str | Path | None = None,
    dtype: str = "auto",
    device: str = "cpu",
    device_map: str | None = None,
    streaming: bool | None = False,
    emulate: str = "float",
    progress: bool = True,
) -> PlanOutcome:
    """Allocate options to units under a budget (average bits per weight of the block linears,
    scales counted, or total model bytes) and return the plan, never worse than uniform.
    `budget_like` (a GGUF file of the same model, e.g. llama-quantize's Q4_K_M) makes the token
    embedding and output head units too, and gives the planned tensors at most the bytes the
    file's same tensors take, so that the exported GGUF is no larger than it.

    Calibration text comes in domains (`calib`: None for the shipped mix of prose, code, verse and
    tables; one file; several files, one domain each; or a mapping name -> file). Each domain is cut
    into window slots once; the sensitivity table, the search's fitness and the never-worse check
    each get their own, disjoint slots of every domain (all recorded in the plan), tokens split
    evenly over domains. `estimator` fills the table (`layerwise.measure.estimators`: "measured", the
    default, or a cheaper estimate; "auto" is the cheap one bench/sensitivity.py supports, with the
    entries the plan hinges on measured). `refine`: with an estimated table, this plan measures the
    entries it hinges on until the estimate's passes and its own reach this share of the measured
    table's (`layerwise.measure.refine`; None: REFINE_SHARE for "auto", else 0); they are saved in
    the table, and a later plan on it measures only entries not measured yet. The
    table keeps a column set per domain and `objective` (`layerwise.plan.objectives`) says how the
    allocator weighs them; `tail_weight` w prices every entry at its KL plus w times its tail KL
    (the mean KL of its worst 1% of calibration tokens: `SensitivityTable.problem`), which a
    measured table on the CPU or streamed records. The check measures the plan and every uniform
    option that fits the
    budget on every domain's held-out windows; unless the
    plan is at least as good as each of them on every domain, a safer plan (the "worst"-domain
    optimum) is tried, then the best uniform plan is returned (and said so); per-domain margins
    come with paired 95% bootstrap intervals. GPTQ/AWQ options are measured with Hessians (or
    inputs) from the unquantized model, an approximation of the sequential calibration
    `quantize_` then runs, gathered on `statistics_tokens` (as many as `quantize` fits on by
    default) of slots of their own, so that the table, the search and the check judge GPTQ on text
    it was not fitted on, as the user's will be. `imatrix` (a llama-imatrix or `layerwise imatrix`
    file) weights the GGUF options' rounding in the table, the search and the check; the plan
    records it, and `quantize`/`export` of the plan use it. `streaming` reads one block at a time
    from disk (`layerwise.measure.streamed`; None: only when the model would not fit in memory):
    the measured table (`budget_like` too), the searches and the check; not yet estimated tables.
    `emulate` "llama-cpu" measures the table, the searches and the check with every GGUF-typed
    unit's inputs rounded as llama.cpp's CPU backend rounds them (`layerwise.quant.activations`),
    so that the plan minimises the KL llama.cpp will show (measured tables on the CPU only)."""
    if allocator not in ALLOCATORS:
        raise LayerwiseError(f"unknown allocator {allocator!r}; registered: {', '.join(sorted(ALLOCATORS))}")
    estimator_named(estimator)
    if refine is not None:
        check_share(refine)
    if allocator == "ordering":
        raise LayerwiseError("the ordering allocator needs importance scores; call "
                             "layerwise.plan.allocate(problem, 'ordering', scores=...) from Python")
    objective_named(objective)
    check_tail_weight(tail_weight)  # before any measuring
    check_emulation(emulate)
    if emulate != "float" and estimator != "measured":
        raise LayerwiseError(f"--emulate {emulate} needs the measured table (--estimator measured), not {estimator!r}")
    if sum(budget is not None for budget in (bits_per_weight, total_bytes, budget_like)) != 1:
        raise LayerwiseError("give exactly one budget: bits per weight, total bytes, or a GGUF file to be no "
                             "larger than (--budget, --budget-bytes, --budget-like)")
    if out is not None:
        check_output(out, overwrite)
    loaded = model if isinstance(model, LoadedModel) else load_model(model, dtype=dtype, device=device,
                                                                      device_map=device_map, streaming=streaming)
    searching = allocator in SEARCHING
    edges = budget_like is not None
    reference = _reference(loaded, budget_like) if edges else None  # refused before any measuring
    slots = domain_slots(loaded.tokenizer, calib,
                         seq_len=min(seq_len, tokens, check_tokens, *([fitness_tokens] if searching else [])))
    new_table = table is None or not Path(table).exists()
    if tail_weight and new_table and not runs_block_major(loaded, estimator):
        raise LayerwiseError("a tail weight needs tail KLs, which only a measured table on the CPU or streamed records "
                             f"(estimator {estimator!r}, model on {loaded.input_device.type})")
    table_windows = take_from_domains(slots, tokens, seed) if new_table else None
    existing = None if new_table else SensitivityTable.load(table)
    asked = options if options is not None else (existing.options if existing is not None else DEFAULT_OPTIONS)
    importance, imatrix_record = plan_importance(loaded, asked, granularity, imatrix)
    statistics = None
    if any(config != DROP and config.algorithm != "rtn" for config in parse_options(asked)):
        statistics = statistics_windows(
            loaded, slots, existing.calibration if existing is not None else table_windows.describe(),
            existing.meta.get("statistics") if existing is not None else None, statistics_tokens, seed)
    if loaded.streamed is not None:
        loaded.set_tokenizer_aside()  # the text is tokenized (read again if a reused table is re-cut)
    measured = sensitivity_for(loaded, table=table, options=options, granularity=granularity,
                               windows=table_windows, importance=importance, edges=edges, statistics=statistics,
                               estimator=estimator, emulation=emulate, progress=progress)
    if reference is not None:
        budget = measured.budget_bits(planned_bytes=reference.planned_bytes)
    else:
        budget = measured.budget_bits(bits_per_weight, total_bytes)
    if refine is None:
        refine = REFINE_SHARE if estimator == "auto" else 0.0
    refinement = None
    if refine > 0 and measured.estimator != "measured":
        windows = table_windows if new_table else rebuild_windows(loaded.tokenizer, measured.calibration)
        if windows is None:
            raise LayerwiseError(f"{table}'s calibration text cannot be found to measure the entries the plan hinges "
                                 "on (--refine 0 plans on the estimate alone)")

        def problem_for(current: SensitivityTable) -> AllocationProblem:
            return table_for_domains(current, slots).problem(budget, objective, tail_weight)

        measured, refinement = refine_table(loaded, measured, windows, problem_for, share=refine,
                                            importance=importance, statistics=statistics, progress=progress)
        if table is not None and refinement["entries"]:
            save_refined(table, measured)
    sensitivity = table_for_domains(measured, slots)
    problem = sensitivity.problem(budget, objective, tail_weight)
    jobs = calibration_jobs(slots, sensitivity.calibration, fitness_tokens, check_tokens, seed, search=searching,
                            statistics=statistics)

    fitness_windows = jobs["search"] if searching else jobs["check"]
    # Block by block a window at a time, each plan quantized on the way: streamed, and in memory for
    # the check alone on the CPU, where a planned embedding is then never decoded whole (0.2x of
    # SmolLM2 at the peak of a plan like a GGUF file).
    # An emulated plan is measured there too, searches included: only it rounds the inputs.
    if loaded.streamed is not None or ((not searching or emulate != "float") and plain_head(loaded)
                                       and loaded.input_device.type == "cpu"):
        from layerwise.measure.streamed import StreamedFitness

        fitness = StreamedFitness(loaded, sensitivity, fitness_windows, problem=problem, importance=importance,
                                  statistics=statistics, emulation=emulate)
    else:
        if emulate != "float":
            raise LayerwiseError(f"--emulate {emulate} measures plans on the CPU with a plain linear head")
        from layerwise.measure.fitness import KLFitness  # torch-heavy; only the plan command needs it

        # The bank of stored quantized weights pays off only when a search revisits (unit, option)
        # pairs; the check alone measures each plan once, so it quantizes on the way.
        fitness = KLFitness(loaded, sensitivity, fitness_windows, problem=problem, importance=importance,
                            statistics=statistics, bank_bytes=None if searching else 0)
    with fitness, progress_bars(progress) as bars:
        settings = {}
        if searching:
            search_task = bars.add_task("plan search (whole plans measured)", total=None)
            measured_plans = [0]

            def measured_fitness(choice: Sequence[int], stage: int) -> float:
                value = fitness(choice, stage)
                if stage > 0:
                    measured_plans[0] += 1
                    bars.advance(search_task)
                return value

            settings = dict(fidelities=measured_fitness, survivors=[max(1, offspring // 4), 1],
                            generations=generations, offspring=offspring, seed=seed)
            if out is not None:
                settings["checkpoint"] = progress_file(out)
        chosen = allocate(problem, allocator, **settings)
        if searching:
            bars.update(search_task, total=measured_plans[0])  # the search's length is known only now
        held_out = fitness.held_out(jobs["check"]) if searching else fitness.base
        # A safer plan to fall back on before uniform: the worst-domain optimum of the table.
        fallbacks = []
        if len(sensitivity.domains) > 1 and objective != "worst":
            safer = allocate(sensitivity.problem(budget, "worst", tail_weight), "exact")
            if safer.choice != chosen.choice:
                fallbacks.append(Allocation.of(problem, safer.choice, "exact (worst domain)"))
        checking = bars.add_task("never-worse check (plans measured)",
                                 total=len(uniform_choices_that_fit(problem)) + 1 + len(fallbacks))

        def window_kl(choice: Sequence[int]) -> np.ndarray:
            values = fitness.window_kl(choice, held_out)
            bars.advance(checking)
            return values

        check = check_against_uniform(problem, chosen, window_kl, jobs["check"].window_domains, fallbacks)
        checked = check.returned
        report = {
            "allocator": allocator, "objective": objective, "tail_weight": tail_weight,
            "returned": checked.allocator,
            "domains": sensitivity.domains or list(slots),
            "bits_per_weight": checked.total_cost / sensitivity.total_weights,
            "total_bytes": math.ceil((checked.total_cost + sensitivity.other_bits) / 8),
            "budget_bits_per_weight": budget / sensitivity.total_weights,
            # In nats: a relative objective's own total is a share of uniform's, not a KL, and a
            # tail-weighted one adds tail KLs.
            "predicted_kl": (sensitivity.problem(budget).total_loss(checked.choice)
                             if objective_named(objective).per_uniform or tail_weight
                             else problem.total_loss(checked.choice)),
            "predicted_tail_kl": (float(sensitivity.tail_kl[np.arange(len(checked.choice)), list(checked.choice)].sum())
                                  if sensitivity.tail_kl is not None else None),
            "planned_bytes": math.ceil(checked.total_cost / 8),
            "budget_like": reference.describe() if reference is not None else None,
            "calibration_kl": (check.uniform[check.best_uniform]["kl"] if checked.allocator == "uniform"
                               else check.plan_kl),
            "search_kl": chosen.fitness if searching else None,
            "check": check.to_dict(),
            "search": {"fitness_calls": fitness.calls, "forward_equivalents": fitness.forward_equivalents(),
                       "seconds": fitness.seconds},
            "sensitivity_cost": sensitivity.cost,
            "refinement": refinement,
            "options": {unit.name: label if label == DROP else option_name(edge_config(unit, parse_option(label)))
                        for unit, label in zip(sensitivity.units, checked.labels(problem))},
        }
    provenance = run_metadata() | {
        "model": loaded.describe(), "calibration": calibration_provenance(slots, sensitivity, jobs),
        "options": list(sensitivity.options), "granularity": sensitivity.granularity, "allocator": allocator,
        "objective": objective, "tail_weight": tail_weight, "estimator": sensitivity.estimator,
        "seeds": {"sensitivity": sensitivity.calibration.get("seed"), "check": seed + 2, "allocator": seed}
        | ({"search": seed + 1} if searching else {}) | ({"statistics": seed + 3} if statistics is not None else {}),
        "table": str(table) if table is not None else None, "imatrix": imatrix_record, "emulation": emulate,
        "budget_like": reference.describe() if reference is not None else None,
    }
    plan = plan_from_choice(sensitivity, checked.choice, {
        "allocation": {k: v for k, v in report.items() if k != "options"}, "provenance": provenance})
    if out is not None:
        plan.save(out)
        write_text_atomic(Path(out).with_suffix(".report.json"),
                          json.dumps(run_metadata() | {"model": loaded.describe(), **report}, indent=1) + "\n")
        progress_file(out).unlink(missing_ok=True)
    return PlanOutcome(plan, checked, sensitivity, report)


def _reference(loaded: LoadedModel, path: str | Path):
    """The sizes, in the GGUF at `path`, of every tensor a plan like it chooses for: the block
    linears (whatever the granularity), the token embedding and an untied head."""
    from layerwise.models.gguf_reference import read_reference
    from layerwise.models.layout import block_linears, head_is_tied
    from layerwise.plan.units import edge_units

    edges = edge_units(loaded.adapter, loaded.n_blocks, tied=head_is_tied(loaded.model, loaded.adapter))
    modules = [name for unit in edges for name in unit.modules]
    return read_reference(loaded, path, modules + [name for _, name, _ in block_linears(loaded.model, loaded.adapter)])


def plan_importance(loaded: LoadedModel, options: str | Sequence[str], granularity: str | None,
                    imatrix: str | Path | None) -> tuple[dict | None, dict | None]:
    """Column weights for the plan's units from `imatrix`, and what the plan records of it."""
    if imatrix is None:
        return None, None
    from layerwise.plan.units import units_of
    from layerwise.quant.imatrix import Imatrix, imatrix_applies, importance_digest, importance_for

    if not any(imatrix_applies(config) for config in parse_options(options) if config != DROP):
        raise LayerwiseError("an importance matrix weights GGUF block types (q4_k, q5_0, ...) rounded to nearest, "
                             "and none of the plan's options is one")
    modules = [name for unit in units_of(loaded.adapter, loaded.n_blocks, granularity or "sublayer")
               for name in unit.modules]
    # The head's entry too, where the file has one: it weights the embedding/head unit of plans
    # that choose its type (--budget-like).
    importance = importance_for(loaded, Imatrix.load(imatrix), modules, head=True)
    return importance, {"file": str(Path(imatrix).resolve()), "sha256": file_fingerprint(imatrix),
                        "importance_sha256": importance_digest(importance)}
