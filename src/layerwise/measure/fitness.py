"""The real fitness of a whole assignment: KL to the base model on calibration text with every
unit quantized as assigned, for the searches (evolutionary, hybrid) and the never-worse check.

Errors of different units do not simply add up (EvoPress), so a search needs this rather than the
table. Memory stays near the model's own size (issue 17): a plan is measured block by block, each
block's units decoded from their stored form just before it runs and given their own weights back
just after, so no float copy of the model is made per option or per plan; the stored forms (codes
and scales, or GGUF bytes: a quarter of float32 or less) are kept in a bank bounded in bytes and
requantized when they were let go; and the base model's next-token distributions, a vocabulary
wide per token, are not kept but recomputed from its last block's output, a chunk of positions at
a time, next to the plan's. Fidelities use the first windows only: stage 0 is the sensitivity
table's additive prediction (free), stage 1 the KL on the first batch, the last stage the KL on
every fitness window.
"""
from __future__ import annotations

import contextlib
import time
from dataclasses import dataclass
from typing import Iterator, Sequence

import numpy as np
import torch

from layerwise.data.windows import TokenWindows
from layerwise.engine.divergence import Reference
from layerwise.engine.hooks import BlockCall, run_batches
from layerwise.engine.replay import block_calls, first_block_input, head_kl
from layerwise.measure.sensitivity import _statistics_hooks, head_cost_in_blocks, input_statistics
from layerwise.models.layout import blocks_of, hidden_to_logits, stored_transposed
from layerwise.models.loading import LoadedModel
from layerwise.plan.problem import AllocationProblem
from layerwise.plan.objectives import objective_named
from layerwise.plan.options import DROP
from layerwise.plan.table import SensitivityTable, domain_means, edge_config
from layerwise.plan.units import EDGE_KINDS, block_modules
from layerwise.quant.linear import quantize_linear
from layerwise.quant.qtensor import QTensor
from layerwise.util.memory import trim_freed_memory


@dataclass
class Anchors:
    """What measuring whole plans on some windows needs of the base model, per batch: the token
    ids, every block's call arguments with the first block's input, and the last block's output
    (the base logits are recomputed from it)."""
    inputs: list[torch.Tensor]
    calls: list[list[BlockCall]]
    finals: list[torch.Tensor]
    stats: dict


@torch.no_grad()
def anchors(loaded: LoadedModel, windows: TokenWindows, modules: list[str], algorithms: set[str], batch_size: int,
            statistics: TokenWindows | None = None) -> Anchors:
    """One pass over `windows` keeping `Anchors`, and the GPTQ/AWQ input statistics of `modules`
    gathered on `statistics` (None: on `windows` themselves, in the same pass)."""
    loaded.require_in_memory("measuring whole plans")
    if statistics is None:
        stats, register = _statistics_hooks(loaded.model, modules, algorithms)
    else:
        stats, register = input_statistics(loaded, statistics, modules, algorithms, batch_size), None
    inputs, calls, finals = [], [], []
    for batch in windows.batches(batch_size):
        ids = batch.to(loaded.input_device)
        batch_calls, final = block_calls(loaded.model, loaded.adapter, ids, register)
        inputs.append(ids)
        calls.append(batch_calls)
        finals.append(final)
    return Anchors(inputs, calls, finals, stats)


class KLFitness:
    """`fitness(choice, stage)` -> mean KL(base || model under `choice`) on calibration windows;
    with windows of several domains, the objective's score of the per-domain means.

    `stage` counts fidelities: 0 is the table's prediction (`problem.total_loss`, or the additive
    loss without a problem), 1..len(batches_per_stage) the KL on the first `batches_per_stage[i - 1]`
    batches (None = all). `bank_bytes` bounds the stored quantized weights kept between
    evaluations (default: 1.25 bytes per planned weight, about one plan's codes and scales);
    what does not fit is requantized when next needed, to the same values. `apply(choice)` puts the
    whole model in a plan's state for evaluating it otherwise (benchmarks); `restore()` undoes it
    (also done on leaving a `with` block).
    """

    def __init__(self, loaded: LoadedModel, table: SensitivityTable, windows: TokenWindows, *,
                 batch_size: int = 2, batches_per_stage: Sequence[int | None] = (1, None),
                 problem: AllocationProblem | None = None, importance: dict | None = None,
                 statistics: TokenWindows | None = None, bank_bytes: int | None = None) -> None:
        table.check_model(loaded)
        self.loaded, self.table, self.problem = loaded, table, problem
        self.importance = importance or {}  # module -> importance-matrix column weights (GGUF options)
        self.window_domains = np.asarray(windows.window_domains)
        self.score = objective_named(problem.objective if problem is not None else "mean").plan_score
        self.configs = table.configs
        modules = [name for unit in table.units for name in unit.modules]
        self.modules = {name: loaded.model.get_submodule(name) for name in modules}
        algorithms = {config.algorithm for config in self.configs if config != DROP} - {"rtn"}
        self.batch_size = batch_size
        # GPTQ/AWQ fitted on `statistics` when given, so a plan is judged on text its quantizers never saw.
        self.base = anchors(loaded, windows, block_modules(table.units), algorithms, batch_size, statistics)
        # A planned embedding changes every block's input: whole plans then run from the token ids.
        self.start = -1 if any(unit.kind == "embed" for unit in table.units) else 0
        self.edge_units = [u for u, unit in enumerate(table.units) if unit.kind in EDGE_KINDS]
        self.block_units: dict[int, list[int]] = {}
        for u, unit in enumerate(table.units):
            if unit.kind not in EDGE_KINDS:
                self.block_units.setdefault(unit.block, []).append(u)
        # The modules' own weight tensors: a module holding decoded weights gets these back.
        self.originals = {name: module.weight.data for name, module in self.modules.items()}
        self.biases = {name: module.bias.detach().clone() for name, module in self.modules.items()
                       if getattr(module, "bias", None) is not None}
        # (unit, option) -> module -> stored weights (None: the unit is dropped, weights and biases zero)
        self.bank: dict[tuple[int, int], dict[str, QTensor | None]] = {}
        # Default: one byte per planned weight and a quarter more, about one plan's codes and scales.
        self.bank_bytes = (bank_bytes if bank_bytes is not None
                           else sum(self.originals[name].numel() for name in block_modules(table.units)) * 5 // 4)
        self._bank_sizes: dict[tuple[int, int], int] = {}
        self._last_used: dict[tuple[int, int], int] = {}
        self._pass = 0  # counts whole-plan passes, so the bank never lets go of what the current one uses
        self.quantizations = 0
        self.current: list[int | None] = [None] * len(table.units)  # None = original weights
        n_batches = len(self.base.calls)
        self.stage_batches = [n_batches if b is None else min(b, n_batches) for b in batches_per_stage]
        self.calls = 0
        self.block_runs = 0.0
        self.seconds = 0.0
        self._head = head_cost_in_blocks(loaded)

    @property
    def stages(self) -> int:
        return 1 + len(self.stage_batches)

    def forward_equivalents(self) -> float:
        """Compute spent so far, in forward passes over all fitness windows (the base logits,
        recomputed per evaluation, count as a second head)."""
        return self.block_runs / ((self.loaded.n_blocks + self._head) * len(self.base.calls))

    def _stored(self, unit: int, option: int) -> dict[str, QTensor | None]:
        key = (unit, option)
        self._last_used[key] = self._pass
        if key in self.bank:
            return self.bank[key]
        config = self.configs[option]
        if config != DROP:
            config = edge_config(self.table.units[unit], config)
        stored = {}
        for name in self.table.units[unit].modules:
            if config == DROP:
                stored[name] = None
                continue
            self._put_back(name)  # quantize the original
            stats = self.base.stats.get((name, config.algorithm))
            stored[name] = quantize_linear(name, self.modules[name], config, stats,
                                           self.importance.get(name)).compact()
        self.current[unit] = None
        self.quantizations += 1
        size = sum(_stored_bytes(qtensor) for qtensor in stored.values() if qtensor is not None)
        if self._make_room(size):
            self.bank[key], self._bank_sizes[key] = stored, size
        return stored

    def _make_room(self, size: int) -> bool:
        """Let go of the least recently used stored weights until `size` more bytes fit; never of
        those the current pass has used (a plan visits units in the same order every pass, so
        evicting them would make every later pass miss). False if it cannot fit."""
        used = sum(self._bank_sizes.values())
        if used + size <= self.bank_bytes:
            return True
        idle = sorted((key for key in self.bank if self._last_used.get(key, -1) < self._pass),
                      key=lambda key: self._last_used.get(key, -1))
        for key in idle:
            del self.bank[key]
            used -= self._bank_sizes.pop(key)
            if used + size <= self.bank_bytes:
                return True
        return False

    def _put_back(self, name: str) -> None:
        module = self.modules[name]
        module.weight.data = self.originals[name]
        if name in self.biases:
            module.bias.data.copy_(self.biases[name])

    def _decode(self, unit: int, option: int) -> None:
        """Give `unit`'s modules the decoded weights of `option`."""
        for name, qtensor in self._stored(unit, option).items():
            module, original = self.modules[name], self.originals[name]
            if qtensor is None:
                decoded = torch.zeros_like(original)
            else:
                decoded = qtensor.dequantize()
                if stored_transposed(module):  # GPT-2 keeps [in, out]
                    decoded = decoded.t()
            module.weight.data = decoded.to(device=original.device, dtype=original.dtype).contiguous()
            if name in self.biases:
                module.bias.data.copy_(self.biases[name] if qtensor is not None
                                       else torch.zeros_like(self.biases[name]))
        self.current[unit] = option

    def _original(self, unit: int) -> None:
        for name in self.table.units[unit].modules:
            self._put_back(name)
        self.current[unit] = None

    def apply(self, choice: Sequence[int]) -> None:
        """Put the whole model in the state `choice` describes (only changed units are rewritten):
        a decoded float copy of every planned weight, for evaluating the plan by other means."""
        self._pass += 1
        for unit, option in enumerate(choice):
            if self.current[unit] != int(option):
                self._decode(unit, int(option))

    def restore(self) -> None:
        for name in self.modules:
            self._put_back(name)
        self.current = [None] * len(self.table.units)

    @contextlib.contextmanager
    def _units_as(self, choice: Sequence[int], units: Sequence[int]) -> Iterator[None]:
        """`units` decoded as `choice` says for the duration, then their own weights again."""
        try:
            for unit in units:
                self._decode(unit, int(choice[unit]))
            yield
        finally:
            for unit in units:
                self._original(unit)

    @contextlib.contextmanager
    def _own_weights(self, units: Sequence[int]) -> Iterator[None]:
        """`units` with their own weights for the duration (the base model's logits), then as before."""
        held = {name: (self.modules[name].weight.data, self.modules[name].bias.data.clone()
                       if name in self.biases else None)
                for unit in units for name in self.table.units[unit].modules}
        try:
            for name in held:
                self._put_back(name)
            yield
        finally:
            for name, (weight, bias) in held.items():
                self.modules[name].weight.data = weight
                if bias is not None:
                    self.modules[name].bias.data.copy_(bias)

    def __enter__(self) -> "KLFitness":
        return self

    def __exit__(self, *exc) -> None:
        self.restore()

    @torch.no_grad()
    def __call__(self, choice: Sequence[int], stage: int | None = None) -> float:
        stage = self.stages - 1 if stage is None else stage
        if stage == 0:
            return table_prediction(self.table, self.problem, choice)
        started = time.perf_counter()
        batches = self.stage_batches[stage - 1]
        values = self._window_kl(choice, self.base, batches)
        self.calls += 1
        self.block_runs += batches * (self.loaded.n_blocks + 2 * self._head)
        self.seconds += time.perf_counter() - started
        # Windows are of equal length, so a domain's mean over windows is its mean over tokens.
        return self.score(np.array(list(domain_means(values, self.window_domains[:len(values)]).values())))

    def full(self, choice: Sequence[int]) -> float:
        """The highest fidelity."""
        return self(choice, self.stages - 1)

    def held_out(self, windows: TokenWindows, batch_size: int | None = None) -> Anchors:
        """The base pass over other windows (the never-worse check's), for `window_kl`. Quantized
        weights stay those of the fitness (GPTQ/AWQ statistics from its `statistics` windows, or
        else the fitness windows)."""
        self.restore()
        return anchors(self.loaded, windows, [], set(), batch_size or self.batch_size)

    def window_kl(self, choice: Sequence[int], base: Anchors | None = None) -> np.ndarray:
        """Mean KL(base || model under `choice`) of every window of `base` (from `held_out`; default
        the fitness windows); not counted as search compute."""
        return self._window_kl(choice, base if base is not None else self.base)

    @torch.no_grad()
    def _window_kl(self, choice: Sequence[int], base: Anchors, batches: int | None = None) -> np.ndarray:
        """Block by block over all batches at once: only one block's units hold decoded weights."""
        self.restore()
        self._pass += 1
        model, adapter = self.loaded.model, self.loaded.adapter
        count = len(base.calls) if batches is None else batches
        values = []
        with self._units_as(choice, self.edge_units):
            if self.start < 0:
                hidden = [first_block_input(model, adapter, base.inputs[b]) for b in range(count)]
            else:
                hidden = [base.calls[b][0].h_in for b in range(count)]
            for index, block in enumerate(blocks_of(model, adapter)):
                with self._units_as(choice, self.block_units.get(index, ())):
                    hidden = run_batches(block, base.calls, hidden, index)
            for b, state in enumerate(hidden):
                values.extend(self._batch_kl(base.finals[b], state))
        trim_freed_memory()  # the head's pieces would otherwise leave the heap a little larger each plan
        return np.asarray(values)

    def _batch_kl(self, final: torch.Tensor, hidden: torch.Tensor) -> list[float]:
        """Per window, the mean KL over its next-token positions; the base logits are recomputed
        from `final` with the edge units' own weights, a chunk of positions at a time."""
        model, adapter = self.loaded.model, self.loaded.adapter

        def reference_of(window: int, start: int, stop: int) -> Reference:
            with self._own_weights(self.edge_units):
                return Reference.from_logits(hidden_to_logits(model, adapter, final[window, start:stop]))

        return head_kl(model, adapter, hidden, reference_of)


def table_prediction(table: SensitivityTable, problem: AllocationProblem | None, choice: Sequence[int]) -> float:
    """A search's free fidelity: the problem's loss of `choice` (its objective over domains), or
    without a problem the table's summed KL."""
    if problem is not None:
        return problem.total_loss(choice)
    return float(np.sum(table.kl[np.arange(len(choice)), list(choice)]))


def _stored_bytes(qtensor: QTensor) -> int:
    tensors = [t for t in (qtensor.codes, qtensor.channel_scale) if t is not None]
    tensors += [value for value in (qtensor.params or {}).values() if isinstance(value, torch.Tensor)]
    packed = qtensor.packed.nbytes if qtensor.packed is not None else 0
    return packed + sum(tensor.numel() * tensor.element_size() for tensor in tensors)
