"""The measured sensitivity table (streamed or in memory) and the whole-plan KLs of a streamed
model (issue 17): one block's weights in memory at a time when streamed, and no input of every
block and no vocabulary-wide distributions kept either way.

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
from layerwise.engine.replay import calls_of, last_block_outputs, removed_unit
from layerwise.errors import LayerwiseError
from layerwise.measure.estimators import blocks_to_head
from layerwise.measure.sensitivity import _statistics_hooks
from layerwise.models.layout import blocks_of, stored_transposed
from layerwise.models.loading import LoadedModel
from layerwise.models.streaming import has_overrides, head_rows, head_step, held
from layerwise.plan.options import DROP
from layerwise.plan.table import edge_config
from layerwise.plan.units import EDGE_KINDS, Unit
from layerwise.quant.linear import InputStats, quantize_linear
from layerwise.util.memory import trim_freed_memory
from layerwise.util.tensor_files import TensorSlots, TensorSpill

# Logits made at once while KL is summed over vocabulary slices (float32; a few temporaries of
# this size and twice it in float64).
_LOGIT_ELEMENTS = 1 << 20


def refuse_what_streaming_lacks(*, allocator: str = "exact", searching: bool = False, estimator: str = "measured",
                                edges: bool = False) -> None:
    """What a plan of a streamed model cannot do yet, refused before any work."""
    if searching:
        raise LayerwiseError(f"the {allocator!r} allocator measures many whole plans and does not run on a streamed "
                             "model yet; use the default allocator (exact) or load the model without --streaming")
    if estimator != "measured":
        raise LayerwiseError(f"the {estimator!r} estimator does not run on a streamed model yet; use the measured "
                             "table (--sensitivity measured) or load the model without --streaming")
    if edges:
        raise LayerwiseError("plans that choose the embedding's and head's types (--budget-like) do not run on a "
                             "streamed model yet; load it without --streaming, or give --budget or --budget-bytes")


def refuse_unless_streamable(loaded: LoadedModel, what: str) -> None:
    """What the streamed table and check cannot do yet, refused before any work."""
    if not plain_head(loaded):
        raise LayerwiseError(f"{what} on a streamed model needs a plain linear head; load it without --streaming")


def plain_head(loaded: LoadedModel) -> bool:
    """Whether the head is a plain linear, which `SlicedKL` applies a slice of rows at a time."""
    return type(loaded.model.get_submodule(loaded.adapter.lm_head)) is nn.Linear


def _part(loaded: LoadedModel, index: int) -> str:
    return f"{loaded.adapter.blocks}.{index}"


class SlicedKL:
    """Per window, the mean KL(base || variant) over its next-token positions, for many variants
    at once, the head read a slice of vocabulary rows at a time (once per call for all variants).

    `finals` are the base model's last block outputs per batch; the base distributions are
    stored in `store` precision as the in-memory references are (float16 for the table, float32
    for the check) and recomputed from `finals` slice by slice, never kept whole. Variants' states
    are given through the final norm (`normed`), once, not for every slice."""

    def __init__(self, loaded: LoadedModel, finals: list[torch.Tensor], store: torch.dtype) -> None:
        model, adapter = loaded.model, loaded.adapter
        self.loaded, self.store = loaded, store
        self.norm = model.get_submodule(adapter.final_norm)
        self.finals = [self.normed(final) for final in finals]
        self.device = finals[0].device  # where the sums run: beside the states and the head
        self.head = model.get_submodule(adapter.lm_head)
        self.softcap = getattr(model.config, "final_logit_softcapping", None)
        self.vocab, width = self.head.weight.shape
        self.step = head_step(width)
        self.rows = max(1, _LOGIT_ELEMENTS // self.step)
        self.positions = finals[0].shape[1] - 1
        # (batch, window, first position, end position, offset among all positions)
        self.chunks, offset = [], 0
        for part, final in enumerate(finals):
            for window in range(final.shape[0]):
                for start in range(0, self.positions, self.rows):
                    stop = min(self.positions, start + self.rows)
                    self.chunks.append((part, window, start, stop, offset))
                    offset += stop - start
        self.total = offset
        self.lse, self.neg_entropy, self.mass = self._base_terms()

    def _slices(self) -> Iterator[tuple[torch.Tensor, torch.Tensor | None]]:
        """(weight rows, bias rows) of the head, a slice at a time: read from the checkpoint, or
        from the head held whole where it is not read in slices (a GGUF output tensor, a bias)."""
        streamed, path = self.loaded.streamed, self.loaded.adapter.lm_head
        if streamed is not None and path in streamed.sliced and self.head.bias is None and \
                not has_overrides(streamed, path):
            for start in range(0, self.vocab, self.step):
                yield head_rows(streamed, path, start, min(self.vocab, start + self.step), self.head.weight.dtype), None
            return
        with held(streamed, path):
            for start in range(0, self.vocab, self.step):
                stop = min(self.vocab, start + self.step)
                yield self.head.weight[start:stop], None if self.head.bias is None else self.head.bias[start:stop]

    def normed(self, states: torch.Tensor) -> torch.Tensor:
        """A last block's output as the head receives it."""
        return self.norm(states)

    def _logits(self, normed: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        logits = nn.functional.linear(normed, weight, bias)
        if self.softcap:
            logits = torch.tanh(logits / self.softcap) * self.softcap
        return logits.float()

    def _base_logits(self, chunk: tuple[int, int, int, int, int], weight: torch.Tensor,
                     bias: torch.Tensor | None) -> torch.Tensor:
        part, window, start, stop, _ = chunk
        return self._logits(self.finals[part][window, start:stop], weight, bias)

    def _base_distribution(self, chunk: tuple[int, int, int, int, int], weight: torch.Tensor,
                           bias: torch.Tensor | None, lse: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """A chunk's base log-probabilities over a head slice (float32, as log_softmax gives them)
        and its probabilities as the in-memory reference stores them (`store`)."""
        offset, count = chunk[4], chunk[3] - chunk[2]
        logprobs = self._base_logits(chunk, weight, bias) - lse[offset:offset + count, None]
        return logprobs, logprobs.exp().to(self.store)

    @torch.no_grad()
    def _base_terms(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Per position: the base logits' log-sum-exp (float32, as log_softmax rounds it), sum p
        log p and sum p over the stored probabilities (float64)."""
        peak = torch.full((self.total,), -torch.inf, dtype=torch.float64, device=self.device)
        summed = torch.zeros(self.total, dtype=torch.float64, device=self.device)
        for weight, bias in self._slices():
            for chunk in self.chunks:
                _running_lse(peak, summed, chunk[4], self._base_logits(chunk, weight, bias))
        lse = (peak + summed.log()).float()
        neg_entropy = torch.zeros(self.total, dtype=torch.float64, device=self.device)
        mass = torch.zeros(self.total, dtype=torch.float64, device=self.device)
        for weight, bias in self._slices():
            for chunk in self.chunks:
                logprobs, probs = self._base_distribution(chunk, weight, bias, lse)
                span = slice(chunk[4], chunk[4] + chunk[3] - chunk[2])
                neg_entropy[span] += (probs.double() * logprobs.double()).sum(dim=-1)
                mass[span] += probs.double().sum(dim=-1)
        return lse, neg_entropy, mass

    @torch.no_grad()
    def window_kl(self, variants: int, rows_of: Callable[[int, int, int, int, int], torch.Tensor]) -> np.ndarray:
        """[variants, windows] mean KL per window; `rows_of(variant, batch, window, start, stop)`
        gives a variant's last block output at those positions, through the final norm (`normed`)."""
        peak = torch.full((variants, self.total), -torch.inf, dtype=torch.float64, device=self.device)
        summed = torch.zeros((variants, self.total), dtype=torch.float64, device=self.device)
        cross = torch.zeros((variants, self.total), dtype=torch.float64, device=self.device)  # sum p z
        for weight, bias in self._slices():
            for chunk in self.chunks:
                part, window, start, stop, offset = chunk
                count = stop - start
                logprobs, probs = self._base_distribution(chunk, weight, bias, self.lse)
                probs = probs.float()
                del logprobs
                for variant in range(variants):
                    logits = self._logits(rows_of(variant, part, window, start, stop), weight, bias)
                    _running_lse(peak[variant], summed[variant], offset, logits)
                    cross[variant, offset:offset + count] += (probs * logits).sum(dim=-1, dtype=torch.float64)
                    del logits
            trim_freed_memory()
        lse = peak + summed.log()
        kl = (self.neg_entropy - (cross - lse * self.mass)).clamp_min(0.0)
        windows = kl.reshape(variants, -1, self.positions)  # chunks run window by window, in order
        return (windows.sum(dim=-1) / self.positions).cpu().numpy()


def _running_lse(peak: torch.Tensor, summed: torch.Tensor, offset: int, logits: torch.Tensor) -> None:
    """Fold a slice of float32 logits [positions, rows] into a running log-sum-exp (float64 peak,
    and sum of exp below it) of positions offset.. ; the exponentials in float32, summed in float64."""
    span = slice(offset, offset + logits.shape[0])
    top = torch.maximum(peak[span], logits.max(dim=-1).values.double())  # float32 values, exactly
    summed[span] = (summed[span] * torch.exp(peak[span] - top)
                    + torch.exp(logits - top.float()[:, None]).sum(dim=-1, dtype=torch.float64))
    peak[span] = top


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
                    record: Callable[[int, int, np.ndarray | None, float | None, str | None, float], None],
                    first_unit: int = 0, block_done: Callable[[int], None] = lambda units_done: None) -> StreamedEntries:
    """Every entry (unit u >= `first_unit`, option o) of the measured table (of a streamed model, or
    of one in memory, whose blocks are then at hand):
    `record(u, o, per-window KL, stored bits, why skipped, block evaluations)` for each (counted
    as the in-memory table counts them), a block's entries at a time, then `block_done(units done)`."""
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
    for u, unit in enumerate(units):
        if u >= first_unit:
            by_block.setdefault(unit.block, []).append(u)
    hidden, stat_hidden = take_first_inputs(calls), take_first_inputs(stat_calls)
    shapes, device = [state.shape for state in hidden], hidden[0].device
    slots = TensorSlots([(shape[0] * shape[1], shape[2]) for shape in shapes], hidden[0].dtype)

    def put(slot: int, states: list[torch.Tensor]) -> None:
        slots.write(slot, [state.reshape(-1, state.shape[-1]) for state in states])

    def states_of(slot: int) -> list[torch.Tensor]:
        return [state.reshape(shape).to(device) for state, shape in zip(slots.read(slot), shapes)]

    def rows_of(slot: int, part: int, window: int, start: int, stop: int) -> torch.Tensor:
        first = window * shapes[part][1]
        return slots.read_rows(slot, part, first + start, first + stop).to(device)

    try:
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
                                                           importance, calls, hidden, index, record, u, o)
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
                values = kl.window_kl(len(entries), rows_of)
                runs = blocks_to_head(loaded.n_blocks, index, head) * len(calls)
                for slot, (u, o, bits) in enumerate(entries):
                    record(u, o, values[slot], bits, None, runs)
            if todo:
                block_done(max(todo) + 1)
    finally:
        slots.close()
    return StreamedEntries(base_seconds, positions, len(calls))


def _entry_outputs(block, adapter, modules, unit: Unit, config, stats, importance, calls, hidden, index, record,
                   u: int, o: int) -> tuple[list[torch.Tensor] | None, float | None]:
    """Block `index`'s outputs with `unit` quantized under `config` (or dropped), and its stored
    bits (None when dropped); (None, None) when the option does not apply (recorded as skipped)."""
    if config == DROP:
        if unit.kind == "block":
            return [state.clone() for state in hidden], None
        with removed_unit(block, adapter, unit.kind):
            return run_batches(block, calls, hidden, index), None
    used = edge_config(unit, config)
    try:
        stored = {name: quantize_linear(name, modules[name], used, stats.get((name, used.algorithm)),
                                        importance.get(name)) for name in unit.modules}
    except LayerwiseError as error:
        record(u, o, None, None, str(error), 0.0)
        return None, None
    with _weights_as(modules, {name: qtensor.dequantize() for name, qtensor in stored.items()}):
        outputs = run_batches(block, calls, hidden, index)
    return outputs, float(sum(qtensor.n_bits for qtensor in stored.values()))


class StreamedFitness:
    """The never-worse check's KL of whole plans on a streamed model (`KLFitness.window_kl`'s
    numbers): a plan runs block by block, each block read once for all batches with its units
    quantized as the plan says; GPTQ/AWQ statistics are gathered once, a block at a time, and
    their Hessians wait in a scratch file."""

    def __init__(self, loaded: LoadedModel, table, windows: TokenWindows, *, batch_size: int = 2,
                 importance: dict | None = None, statistics: TokenWindows | None = None) -> None:
        refuse_unless_streamable(loaded, "the never-worse check")
        refuse_what_streaming_lacks(edges=any(unit.kind in EDGE_KINDS for unit in table.units))
        table.check_model(loaded)
        self.loaded, self.table = loaded, table
        self.importance = importance or {}
        self.configs = table.configs
        self.modules = {name: loaded.model.get_submodule(name) for unit in table.units for name in unit.modules}
        self.block_units: dict[int, list[int]] = {}
        for u, unit in enumerate(table.units):
            self.block_units.setdefault(unit.block, []).append(u)
        self._calls = calls_of(loaded, windows)  # a window per batch, statistics in batches: as the table
        # The first block's inputs, read again for every plan checked, wait in a scratch file.
        first = take_first_inputs(self._calls)
        self._first = TensorSlots([tuple(state.shape) for state in first], first[0].dtype)
        self._first.write(0, first)
        self._device = first[0].device
        self.kl = SlicedKL(loaded, last_block_outputs(loaded, self._calls, hidden=first), torch.float32)
        algorithms = {config.algorithm for config in self.configs if config != DROP} - {"rtn"}
        stat_calls = calls_of(loaded, statistics or windows, batch_size) if algorithms else []
        self._stats = self._gather(algorithms, stat_calls)
        # As `KLFitness` reports a search's compute: the check alone measures no search.
        self.base, self.calls, self.seconds = None, 0, 0.0

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

    def forward_equivalents(self) -> float:
        return 0.0

    @torch.no_grad()
    def window_kl(self, choice: Sequence[int], base=None) -> np.ndarray:
        """Mean KL(base || model under `choice`) of every fitness window."""
        model, adapter, streamed = self.loaded.model, self.loaded.adapter, self.loaded.streamed
        hidden = [state.to(self._device) for state in self._first.read(0)]
        for index, block in enumerate(blocks_of(model, adapter)):
            with held(streamed, _part(self.loaded, index)):
                decoded: dict[str, torch.Tensor | None] = {}
                for u in self.block_units.get(index, []):
                    unit, config = self.table.units[u], self.configs[int(choice[u])]
                    used = config if config == DROP else edge_config(unit, config)
                    for name in unit.modules:
                        decoded[name] = None if used == DROP else quantize_linear(
                            name, self.modules[name], used, self._stats_of(name, used.algorithm),
                            self.importance.get(name)).compact().dequantize()
                with _weights_as(self.modules, decoded):
                    hidden = advance_batches(block, self._calls, hidden, index)
                del decoded
        normed = [self.kl.normed(state) for state in hidden]
        del hidden
        return self.kl.window_kl(1, lambda _, part, window, start, stop: normed[part][window, start:stop])[0]

    def __enter__(self) -> "StreamedFitness":
        return self

    def __exit__(self, *exc) -> None:
        self._stats[0].close()
        self._first.close()
