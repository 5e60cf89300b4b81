"""The sensitivity table: for every unit and option, the KL to the base model on calibration
text when only that unit is quantized with that option, and what the unit then costs in bits.

One base pass caches every block's input and call arguments (and, for GPTQ/AWQ options, every
linear's input statistics). Quantizing unit u of block b changes nothing before block b, so each
entry re-runs only blocks b..L-1 and the head. The table is saved with the model's fingerprint
and the calibration text's hash, so allocations for many budgets reuse one measurement.
"""
from __future__ import annotations

import contextlib
import json
import math
import time
from dataclasses import dataclass, field, replace
from typing import Sequence
from pathlib import Path

import numpy as np
import torch

from layerwise.data.windows import TokenWindows
from layerwise.errors import LayerwiseError
from layerwise.evaluate.divergence import Reference
from layerwise.models.layout import blocks_of, linear_weight, set_linear_weight
from layerwise.models.loading import LoadedModel
from layerwise.plan.allocate import AllocationProblem
from layerwise.plan.objectives import objective_named, relative_to_uniform
from layerwise.plan.estimators import DEFAULT_ESTIMATOR, EstimateContext, estimator_named, measured_entry
from layerwise.plan.options import DROP, option_name, parse_option, parse_options
from layerwise.plan.units import EDGE_KINDS, Unit, block_modules, edge_units, units_of
from layerwise.profile.hooks import BlockCall, capture_blocks, scoped_hooks
from layerwise.profile.replay import StopForward, base_reference, block_calls, head_kl, hidden_without
from layerwise.quant.apply import InputStats, gather_inputs, quantize_linear
from layerwise.quant.config import QuantConfig
from layerwise.quant.imatrix import importance_digest
from layerwise.quant.qtensor import storage_bits
from layerwise.quant.size import size_report
from layerwise.util.files import read_artifact, write_text_atomic
from layerwise.util.meta import run_metadata
from layerwise.util.progress import progress_bars

SCHEMA = "layerwise.sensitivity"
SCHEMA_VERSION = 1


@dataclass
class SensitivityTable:
    model_fingerprint: str
    granularity: str
    units: list[Unit]
    options: list[str]  # option names (`layerwise.plan.options`)
    cost_bits: np.ndarray  # [U, O] stored bits of the unit's linears; NaN where the option cannot apply
    kl: np.ndarray  # [U, O] mean KL(base || only this unit quantized), nats per token; NaN where n/a
    unit_weights: np.ndarray  # [U] weights per unit
    other_bits: int  # everything outside the block linears, as stored unquantized (for byte budgets)
    calibration: dict
    cost: dict  # seconds and forward-pass equivalents spent measuring
    skipped: dict[str, str] = field(default_factory=dict)  # "unit option" -> why the option cannot apply
    meta: dict = field(default_factory=dict)
    # With several calibration domains: domain -> [U, O] KL on that domain's windows alone (`kl` is
    # then their average). Empty for one text.
    domain_kl: dict[str, np.ndarray] = field(default_factory=dict)

    @property
    def domains(self) -> list[str]:
        return list(self.domain_kl)

    def restricted(self, domains: list[str]) -> "SensitivityTable":
        """The table as if measured on these of its domains only (e.g. leaving one out)."""
        missing = [name for name in domains if name not in self.domain_kl]
        if missing:
            raise LayerwiseError(f"the sensitivity table has no column set for domain(s) {missing}; it was "
                                 f"measured on {self.domains or 'one text'}")
        kept = {name: self.domain_kl[name] for name in domains}
        calibration = dict(self.calibration)
        if "domains" in calibration:
            calibration["domains"] = {name: calibration["domains"][name] for name in domains}
        return replace(self, kl=np.mean(np.stack(list(kept.values())), axis=0), domain_kl=kept,
                       calibration=calibration)

    def with_options(self, names: Sequence[str]) -> "SensitivityTable":
        """The table's columns for these of its options, in this order (a table measured for more
        options serves a plan that may take fewer)."""
        missing = [name for name in names if name not in self.options]
        if missing:
            raise LayerwiseError(f"the sensitivity table has no column for option(s) {missing}; it was measured "
                                 f"for {','.join(self.options)}")
        columns = [self.options.index(name) for name in names]
        prefixes = [f"{unit.name} " for unit in self.units]
        skipped = {key: why for key, why in self.skipped.items()
                   if any(key == prefix + name for prefix in prefixes for name in names)}
        return replace(self, options=list(names), cost_bits=self.cost_bits[:, columns], kl=self.kl[:, columns],
                       skipped=skipped, domain_kl={d: kl[:, columns] for d, kl in self.domain_kl.items()})

    def joined(self, other: "SensitivityTable") -> "SensitivityTable":
        """This table with `other`'s columns appended: both measured on the same model, units and
        calibration windows, for different options (how a table grows by new options)."""
        if (self.model_fingerprint, self.granularity, [u.name for u in self.units]) != \
                (other.model_fingerprint, other.granularity, [u.name for u in other.units]):
            raise LayerwiseError("cannot join sensitivity tables of different models, units or granularity")
        if json.loads(json.dumps(self.calibration)) != json.loads(json.dumps(other.calibration)) or \
                self.domains != other.domains:
            raise LayerwiseError("cannot join sensitivity tables measured on different calibration windows")
        repeated = sorted(set(self.options) & set(other.options))
        if repeated:
            raise LayerwiseError(f"both sensitivity tables have option(s) {repeated}")
        ours, theirs = self.meta.get("statistics"), other.meta.get("statistics")
        if ours and theirs and json.loads(json.dumps(ours)) != json.loads(json.dumps(theirs)):
            raise LayerwiseError("cannot join sensitivity tables whose GPTQ/AWQ options were fitted on different "
                                 "windows")
        cost = {key: self.cost.get(key, 0) + other.cost.get(key, 0) for key in ("seconds", "forward_equivalents")}
        return replace(self, options=self.options + other.options, meta=self.meta | {"statistics": ours or theirs},
                       cost_bits=np.concatenate([self.cost_bits, other.cost_bits], axis=1),
                       kl=np.concatenate([self.kl, other.kl], axis=1), cost=self.cost | cost,
                       skipped=self.skipped | other.skipped,
                       domain_kl={d: np.concatenate([kl, other.domain_kl[d]], axis=1)
                                  for d, kl in self.domain_kl.items()})

    @property
    def configs(self) -> list[QuantConfig | str]:
        return [parse_option(name) for name in self.options]

    @property
    def estimator(self) -> str:
        """How the entries were obtained (`layerwise.plan.estimators`); tables from before there were
        several were all measured."""
        return self.meta.get("estimator", "measured")

    @property
    def edges(self) -> bool:
        """Whether the embedding and head are units of this table (`measure_sensitivity(edges=)`)."""
        return any(unit.kind in EDGE_KINDS for unit in self.units)

    @property
    def total_weights(self) -> int:
        return int(self.unit_weights.sum())

    def option_bits(self) -> dict[str, float]:
        """Average weights-bpw of each option applied everywhere it can (NaN if it cannot apply to
        every unit)."""
        totals = self.cost_bits.sum(axis=0)
        return {name: float(total / self.total_weights) for name, total in zip(self.options, totals)}

    def budget_bits(self, bits_per_weight: float | None = None, total_bytes: float | None = None,
                    planned_bytes: float | None = None) -> float:
        """A budget as total stored bits of the units, from an average bits per weight (scales
        counted), from total model bytes (the rest of the model stays as it is, counted at 16
        bits), or from the bytes the units' tensors may take together (`planned_bytes`, e.g. what
        a reference GGUF file's same tensors take)."""
        if sum(value is not None for value in (bits_per_weight, total_bytes, planned_bytes)) != 1:
            raise LayerwiseError("give exactly one budget: bits per weight, total bytes, or planned bytes")
        if bits_per_weight is not None:
            budget = float(bits_per_weight) * self.total_weights
            shown = f"{bits_per_weight} bits per weight"
        elif planned_bytes is not None:
            budget = 8.0 * float(planned_bytes)
            shown = f"{planned_bytes} bytes for the planned tensors"
        else:
            budget = 8.0 * float(total_bytes) - self.other_bits
            shown = f"{total_bytes} bytes"
        cost = np.where(np.isfinite(self.kl), self.cost_bits, np.nan)
        smallest, largest = np.nanmin(cost, axis=1).sum(), np.nanmax(cost, axis=1).sum()

        def explain(bits: float) -> str:
            return f"{bits / self.total_weights:.4f} bits per weight, {math.ceil((bits + self.other_bits) / 8)} bytes"

        if not math.isfinite(budget) or budget < smallest:
            raise LayerwiseError(f"budget {shown} is below the smallest plan these options allow "
                                 f"({explain(smallest)}, every unit at its cheapest option)")
        if budget > largest:
            raise LayerwiseError(f"budget {shown} is above the largest plan these options allow "
                                 f"({explain(largest)}, every unit at its costliest option): nothing to "
                                 "allocate; lower the budget or add a costlier option")
        return budget

    def problem(self, budget_bits: float, objective: str = "mean") -> AllocationProblem:
        """The allocation problem at this budget; with domains, `objective` combines them."""
        cost = np.nan_to_num(self.cost_bits, nan=0.0)
        names = (tuple(unit.name for unit in self.units), tuple(self.options))
        if not self.domain_kl:
            objective_named(objective)
            return AllocationProblem(*names, cost, self.kl, budget_bits)
        stack = np.stack([self.domain_kl[name] for name in self.domains])
        combined = objective_named(objective)
        if combined.per_uniform:
            stack = relative_to_uniform(stack, cost, budget_bits)
        return AllocationProblem(*names, cost, combined.unit_loss(stack), budget_bits, stack, objective)

    def check_model(self, loaded: LoadedModel) -> None:
        if self.model_fingerprint != loaded.fingerprint:
            raise LayerwiseError(f"the sensitivity table was measured on another model (fingerprint "
                                 f"{self.model_fingerprint[:16]}...), not {loaded.source.display}")

    def to_dict(self) -> dict:
        rows = _table_rows
        return {
            "schema": SCHEMA, "schema_version": SCHEMA_VERSION,
            "model_fingerprint": self.model_fingerprint, "granularity": self.granularity,
            "units": [{"name": u.name, "block": u.block, "modules": list(u.modules), "kind": u.kind}
                      for u in self.units],
            "options": self.options, "cost_bits": rows(self.cost_bits), "kl": rows(self.kl),
            "unit_weights": [int(n) for n in self.unit_weights], "other_bits": int(self.other_bits),
            "calibration": self.calibration, "cost": self.cost, "skipped": self.skipped, "meta": self.meta,
            "domain_kl": {name: rows(table) for name, table in self.domain_kl.items()},
        }

    def save(self, path: str | Path) -> Path:
        return write_text_atomic(path, json.dumps(self.to_dict(), indent=1) + "\n")

    @classmethod
    def load(cls, path: str | Path) -> "SensitivityTable":
        data = read_artifact(path, SCHEMA, SCHEMA_VERSION, "sensitivity table")
        try:
            units = [Unit(u["name"], int(u["block"]), tuple(u["modules"]), u.get("kind", "block")) for u in data["units"]]
            table = cls(
                data["model_fingerprint"], data["granularity"], units, list(data["options"]),
                np.array(data["cost_bits"], dtype=np.float64), np.array(data["kl"], dtype=np.float64),
                np.array(data["unit_weights"], dtype=np.int64), int(data["other_bits"]), data["calibration"],
                data["cost"], data.get("skipped", {}), data.get("meta", {}),
                {name: np.array(rows, dtype=np.float64) for name, rows in data.get("domain_kl", {}).items()},
            )
        except (KeyError, TypeError, ValueError) as error:
            raise LayerwiseError(f"{path} is not a complete sensitivity table ({type(error).__name__}: {error})") \
                from None
        shape = (len(units), len(table.options))
        if table.cost_bits.shape != shape or table.kl.shape != shape or \
                any(rows.shape != shape for rows in table.domain_kl.values()):
            raise LayerwiseError(f"{path}: tables of shape {table.kl.shape}, expected {shape}")
        return table


@dataclass
class _BaseRun:
    calls: list[list[BlockCall]]  # per batch, every block's input and call arguments
    references: list[Reference]  # per batch, the base model's next-token distributions
    stats: dict[tuple[str, str], InputStats]  # (module, algorithm) -> inputs for GPTQ/AWQ
    positions: int
    seconds: float
    inputs: list[torch.Tensor] = field(default_factory=list)  # per batch, the token ids


def edge_config(unit: Unit, config: QuantConfig) -> QuantConfig:
    """The config a unit really takes: outside the blocks (embedding, head) weights are rounded to
    nearest, as llama-quantize does (no calibration Hessian reaches them)."""
    if unit.kind in EDGE_KINDS and config.algorithm != "rtn":
        return config.replace(algorithm="rtn")
    return config


def _statistics_hooks(model, modules: list[str], algorithms: set[str]):
    """Empty GPTQ/AWQ input statistics of `modules`, and the hook registration that fills them."""
    stats = {(name, algorithm): InputStats() for name in modules for algorithm in algorithms}
    probe = {algorithm: QuantConfig(algorithm=algorithm, group_size=None) for algorithm in algorithms}

    def gather(name: str):
        def hook(module, args) -> None:
            for algorithm in algorithms:
                gather_inputs(stats[name, algorithm], args[0], probe[algorithm])
        return hook

    def register(handles: list) -> None:
        for name in modules if algorithms else ():
            handles.append(model.get_submodule(name).register_forward_pre_hook(gather(name)))

    return stats, register


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


def domain_means(window_values: np.ndarray, window_domains: Sequence[str]) -> dict[str, float]:
    """The mean of the per-window values of each domain, in order of first appearance."""
    names = list(dict.fromkeys(window_domains))
    labels = np.asarray(window_domains)
    return {name: float(np.mean(window_values[labels == name])) for name in names}


PROGRESS_SCHEMA = "layerwise.sensitivity-progress"


def _table_rows(table: np.ndarray) -> list:
    return [[None if not math.isfinite(v) else float(v) for v in row] for row in table]


def _save_progress(path: str | Path, key: dict, done: int, cost: np.ndarray, kl: np.ndarray, skipped: dict,
                   block_runs: float, seconds: float) -> None:
    state = {"schema": PROGRESS_SCHEMA, "schema_version": 1, "key": key, "units_done": done,
             "cost_bits": _table_rows(cost[:done]), "kl": _table_rows(kl[:done]), "skipped": skipped,
             "block_runs": block_runs, "seconds": seconds}
    write_text_atomic(path, json.dumps(state) + "\n")


def _restore_progress(path: str | Path, key: dict, cost: np.ndarray, kl: np.ndarray,
                      skipped: dict) -> tuple[int, float, float]:
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
    skipped.update(state["skipped"])
    return done, float(state["block_runs"]), float(state["seconds"])


def head_is_tied(loaded: LoadedModel) -> bool:
    """Whether the output head shares the token embedding's matrix."""
    model, adapter = loaded.model, loaded.adapter
    return model.get_submodule(adapter.lm_head).weight is model.get_submodule(adapter.embed).weight


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
    `estimator` (`layerwise.plan.estimators`) says how each entry is obtained: "measured" (the
    KL itself, the default), or a cheaper estimate of it ("auto": the one `compress` uses)."""
    method = estimator_named(estimator)
    importance = importance or {}
    configs = (options if options and all(isinstance(o, QuantConfig) or o == DROP for o in options)
               else parse_options(options))
    names = [option_name(config) for config in configs]
    loaded.require_in_memory("the sensitivity table")
    model, adapter = loaded.model, loaded.adapter
    units = units_of(adapter, loaded.n_blocks, granularity)
    if edges:
        units = edge_units(adapter, loaded.n_blocks, tied=head_is_tied(loaded)) + units
    if DROP in configs and granularity == "linear":
        raise LayerwiseError("the option 'drop' needs whole blocks or sublayers as units, not single linears; "
                             "use --granularity block or sublayer")
    modules = {name: model.get_submodule(name) for unit in units for name in unit.modules}
    _check_some_option_fits(units, configs, modules)
    algorithms = {config.algorithm for config in configs if config != DROP} - {"rtn"}
    started = time.perf_counter()
    base = base_pass(loaded, calibration, block_modules(units), algorithms, batch_size, statistics)
    statistics_record = statistics.describe() if statistics is not None and algorithms else None

    domains = list(dict.fromkeys(calibration.window_domains))
    cost = np.full((len(units), len(configs)), np.nan)
    kl = np.full((len(units), len(configs), len(domains)), np.nan)  # per domain, last axis
    kl_rows = kl.reshape(len(units), -1)  # a view: what the checkpoint saves and restores

    def by_domain(window_kl: np.ndarray) -> list[float]:
        return list(domain_means(window_kl, calibration.window_domains).values())  # in `domains` order
    skipped: dict[str, str] = {}
    n_blocks, head = loaded.n_blocks, head_cost_in_blocks(loaded)
    context = EstimateContext(loaded, base, modules, head, _kl_from, tuple(calibration.window_domains))
    block_runs = earlier_seconds = 0.0
    done = 0
    key = {"model": loaded.fingerprint, "calibration": calibration.describe(), "options": names,
           "importance": importance_digest(importance) if importance else None,
           "granularity": granularity, "units": [unit.name for unit in units], "statistics": statistics_record,
           "estimator": method.name}
    if checkpoint is not None and Path(checkpoint).exists():
        done, block_runs, earlier_seconds = _restore_progress(checkpoint, key, cost, kl_rows, skipped)

    def evaluate(u: int, o: int, entry) -> tuple[np.ndarray, float]:
        """Entry (u, o) by `entry`, with the unit quantized (or dropped) only meanwhile."""
        unit, config = units[u], configs[o]
        context.originals = {name: linear_weight(modules[name]).detach().clone() for name in unit.modules}
        if config == DROP:
            values, runs = entry(context, unit, unit.kind)
            return np.array(by_domain(values)), runs
        used = edge_config(unit, config)
        stored = {name: quantize_linear(name, modules[name], used, base.stats.get((name, used.algorithm)),
                                        importance.get(name)) for name in unit.modules}
        cost[u, o] = sum(q.n_bits for q in stored.values())
        try:
            for name, qtensor in stored.items():
                set_linear_weight(modules[name], qtensor.dequantize())
            values, runs = entry(context, unit, None)
        finally:  # an interruption must not leave the caller's model quantized
            for name, weight in context.originals.items():
                set_linear_weight(modules[name], weight)
        return np.array(by_domain(values)), runs

    with progress_bars(progress) as bars:
        task = bars.add_task(f"sensitivity ({method.name})", total=len(units) * len(configs),
                             completed=done * len(configs))
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
                               earlier_seconds + time.perf_counter() - started)
        if method.finishes:
            gains = bars.add_task(f"sensitivity ({method.name}): gains measured downstream", total=None)
            context.advance = lambda: bars.advance(gains)
        block_runs += method.finish(context, units, kl, evaluate)
    batches = len(base.calls)
    forward_equivalents = 1.0 + block_runs / ((n_blocks + head) * batches)
    other_bits = 8 * size_report(loaded, {})["total_bytes"] - 16 * sum(
        linear_weight(module).numel() for module in modules.values())
    # Every domain weighs the same in `kl`, however many windows it gave.
    domain_kl = {name: kl[:, :, d] for d, name in enumerate(domains)} if len(domains) > 1 else {}
    return SensitivityTable(
        loaded.fingerprint, granularity, units, names, cost, kl.mean(axis=2),
        np.array([sum(linear_weight(modules[n]).numel() for n in unit.modules) for unit in units]),
        int(other_bits), calibration.describe(),
        {"seconds": earlier_seconds + time.perf_counter() - started, "forward_seconds": base.seconds,
         "forward_equivalents": forward_equivalents, "positions": base.positions, "estimator": method.name},
        skipped, run_metadata() | {"model": loaded.describe(),
                                   "importance_sha256": importance_digest(importance) if importance else None,
                                   "statistics": statistics_record, "estimator": method.name},
        domain_kl,
    )
