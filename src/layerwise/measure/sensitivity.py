"""Filling the sensitivity table (`layerwise.plan.table`) by running the model: for every unit and
option, the KL to the base model on calibration text when only that unit is quantized with that
option (measured, or estimated more cheaply: `layerwise.measure.estimators`).

One base pass caches every block's input and call arguments (and, for GPTQ/AWQ options, every
linear's input statistics). Quantizing unit u of block b changes nothing before block b, so each
entry re-runs only blocks b..L-1 and the head. The table is saved with the model's fingerprint
and the calibration text's hash, so allocations for many budgets reuse one measurement. A streamed
model (one block's weights in memory at a time) is measured by `layerwise.measure.streamed`: the
same entries, all of a block's units at once.
"""
from __future__ import annotations

import contextlib
import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from layerwise.data.windows import TokenWindows
from layerwise.engine.divergence import Reference
from layerwise.engine.hooks import BlockCall, capture_blocks, scoped_hooks
from layerwise.engine.replay import StopForward, base_reference, block_calls, head_kl, hidden_without
from layerwise.engine.sliced_kl import plain_head
from layerwise.errors import LayerwiseError
from layerwise.measure.estimators import (DEFAULT_ESTIMATOR, EstimateContext, blocks_to_head, estimator_named,
                                         measured_entry)
from layerwise.models.layout import blocks_of, head_is_tied, linear_weight, set_linear_weight
from layerwise.models.loading import LoadedModel
from layerwise.plan.options import DROP, option_name, parse_options
from layerwise.plan.table import SensitivityTable, domain_means, edge_config, table_rows
from layerwise.plan.units import EDGE_KINDS, Unit, block_modules, edge_units, units_of
from layerwise.quant.activations import check_emulation
from layerwise.quant.config import QuantConfig
from layerwise.quant.imatrix import importance_digest
from layerwise.quant.linear import InputStats, input_statistics_hooks, quantize_linear
from layerwise.quant.qtensor import storage_bits
from layerwise.quant.size import size_report
from layerwise.util.files import read_artifact, write_text_atomic
from layerwise.util.meta import run_metadata
from layerwise.util.progress import progress_bars


@dataclass
class _BaseRun:
    calls: list[list[BlockCall]]  # per batch, every block's input and call arguments
    references: list[Reference]  # per batch, the base model's next-token distributions
    stats: dict[tuple[str, str], InputStats]  # (module, algorithm) -> inputs for GPTQ/AWQ
    positions: int
    seconds: float
    inputs: list[torch.Tensor] = field(default_factory=list)  # per batch, the token ids


def _statistics_hooks(model, modules: list[str], algorithms: set[str]):
    """Empty GPTQ/AWQ input statistics of `modules` ((module, algorithm) -> statistics, shared
    by linears that read the same input), and the hook registration that fills them."""
    return input_statistics_hooks(model, {name: set(algorithms) for name in modules} if algorithms else {})


@torch.no_grad()
def input_statistics(loaded: LoadedModel, windows: TokenWindows, modules: list[str], algorithms: set[str],
                     batch_size: int) -> dict[tuple[str, str], InputStats]:
    """(module, algorithm) -> what GPTQ/AWQ need of the module's inputs on `windows`, from the
    unquantized model."""
    stats, register = _statistics_hooks(loaded.model, modules, algorithms)
    if algorithms and modules:
        with scoped_hooks(register):
            for batch in windows.batches(batch_size):
                loaded.model(input_ids=batch.to(loaded.input_device), use_cache=False)
    return stats


@torch.no_grad()
def base_pass(loaded: LoadedModel, windows: TokenWindows, modules: list[str], algorithms: set[str],
              batch_size: int, statistics: TokenWindows | None = None) -> _BaseRun:
    """One forward pass over `windows` keeping what re-running any suffix of blocks needs, and the
    GPTQ/AWQ input statistics of `modules` gathered on `statistics` (other windows, so that what
    is measured on `windows` is how a calibrated quantizer does on text it was not fitted on;
    None: on `windows` themselves, in the same pass)."""
    model, adapter = loaded.model, loaded.adapter
    start = time.perf_counter()
    if statistics is None:
        stats, register = _statistics_hooks(model, modules, algorithms)
    else:
        stats, register = input_statistics(loaded, statistics, modules, algorithms, batch_size), lambda handles: None
    all_calls, references, inputs, positions = [], [], [], 0
    for batch in windows.batches(batch_size):
        calls: list[BlockCall] = []
        final: list[torch.Tensor] = []

        def keep(call: BlockCall) -> None:
            calls.append(BlockCall(call.index, h_in=call.h_in, args=call.args, kwargs=call.kwargs))
            if call.index == loaded.n_blocks - 1:
                final.append(call.h_out)
                raise StopForward

        ids = batch.to(loaded.input_device)
        with scoped_hooks(register), capture_blocks(model, adapter, keep, keep_call=True), \
                contextlib.suppress(StopForward):
            model(input_ids=ids, use_cache=False)
        references.append(base_reference(model, adapter, final[0]))
        all_calls.append(calls)
        inputs.append(ids)
        positions += ids.shape[0] * (ids.shape[1] - 1)
    return _BaseRun(all_calls, references, stats, positions, time.perf_counter() - start, inputs)


def _kl_from(model, adapter, base: _BaseRun, block: int, removed: str | None) -> np.ndarray:
    """Mean KL to the base of every window, the model as it now is, run from block `block`'s cached
    inputs (with that block's `removed` unit skipped, if given; block -1: from the tokens); the
    head is applied a chunk of positions at a time."""
    values = []
    for batch, reference in enumerate(base.references):
        if block < 0:
            hidden = block_calls(model, adapter, base.inputs[batch])[1]
        else:
            hidden = hidden_without(model, adapter, base.calls[batch], block, removed)
        values.extend(head_kl(model, adapter, hidden, reference.part))
    return np.asarray(values, dtype=np.float64)


PROGRESS_SCHEMA = "layerwise.sensitivity-progress"


def _save_progress(path: str | Path, key: dict, done: int, cost: np.ndarray, kl: np.ndarray, skipped: dict,
                   block_runs: float, seconds: float, tail: np.ndarray) -> None:
    state = {"schema": PROGRESS_SCHEMA, "schema_version": 1, "key": key, "units_done": done,
             "cost_bits": table_rows(cost[:done]), "kl": table_rows(kl[:done]), "skipped": skipped,
             "block_runs": block_runs, "seconds": seconds, "tail_kl": table_rows(tail[:done])}
    write_text_atomic(path, json.dumps(state) + "\n")


def _restore_progress(path: str | Path, key: dict, cost: np.ndarray, kl: np.ndarray,
                      skipped: dict, tail: np.ndarray) -> tuple[int, float, float]:
    state = read_artifact(path, PROGRESS_SCHEMA, 1, "sensitivity checkpoint")
    saved = state.get("key")
    if isinstance(saved, dict):  # checkpoints from before there were estimators were all measured
        saved = {"estimator": "measured", "statistics": None} | saved
    if saved != json.loads(json.dumps(key)):
        raise LayerwiseError(f"{path} is the checkpoint of another measurement (other model, text, options or "
                             "granularity); delete it to start afresh")
    done = int(state["units_done"])
    cost[:done] = np.array(state["cost_bits"], dtype=np.float64).reshape(done, cost.shape[1])
    kl[:done] = np.array(state["kl"], dtype=np.float64).reshape(done, kl.shape[1])
    if "tail_kl" in state:  # checkpoints from before tails were kept leave them NaN: the table then has none
        tail[:done] = np.array(state["tail_kl"], dtype=np.float64).reshape(done, tail.shape[1])
    skipped.update(state["skipped"])
    return done, float(state["block_runs"]), float(state["seconds"])


def head_cost_in_blocks(loaded: LoadedModel) -> float:
    """The LM head's cost in units of one block's cost (by weights multiplied per token)."""
    head = loaded.model.get_submodule(loaded.adapter.lm_head).weight.numel()
    block = sum(p.numel() for p in blocks_of(loaded.model, loaded.adapter)[0].parameters())
    return head / block


def _check_some_option_fits(units: list[Unit], configs: list, modules: dict) -> None:
    """Fail before any pass when a unit can take none of the options (e.g. no group size that
    divides its rows), rather than after the whole table when the budget is set."""
    for unit in units:
        reasons = []
        for config in configs:
            if config == DROP and unit.kind not in EDGE_KINDS:
                break
            if config == DROP:
                continue
            try:
                for name in unit.modules:
                    storage_bits(edge_config(unit, config), tuple(linear_weight(modules[name]).shape))
                break
            except LayerwiseError as error:
                reasons.append(str(error))
        else:
            raise LayerwiseError(f"no option applies to {unit.name}: {reasons[0] if reasons else 'none given'}. "
                                 "Add an option that fits it, e.g. whole rows (int4pc) or a group size that "
                                 "divides its rows")


def evaluate_entry(context: EstimateContext, unit: Unit, config, stats: dict, importance: dict,
                   entry) -> tuple[np.ndarray, float, float | None]:
    """Entry (unit, option) by `entry` (an `estimators.Entry`): its per-window values, the block
    evaluations spent and the unit's stored bits under the option (None for "drop"), the unit
    quantized (GPTQ/AWQ from `stats`) or dropped only meanwhile; an option that does not apply
    raises LayerwiseError before any weight changes."""
    modules = context.modules
    context.originals = {name: linear_weight(modules[name]).detach().clone() for name in unit.modules}
    if config == DROP:
        values, runs = entry(context, unit, unit.kind)
        return values, runs, None
    used = edge_config(unit, config)
    stored = {name: quantize_linear(name, modules[name], used, stats.get((name, used.algorithm)),
                                    importance.get(name)) for name in unit.modules}
    try:
        for name, qtensor in stored.items():
            set_linear_weight(modules[name], qtensor.dequantize())
        values, runs = entry(context, unit, None)
    finally:  # an interruption must not leave the caller's model quantized
        for name, weight in context.originals.items():
            set_linear_weight(modules[name], weight)
    return values, runs, float(sum(q.n_bits for q in stored.values()))


def _entry_evaluator(context: EstimateContext, units: list[Unit], configs: list, importance: dict):
    """(u, o, entry) -> `evaluate_entry` of entry (u, o), with the base pass's statistics."""
    def evaluate(u: int, o: int, entry) -> tuple[np.ndarray, float, float | None]:
        return evaluate_entry(context, units[u], configs[o], context.base.stats, importance, entry)

    return evaluate


def entry_measurer(loaded: LoadedModel, table: SensitivityTable, calibration: TokenWindows, *,
                   importance: dict[str, np.ndarray] | None = None, statistics: TokenWindows | None = None,
                   batch_size: int = 4) -> Callable[[int, int], tuple[np.ndarray, float]]:
    """A function measuring entry (unit u, option o) of `table` exactly as `measure_sensitivity`
    would on its windows `calibration` (re-cut), returning the KL per domain (in `table.domains`
    order; one value for a table of one text) and the forward passes spent; the base pass it needs
    is run once, here, and counted in the first entry's passes."""
    if loaded.streamed is not None:
        from layerwise.measure.estimated import StreamedEntryMeasurer

        return StreamedEntryMeasurer(loaded, table.units, table.configs, table.domains, calibration,
                                     importance=importance, statistics=statistics, batch_size=batch_size)
    model = loaded.model
    modules = {name: model.get_submodule(name) for unit in table.units for name in unit.modules}
    configs = table.configs
    algorithms = {config.algorithm for config in configs if config != DROP} - {"rtn"}
    base = base_pass(loaded, calibration, block_modules(table.units), algorithms, batch_size, statistics)
    head = head_cost_in_blocks(loaded)
    context = EstimateContext(loaded, base, modules, head, _kl_from, tuple(calibration.window_domains))
    entry_of = _entry_evaluator(context, table.units, configs, importance or {})
    domains = table.domains or list(dict.fromkeys(calibration.window_domains))
    per_pass = (loaded.n_blocks + head) * len(base.calls)
    first = True

    def measure(u: int, o: int) -> tuple[np.ndarray, float]:
        nonlocal first
        with torch.no_grad():
            values, runs, _ = entry_of(u, o, measured_entry)
        means = domain_means(values, calibration.window_domains)
        spent = runs / per_pass + (1.0 if first else 0.0)  # the base pass, once
        first = False
        return np.array([means[name] for name in domains]), spent

    return measure


def measured_passes(loaded: LoadedModel, table: SensitivityTable) -> float:
    """What the measured table of `table`'s units and options costs, counted as `measure_sensitivity`
    counts: one base pass, then for every entry the blocks from the unit's on and the head."""
    return 1.0 + sum(entry_passes(loaded, unit) * np.isfinite(table.kl[u]).sum() for u, unit in enumerate(table.units))


def entry_passes(loaded: LoadedModel, unit: Unit) -> float:
    """Forward passes (of the table's windows) one measured entry of `unit` costs."""
    head = head_cost_in_blocks(loaded)
    return blocks_to_head(loaded.n_blocks, unit.block, head) / (loaded.n_blocks + head)


def runs_block_major(loaded: LoadedModel, estimator: str) -> bool:
    """Whether a table runs a block's entries together and sums KL over head slices
    (`measure.streamed`): always when streamed, and in memory for a measured table on the CPU
    (the embedding and head as units or not), which then keeps no input of every
    block and no base distributions (those take 2 GB for 4096 positions of a 128k vocabulary).
    Estimated tables, heads other than a plain linear and models on a GPU (where this way has not
    been run yet) replay each entry from every block's cached inputs instead."""
    in_memory_ok = estimator == "measured" and plain_head(loaded) and loaded.input_device.type == "cpu"
    return loaded.streamed is not None or in_memory_ok


@torch.no_grad()
def measure_sensitivity(
    loaded: LoadedModel,
    calibration: TokenWindows,
    options: str | list[str] | list[QuantConfig | str],
    granularity: str = "sublayer",
    *,
    batch_size: int = 4,
    importance: dict[str, np.ndarray] | None = None,
    edges: bool = False,
    statistics: TokenWindows | None = None,
    estimator: str = DEFAULT_ESTIMATOR,
    progress: bool = True,
    checkpoint: str | Path | None = None,
    emulation: str = "float",
) -> SensitivityTable:
    """KL(base || model with only unit u quantized by option o) for every unit and option.

    The option "drop" removes the unit instead (block and sublayer granularity only): it costs
    no bits, and its KL is the unit's ablation KL. With `checkpoint` (a file path), the rows
    measured so far are saved after every unit, and a run that finds the file resumes after the
    last saved unit (one base pass is repeated); the result is the same as an uninterrupted run.
    The caller deletes the checkpoint once the table is saved. `importance` (module -> column
    weights of an importance matrix) weights GGUF options' rounding, as `quantize` will. With
    `edges`, the token embedding and the output head (one unit when tied) are units too, rounded
    to nearest under every option (`edge_config`); an entry for the embedding re-runs the whole
    model. GPTQ/AWQ options take their input statistics from `statistics`, windows other than the
    table's (None: the table's own, which flatters them: fitted and judged on the same text).
    `estimator` (`layerwise.measure.estimators`) says how each entry is obtained: "measured" (the
    KL itself, the default), or a cheaper estimate of it ("auto": the one `compress` uses).
    `emulation` "llama-cpu" measures each quantized unit with its inputs rounded as llama.cpp's CPU
    backend rounds them for its GGUF type (`layerwise.quant.activations`; measured tables on the
    CPU only). A measured table run a block at a time (`runs_block_major`: on the CPU or streamed)
    also keeps every entry's tail KL (`tail_kl`: the mean KL of its worst 1% of tokens, `tail_mean`)."""
    method = estimator_named(estimator)
    check_emulation(emulation)
    importance = importance or {}
    configs = (options if options and all(isinstance(o, QuantConfig) or o == DROP for o in options)
               else parse_options(options))
    names = [option_name(config) for config in configs]
    streaming = loaded.streamed is not None
    block_major = runs_block_major(loaded, method.name)
    if emulation != "float" and not (block_major and method.name == "measured"):
        raise LayerwiseError(f"emulation {emulation!r} needs a measured table on the CPU with a plain linear head "
                             f"(estimator {method.name!r}, model on {loaded.input_device.type})")
    model, adapter = loaded.model, loaded.adapter
    units = units_of(adapter, loaded.n_blocks, granularity)
    if edges:
        units = edge_units(adapter, loaded.n_blocks, tied=head_is_tied(model, adapter)) + units
    if DROP in configs and granularity == "expert":
        raise LayerwiseError("the option 'drop' takes whole blocks or sublayers; routed experts are dropped by "
                             "`layerwise drop MODEL --experts N` (the same number from every block, as the config "
                             "counts them once); use --granularity block or sublayer")
    if DROP in configs and granularity in ("linear", "tensor"):
        raise LayerwiseError("the option 'drop' needs whole blocks or sublayers as units, not single linears; "
                             "use --granularity block or sublayer")
    modules = {name: model.get_submodule(name) for unit in units for name in unit.modules}
    _check_some_option_fits(units, configs, modules)
    algorithms = {config.algorithm for config in configs if config != DROP} - {"rtn"}
    started = time.perf_counter()
    base = None if block_major else base_pass(loaded, calibration, block_modules(units), algorithms, batch_size,
                                              statistics)
    statistics_record = statistics.describe() if statistics is not None and algorithms else None

    domains = list(dict.fromkeys(calibration.window_domains))
    cost = np.full((len(units), len(configs)), np.nan)
    kl = np.full((len(units), len(configs), len(domains)), np.nan)  # per domain, last axis
    kl_rows = kl.reshape(len(units), -1)  # a view: what the checkpoint saves and restores
    tail = np.full((len(units), len(configs)), np.nan)  # `tail_mean` of measured entries' token KLs

    def by_domain(window_kl: np.ndarray) -> list[float]:
        return list(domain_means(window_kl, calibration.window_domains).values())  # in `domains` order
    skipped: dict[str, str] = {}
    n_blocks, head = loaded.n_blocks, head_cost_in_blocks(loaded)
    block_runs = earlier_seconds = 0.0
    done = 0
    key = {"model": loaded.fingerprint, "calibration": calibration.describe(), "options": names,
           "importance": importance_digest(importance) if importance else None,
           "granularity": granularity, "units": [unit.name for unit in units], "statistics": statistics_record,
           "estimator": method.name}
    if emulation != "float":  # a float table's key (and its checkpoints) stay as they were
        key["emulation"] = emulation
    if checkpoint is not None and Path(checkpoint).exists():
        done, block_runs, earlier_seconds = _restore_progress(checkpoint, key, cost, kl_rows, skipped, tail)

    with progress_bars(progress) as bars:
        task = bars.add_task(f"sensitivity ({method.name}{', streamed' if streaming else ''})",
                             total=len(units) * len(configs), completed=done * len(configs))
        if block_major:
            from layerwise.measure.streamed import measure_entries

            def record(u: int, o: int, values: np.ndarray | None, bits: float | None, why: str | None,
                       runs: float, tail_kl: float | None = None) -> None:
                nonlocal block_runs
                if why is not None:
                    skipped[f"{units[u].name} {names[o]}"] = why
                else:
                    kl[u, o] = by_domain(values)
                    cost[u, o] = 0.0 if bits is None else bits
                    tail[u, o] = np.nan if tail_kl is None else tail_kl
                    block_runs += runs
                bars.advance(task)

            def block_done(units_done: int) -> None:
                if checkpoint is not None:
                    _save_progress(checkpoint, key, units_done, cost, kl_rows, skipped, block_runs,
                                   earlier_seconds + time.perf_counter() - started, tail)

            if method.name == "measured":
                run = measure_entries(loaded, calibration, units, configs, modules, importance=importance,
                                      statistics=statistics, batch_size=batch_size, head=head, record=record,
                                      first_unit=done, block_done=block_done, emulation=emulation)
            else:  # an estimate of a streamed model
                from layerwise.measure.estimated import estimate_entries

                run, prepared, context = estimate_entries(
                    loaded, calibration, units, configs, modules, method=method, importance=importance,
                    statistics=statistics, batch_size=batch_size, head=head, record=record, first_unit=done,
                    block_done=block_done)
                block_runs += prepared
                if method.finishes:
                    from layerwise.measure.estimated import finish_streamed

                    gains = bars.add_task(f"sensitivity ({method.name}): gains measured downstream", total=None)
                    context.advance = lambda: bars.advance(gains)
                    block_runs += finish_streamed(context, method, units, configs, kl, calibration, domains,
                                                  importance=importance, statistics=statistics,
                                                  batch_size=batch_size)
            forward_seconds, positions, batches = run.seconds, run.positions, run.batches
        else:
            forward_seconds, positions, batches = base.seconds, base.positions, len(base.calls)
            context = EstimateContext(loaded, base, modules, head, _kl_from, tuple(calibration.window_domains))
            entry_of = _entry_evaluator(context, units, configs, importance)

            def evaluate(u: int, o: int, entry) -> tuple[np.ndarray, float]:
                values, runs, bits = entry_of(u, o, entry)
                if bits is not None:
                    cost[u, o] = bits
                return np.array(by_domain(values)), runs

            block_runs += method.prepare(context)
            for u, unit in enumerate(units):
                if u < done:
                    continue
                entry = measured_entry if unit.kind in EDGE_KINDS else method.entry
                for o, config in enumerate(configs):
                    if config == DROP and unit.kind in EDGE_KINDS:
                        skipped[f"{unit.name} {names[o]}"] = "the embedding and head cannot be dropped"
                        bars.advance(task)
                        continue
                    if config == DROP:
                        cost[u, o] = 0.0
                    try:
                        kl[u, o], runs = evaluate(u, o, entry)
                    except LayerwiseError as error:
                        skipped[f"{unit.name} {names[o]}"] = str(error)
                        bars.advance(task)
                        continue
                    block_runs += runs
                    bars.advance(task)
                if checkpoint is not None:
                    _save_progress(checkpoint, key, u + 1, cost, kl_rows, skipped, block_runs,
                                   earlier_seconds + time.perf_counter() - started, tail)
            if method.finishes:
                gains = bars.add_task(f"sensitivity ({method.name}): gains measured downstream", total=None)
                context.advance = lambda: bars.advance(gains)
            block_runs += method.finish(context, units, kl, evaluate)
    forward_equivalents = 1.0 + block_runs / ((n_blocks + head) * batches)
    other_bits = 8 * size_report(loaded, {})["total_bytes"] - 16 * sum(
        linear_weight(module).numel() for module in modules.values())
    # Every domain weighs the same in `kl`, however many windows it gave.
    domain_kl = {name: kl[:, :, d] for d, name in enumerate(domains)} if len(domains) > 1 else {}
    # Tails only where every entry has one: a missing one would forbid its option silently.
    measured = np.isfinite(kl).all(axis=2)
    has_tail = bool(measured.any()) and bool(np.isfinite(tail[measured]).all())
    return SensitivityTable(
        loaded.fingerprint, granularity, units, names, cost, kl.mean(axis=2),
        np.array([sum(linear_weight(modules[n]).numel() for n in unit.modules) for unit in units]),
        int(other_bits), calibration.describe(),
        {"seconds": earlier_seconds + time.perf_counter() - started, "forward_seconds": forward_seconds,
         "forward_equivalents": forward_equivalents, "positions": positions, "estimator": method.name},
        skipped, run_metadata() | {"model": loaded.describe(),
                                   "importance_sha256": importance_digest(importance) if importance else None,
                                   "statistics": statistics_record, "estimator": method.name}
        | ({"emulation": emulation} if emulation != "float" else {}),
        domain_kl,
        tail if has_tail else None,
    )
