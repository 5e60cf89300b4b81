"""The measured sensitivity table (streamed or in memory) and the KLs of whole plans (streamed, or
the check in memory) (issue 17): one block's weights in memory at a time when streamed, and no
input of every block and no vocabulary-wide distributions kept either way.

Replayed (`measure.sensitivity`'s way for estimated tables), every entry re-runs blocks b..L-1
from block b's cached input against stored base distributions: every block's inputs and a
distribution per position stay in memory, and streamed, a block would be read from the
checkpoint for every entry and batch. Here the entries whose unit lies in block b run together
instead: block b is read once for all of its units' options, each later block once for all of
their outputs, which wait in a scratch file between blocks (`TensorSlots`). Only the base
model's current block input is kept, and GPTQ/AWQ statistics are gathered for one block at a
time.

The head is read a slice of vocabulary rows at a time, once per round of entries, and KL is
summed over the slices: KL = sum p log p - sum p z + logsumexp(z) * sum p, with z the variant's
logits, p the base model's probabilities (rounded as the in-memory reference stores them) and a
running log-sum-exp, so no position's full distribution is ever in memory. The numbers are the
replayed ones up to float rounding (the same windows run through the same blocks; only the sums
over the vocabulary are ordered otherwise: measured within 2e-7 nats on stories260K).

The embedding and head as units (plans like a GGUF file) are measured this way too: a quantized
embedding only at the rows of the calibration's tokens (`embedding_rows_transformed`) and a
quantized head a slice of rows at a time, both rounded to nearest, whose groups lie within a row,
so the values are those of the whole matrix quantized, and no quantized copy of either is made.
"""
from __future__ import annotations

import contextlib
import time
from dataclasses import dataclass
from typing import Callable, Iterator, Sequence

import numpy as np
import torch
from torch import nn

from layerwise.data.windows import TokenWindows
from layerwise.engine.hooks import BlockCall, advance_batches, run_batches, run_block, scoped_hooks, take_first_inputs
from layerwise.engine.replay import calls_of, first_block_input, last_block_outputs, removed_unit
from layerwise.engine.sliced_kl import SlicedKL, plain_head
from layerwise.errors import LayerwiseError
from layerwise.measure.estimators import RoundingNoise, blocks_to_head
from layerwise.measure.fitness import table_prediction
from layerwise.measure.sensitivity import _statistics_hooks, head_cost_in_blocks
from layerwise.models.layout import blocks_of, head_is_tied, linear_weight, stored_transposed
from layerwise.models.loading import LoadedModel
from layerwise.models.streaming import embedding_rows_transformed, held
from layerwise.plan.options import DROP
from layerwise.plan.objectives import objective_named
from layerwise.plan.table import domain_means, edge_config, tail_mean
from layerwise.plan.units import EDGE_KINDS, Unit
from layerwise.quant.activations import InputRounding, input_rounding, rounded
from layerwise.quant.linear import InputStats, quantize_linear
from layerwise.quant.qtensor import group_spans, storage_bits
from layerwise.quant.rtn import quantize_weight
from layerwise.util.tensor_files import TensorSlots, TensorSpill

# Weights of the embedding or head quantized at once by a plan's edge options.
_QUANTIZED_ELEMENTS = 1 << 18


def refuse_unless_streamable(loaded: LoadedModel, what: str) -> None:
    """What the streamed table and check cannot do yet, refused before any work."""
    if not plain_head(loaded):
        raise LayerwiseError(f"{what} on a streamed model needs a plain linear head; load it without --streaming")


def _part(loaded: LoadedModel, index: int) -> str:
    return f"{loaded.adapter.blocks}.{index}"


def _statistics(model: nn.Module, block: nn.Module, names: list[str], algorithms: set[str],
                calls: list[list[BlockCall]], hidden: list[torch.Tensor], index: int) -> dict:
    """(module, algorithm) -> GPTQ/AWQ input statistics of `names` (linears of `block`, block
    `index`), from running the block on `hidden` with the base weights."""
    stats, register = _statistics_hooks(model, names, algorithms)
    if stats:
        with scoped_hooks(register):
            for batch, state in zip(calls, hidden):
                run_block(block, batch[index], state)
    return stats


@contextlib.contextmanager
def _weights_as(modules: dict[str, nn.Module], decoded: dict[str, torch.Tensor | None]) -> Iterator[None]:
    """Modules (of a held block) with other [out, in] weights for the duration (None: zero weights
    and biases, a dropped unit as `KLFitness` drops it), then their own again: the own tensors are
    set aside, not copied (a block's worth of memory)."""
    own = {name: modules[name].weight.data for name in decoded}
    biases = {name: modules[name].bias.detach().clone() for name, weight in decoded.items()
              if weight is None and getattr(modules[name], "bias", None) is not None}
    try:
        for name, weight in decoded.items():
            values = torch.zeros_like(own[name]) if weight is None else weight.t() if stored_transposed(
                modules[name]) else weight
            modules[name].weight.data = values.to(own[name].dtype).contiguous()
        for name in biases:
            modules[name].bias.data.zero_()
        yield
    finally:
        for name, weight in own.items():
            modules[name].weight.data = weight
        for name, bias in biases.items():
            modules[name].bias.data.copy_(bias)


@dataclass
class StreamedEntries:
    """`measure_entries`' base pass: its seconds, positions and batches."""
    seconds: float
    positions: int
    batches: int


@torch.no_grad()
def measure_entries(loaded: LoadedModel, calibration: TokenWindows, units: list[Unit], configs: list,
                    modules: dict[str, nn.Module], *, importance: dict, statistics: TokenWindows | None,
                    batch_size: int, head: float,
                    record: Callable[..., None],
                    first_unit: int = 0, block_done: Callable[[int], None] = lambda units_done: None,
                    wanted: set[int] | None = None, emulation: str = "float") -> StreamedEntries:
    """Every entry (unit u >= `first_unit`, and in `wanted` if given; option o) of the measured
    table (of a streamed model, or of one in memory, whose blocks are then at hand):
    `record(u, o, per-window KL, stored bits, why skipped, block evaluations, tail KL)` for each
    (counted as the in-memory table counts them; the tail KL, `tail_mean` of every position's, is
    given for measured entries only), a block's entries at a time, then `block_done(units done)`.
    With `emulation` "llama-cpu" a quantized unit's inputs are rounded as llama.cpp's CPU backend
    rounds them (`layerwise.quant.activations`)."""
    refuse_unless_streamable(loaded, "the sensitivity table")
    model, adapter, streamed = loaded.model, loaded.adapter, loaded.streamed
    blocks = blocks_of(model, adapter)
    algorithms = {config.algorithm for config in configs if config != DROP} - {"rtn"}
    started = time.perf_counter()
    # KL runs take a window per batch: each block is read once for all batches either way, so a
    # larger batch would only add activations. GPTQ/AWQ statistics take the in-memory run's
    # batches (`batch_size`), which sum to the same Hessians to the bit.
    calls = calls_of(loaded, calibration)
    stat_calls = calls_of(loaded, statistics or calibration, batch_size) if algorithms else []
    kl = SlicedKL(loaded, last_block_outputs(loaded, calls), torch.float16)
    base_seconds = time.perf_counter() - started
    positions = sum(batch[0].h_in.shape[0] * (batch[0].h_in.shape[1] - 1) for batch in calls)
    by_block: dict[int, list[int]] = {}
    measured = [u for u in range(first_unit, len(units)) if wanted is None or u in wanted]
    edges = [u for u in measured if units[u].kind in EDGE_KINDS]
    for u in measured:
        if units[u].kind not in EDGE_KINDS:
            by_block.setdefault(units[u].block, []).append(u)
    hidden, stat_hidden = take_first_inputs(calls), take_first_inputs(stat_calls)
    shapes, device = [state.shape for state in hidden], hidden[0].device
    slots = TensorSlots([(shape[0] * shape[1], shape[2]) for shape in shapes], hidden[0].dtype)
    rounding = InputRounding({name: modules[name] for u in measured if units[u].kind not in EDGE_KINDS
                              for name in units[u].modules}, emulation)

    def put(slot: int, states: list[torch.Tensor]) -> None:
        slots.write(slot, [state.reshape(-1, state.shape[-1]) for state in states])

    def states_of(slot: int) -> list[torch.Tensor]:
        return [state.reshape(shape).to(device) for state, shape in zip(slots.read(slot), shapes)]

    def rows_of(slot: int, part: int, window: int, start: int, stop: int) -> torch.Tensor:
        first = window * shapes[part][1]
        return slots.read_rows(slot, part, first + start, first + stop).to(device)

    try:
        if edges:
            _measure_edges(loaded, calibration, [(u, units[u]) for u in edges], configs, modules, importance, calls,
                           kl, put, states_of, rows_of, head, record, emulation)
            block_done(max(edges) + 1)
        for index, block in enumerate(blocks):
            if not by_block.keys() - set(range(index)):
                break  # no entries left
            entries: list[tuple[int, int, float | None]] = []
            todo = by_block.get(index, [])
            with held(streamed, _part(loaded, index)):
                if todo:
                    names = [name for u in todo for name in units[u].modules]
                    stats = _statistics(model, block, names, algorithms, stat_calls, stat_hidden, index)
                    for u in todo:
                        for o, config in enumerate(configs):
                            outputs, bits = _entry_outputs(block, adapter, modules, units[u], config, stats,
                                                           importance, calls, hidden, index, record, u, o, rounding)
                            if outputs is not None:
                                put(len(entries), outputs)
                                entries.append((u, o, bits))
                    del stats
                hidden = advance_batches(block, calls, hidden, index)
                stat_hidden = advance_batches(block, stat_calls, stat_hidden, index)
            if entries:
                for later in range(index + 1, len(blocks)):
                    with held(streamed, _part(loaded, later)):
                        for slot in range(len(entries)):
                            put(slot, run_batches(blocks[later], calls, states_of(slot), later))
                for slot in range(len(entries)):
                    put(slot, [kl.normed(state) for state in states_of(slot)])
                tokens = kl.token_kl(len(entries), rows_of)
                runs = blocks_to_head(loaded.n_blocks, index, head) * len(calls)
                for slot, (u, o, bits) in enumerate(entries):
                    record(u, o, tokens[slot].mean(axis=-1), bits, None, runs, tail_mean(tokens[slot]))
            if todo:
                block_done(max(todo) + 1)
    finally:
        slots.close()
        rounding.close()
    return StreamedEntries(base_seconds, positions, len(calls))


def _measure_edges(loaded: LoadedModel, calibration: TokenWindows, edges: list[tuple[int, Unit]], configs: list,
                   modules: dict[str, nn.Module], importance: dict, calls: list[list[BlockCall]], kl: SlicedKL,
                   put, states_of, rows_of, head: float, record, emulation: str = "float") -> None:
    """The entries of the embedding and an untied head (units of plans like a GGUF file), rounded
    to nearest: an embedding's variant runs every block from its first inputs (the rows of the
    calibration's tokens, quantized), a head's takes the base model's last block outputs; the head
    of each (a tied one is the embedding) is quantized a slice of rows at a time, its inputs
    rounded as `emulation` says (an embedding's lookup is not a matrix product: nothing to round)."""
    model, adapter, streamed = loaded.model, loaded.adapter, loaded.streamed
    tied = head_is_tied(model, adapter)  # quantizing the embedding then quantizes the head
    entries: list[tuple[int, int, float, Unit]] = []
    heads: list[Callable | None] = []
    head_inputs = []  # per entry, the rounding of the head's inputs (None: as they are)
    for u, unit in edges:
        (name,) = unit.modules
        shape = tuple(linear_weight(modules[name]).shape)
        for o, config in enumerate(configs):
            if config == DROP:
                record(u, o, None, None, "the embedding and head cannot be dropped", 0.0)
                continue
            used = edge_config(unit, config)
            try:
                group_spans(shape[1], used, name)  # quantize_linear's own refusal, before any work
            except LayerwiseError as error:
                record(u, o, None, None, str(error), 0.0)
                continue
            quantized = rows_quantized(used, name, importance.get(name))
            head_input = input_rounding(used, shape[1], emulation) if unit.kind == "head" or tied else None
            if unit.kind == "embed":
                with embedding_rows_transformed(loaded, quantized):
                    put(len(entries), [first_block_input(model, adapter, ids.to(loaded.input_device))
                                       for ids in calibration.batches(1)])
            else:
                put(len(entries), [rounded(final, head_input) for final in kl.finals])  # already normed
            entries.append((u, o, float(storage_bits(used, shape)), unit))
            head_inputs.append(head_input)
            heads.append(quantized if unit.kind == "head" or tied else None)
    embeds = [slot for slot, entry in enumerate(entries) if entry[3].kind == "embed"]
    if embeds:
        for index, block in enumerate(blocks_of(model, adapter)):
            with held(streamed, _part(loaded, index)):
                for slot in embeds:
                    put(slot, run_batches(block, calls, states_of(slot), index))
        for slot in embeds:
            put(slot, [rounded(kl.normed(state), head_inputs[slot]) for state in states_of(slot)])
    tokens = kl.token_kl(len(entries), rows_of, heads)
    for slot, (u, o, bits, unit) in enumerate(entries):
        record(u, o, tokens[slot].mean(axis=-1), bits, None, blocks_to_head(loaded.n_blocks, unit.block, head) * len(calls),
               tail_mean(tokens[slot]))


def rows_quantized(config, name: str, importance: np.ndarray | None) -> Callable[[torch.Tensor], torch.Tensor]:
    """rows -> the rows rounded to nearest under `config` and decoded, in their dtype (GGUF types
    and groups lie within a row, so rows quantize alike alone or in the whole matrix). A few rows
    at a time: the quantizers' temporaries are several times their input."""
    def quantize(rows: torch.Tensor) -> torch.Tensor:
        out = torch.empty_like(rows)
        step = max(1, _QUANTIZED_ELEMENTS // rows.shape[1])
        for start in range(0, rows.shape[0], step):
            part = rows[start:start + step].float()
            out[start:start + step] = quantize_weight(part, config, name, importance).dequantize().to(out.device)
        return out
    return quantize


def _entry_outputs(block, adapter, modules, unit: Unit, config, stats, importance, calls, hidden, index, record,
                   u: int, o: int, rounding: InputRounding | None = None) -> tuple[list[torch.Tensor] | None, float | None]:
    """Block `index`'s outputs with `unit` quantized under `config` (or dropped; its inputs rounded
    as `rounding` does for the config), and its stored bits (None when dropped); (None, None) when
    the option does not apply (recorded as skipped)."""
    if config == DROP:
        if unit.kind == "block":
            return [state.clone() for state in hidden], None
        with removed_unit(block, adapter, unit.kind):
            return run_batches(block, calls, hidden, index), None
    if isinstance(config, RoundingNoise):  # what `noise` measures a unit under: no stored form
        originals = {name: linear_weight(modules[name]).detach() for name in unit.modules}
        with _weights_as(modules, config.weights(originals)):
            return run_batches(block, calls, hidden, index), None
    used = edge_config(unit, config)
    try:
        stored = {name: quantize_linear(name, modules[name], used, stats.get((name, used.algorithm)),
                                        importance.get(name)) for name in unit.modules}
    except LayerwiseError as error:
        record(u, o, None, None, str(error), 0.0)
        return None, None
    with _weights_as(modules, {name: qtensor.dequantize() for name, qtensor in stored.items()}), \
            rounding.applied({name: used for name in unit.modules}) if rounding is not None else contextlib.nullcontext():
        outputs = run_batches(block, calls, hidden, index)
    return outputs, float(sum(qtensor.n_bits for qtensor in stored.values()))


@dataclass
class _FitnessWindows:
    """What measuring whole plans on some windows keeps of the base model: every block's call
    arguments (a window per batch), the first block's inputs in a scratch file (read again for
    every plan), and the base distributions' sums for all windows; for the first few windows too
    (the cheaper fidelity of a search), made when first asked for."""
    inputs: list[torch.Tensor]  # token ids per window: a planned embedding's first inputs start there
    calls: list[list[BlockCall]]
    first: TensorSlots
    kl: SlicedKL
    prefix_finals: list[torch.Tensor]  # the last block's normed outputs of the first few windows
    window_domains: np.ndarray
    device: torch.device
    prefix: SlicedKL | None = None

    def kl_for(self, loaded: LoadedModel, count: int) -> SlicedKL:
        """The base sums of the first `count` windows: all of them, or the first few."""
        if count == len(self.calls):
            return self.kl
        if count != len(self.prefix_finals):
            raise LayerwiseError(f"whole plans are measured on all {len(self.calls)} windows or the first "
                                 f"{len(self.prefix_finals)}, not {count}")
        if self.prefix is None:
            self.prefix = SlicedKL(loaded, self.prefix_finals, torch.float32, normed=True)
        return self.prefix

    def close(self) -> None:
        self.first.close()


class StreamedFitness:
    """KL of whole plans on a streamed model, or for the check on one in memory on the CPU
    (`KLFitness`'s numbers): for the never-worse check
    (`window_kl`) and the searches (`fitness(choice, stage)`: stage 0 the table's prediction, 1 the
    KL on the first `batch_size` windows, 2 on all of them). A plan runs block by block, each block
    read once for all windows with its units quantized as the plan says; quantized weights are
    made again for every plan (nothing kept between plans: memory is what streaming saves), and
    GPTQ/AWQ statistics are gathered once, a block at a time, their Hessians waiting in a scratch
    file. A planned embedding quantizes the rows of the windows' tokens, and the head (the same
    matrix when tied) is quantized a slice of rows at a time."""

    def __init__(self, loaded: LoadedModel, table, windows: TokenWindows, *, batch_size: int = 2,
                 problem=None, importance: dict | None = None, statistics: TokenWindows | None = None,
                 emulation: str = "float") -> None:
        refuse_unless_streamable(loaded, "measuring whole plans")
        table.check_model(loaded)
        self.loaded, self.table, self.problem = loaded, table, problem
        self.score = objective_named(problem.objective if problem is not None else "mean").plan_score
        self.importance = importance or {}
        self.configs = table.configs
        self.modules = {name: loaded.model.get_submodule(name) for unit in table.units for name in unit.modules}
        self.block_units: dict[int, list[int]] = {}
        self.edge_units = [u for u, unit in enumerate(table.units) if unit.kind in EDGE_KINDS]
        self.tied = head_is_tied(loaded.model, loaded.adapter)
        for u, unit in enumerate(table.units):
            if unit.kind not in EDGE_KINDS:
                self.block_units.setdefault(unit.block, []).append(u)
        self.emulation = emulation
        self.rounding = InputRounding({name: self.modules[name] for units in self.block_units.values() for u in units
                                       for name in table.units[u].modules}, emulation)
        self.prefix_windows = batch_size  # the first fidelity's windows: KLFitness's first batch
        self._held: list[_FitnessWindows] = []
        self.base = self._windows(windows, self.prefix_windows)
        algorithms = {config.algorithm for config in self.configs if config != DROP} - {"rtn"}
        stat_calls = calls_of(loaded, statistics or windows, batch_size) if algorithms else []
        self._stats = self._gather(algorithms, stat_calls)
        self.calls, self.seconds, self.block_runs = 0, 0.0, 0.0
        self._head = head_cost_in_blocks(loaded)

    def _windows(self, windows: TokenWindows, prefix: int | None = None) -> _FitnessWindows:
        """One base pass over `windows` (a window per batch, statistics in batches: as the table)."""
        calls = calls_of(self.loaded, windows)
        first = take_first_inputs(calls)
        device = first[0].device
        slots = TensorSlots([tuple(state.shape) for state in first], first[0].dtype)
        slots.write(0, first)
        kl = SlicedKL(self.loaded, last_block_outputs(self.loaded, calls, hidden=first),  # `first` is consumed
                      torch.float32)
        held = _FitnessWindows(windows.batches(1), calls, slots, kl, kl.finals[:prefix] if prefix is not None else [],
                               np.asarray(windows.window_domains), device)
        self._held.append(held)
        return held

    @property
    def stages(self) -> int:
        return 3

    def held_out(self, windows: TokenWindows) -> _FitnessWindows:
        """The base pass over other windows (the never-worse check's), for `window_kl`; quantized
        weights stay those of the fitness (GPTQ/AWQ statistics from its `statistics` windows)."""
        return self._windows(windows)

    def forward_equivalents(self) -> float:
        """Compute spent on the search, in forward passes over all fitness windows (the base
        distributions, summed once per window set, not counted)."""
        return self.block_runs / ((self.loaded.n_blocks + self._head) * len(self.base.calls))

    @torch.no_grad()
    def __call__(self, choice: Sequence[int], stage: int | None = None) -> float:
        stage = self.stages - 1 if stage is None else stage
        if stage == 0:
            return table_prediction(self.table, self.problem, choice)
        started = time.perf_counter()
        count = len(self.base.calls) if stage == self.stages - 1 else min(self.prefix_windows, len(self.base.calls))
        values = self._window_kl(choice, self.base, count)
        self.calls += 1
        self.block_runs += count * (self.loaded.n_blocks + self._head)
        self.seconds += time.perf_counter() - started
        # Windows are of equal length, so a domain's mean over windows is its mean over tokens.
        return self.score(np.array(list(domain_means(values, self.base.window_domains[:count]).values())))

    def _gather(self, algorithms: set[str], calls: list[list[BlockCall]]):
        """GPTQ Hessians into a scratch file (AWQ samples, small, in memory), a block at a time."""
        spill, kept = TensorSpill(), {}
        if not algorithms:
            return spill, kept
        hidden = take_first_inputs(calls)
        for index, block in enumerate(blocks_of(self.loaded.model, self.loaded.adapter)):
            names = [name for u in self.block_units.get(index, []) for name in self.table.units[u].modules]
            with held(self.loaded.streamed, _part(self.loaded, index)):
                spilled: dict[int, str] = {}  # linears that read the same input share statistics: one copy
                for (name, algorithm), stats in _statistics(self.loaded.model, block, names, algorithms, calls,
                                                            hidden, index).items():
                    if stats.hessian is not None and id(stats) not in spilled:
                        spilled[id(stats)] = f"{name}|{algorithm}"
                        spill.add(spilled[id(stats)], stats.hessian)
                    kept[name, algorithm] = (stats.rows, stats.sample, spilled.get(id(stats)))
                hidden = advance_batches(block, calls, hidden, index)
        return spill, kept

    def _stats_of(self, name: str, algorithm: str) -> InputStats | None:
        spill, kept = self._stats
        if (name, algorithm) not in kept:
            return None
        rows, sample, key = kept[name, algorithm]
        hessian = spill.read(key) if key is not None else None
        return InputStats(hessian=hessian, rows=rows, sample=sample)

    def window_kl(self, choice: Sequence[int], base: _FitnessWindows | None = None) -> np.ndarray:
        """Mean KL(base || model under `choice`) of every window of `base` (from `held_out`;
        default the fitness windows); not counted as search compute."""
        base = base if base is not None else self.base
        return self._window_kl(choice, base, len(base.calls))

    @torch.no_grad()
    def _window_kl(self, choice: Sequence[int], base: _FitnessWindows, count: int) -> np.ndarray:
        """The first `count` windows of `base` under `choice`, block by block."""
        model, adapter, streamed = self.loaded.model, self.loaded.adapter, self.loaded.streamed
        calls = base.calls[:count]
        edges = self._edge_transforms(choice)
        if "embed" in edges:
            with embedding_rows_transformed(self.loaded, edges["embed"]):
                hidden = [first_block_input(model, adapter, ids.to(self.loaded.input_device))
                          for ids in base.inputs[:count]]
        else:
            hidden = [base.first.read_rows(0, part, 0, base.first.shapes[part][0]).to(base.device)
                      for part in range(count)]
        for index, block in enumerate(blocks_of(model, adapter)):
            with held(streamed, _part(self.loaded, index)):
                decoded: dict[str, torch.Tensor | None] = {}
                configs = {}
                for u in self.block_units.get(index, []):
                    unit, config = self.table.units[u], self.configs[int(choice[u])]
                    used = config if config == DROP else edge_config(unit, config)
                    for name in unit.modules:
                        configs[name] = used
                        decoded[name] = None if used == DROP else quantize_linear(
                            name, self.modules[name], used, self._stats_of(name, used.algorithm),
                            self.importance.get(name)).compact().dequantize()
                with _weights_as(self.modules, decoded), self.rounding.applied(configs):
                    hidden = advance_batches(block, calls, hidden, index)
                del decoded
        kl = base.kl_for(self.loaded, count)
        head_input = self._head_input(choice)
        normed = [rounded(kl.normed(state), head_input) for state in hidden]
        del hidden
        head = edges.get("head", edges.get("embed") if self.tied else None)
        return kl.window_kl(1, lambda _, part, window, start, stop: normed[part][window, start:stop], [head])[0]

    def _head_input(self, choice: Sequence[int]):
        """How the head's inputs are rounded under `choice` (the emulation, for the head's type or
        the tied embedding's), or None."""
        for u in self.edge_units:
            unit = self.table.units[u]
            if unit.kind == "head" or self.tied:
                (name,) = unit.modules
                columns = linear_weight(self.modules[name]).shape[1]
                return input_rounding(edge_config(unit, self.configs[int(choice[u])]), columns, self.emulation)
        return None

    def _edge_transforms(self, choice: Sequence[int]) -> dict[str, Callable[[torch.Tensor], torch.Tensor]]:
        """Unit kind ("embed", "head") -> its rows as `choice` quantizes them."""
        transforms = {}
        for u in self.edge_units:
            unit = self.table.units[u]
            (name,) = unit.modules
            transforms[unit.kind] = rows_quantized(edge_config(unit, self.configs[int(choice[u])]), name,
                                                   self.importance.get(name))
        return transforms

    def __enter__(self) -> "StreamedFitness":
        return self

    def __exit__(self, *exc) -> None:
        self.rounding.close()
        self._stats[0].close()
        for held_windows in self._held:
            held_windows.close()
