"""The real fitness of a whole assignment: KL to the base model on calibration text with every
unit quantized as assigned, for the searches (evolutionary, hybrid) and the never-worse check.

Errors of different units do not simply add up (EvoPress), so a search needs this rather than the
table. Each unit's quantized weights are computed once per option and kept in their stored form
(codes and scales, or GGUF bytes: a quarter of float32 or less), decoded when the model is switched
to an assignment, which rewrites only the units that changed. The model's own weight tensors are
kept aside rather than copied while a unit holds decoded ones, so no float copy of the model is
made per option or per plan. Fidelities use the first windows only:
stage 0 is the sensitivity table's additive prediction (free), stage 1 the KL on the first
batch, the last stage the KL on every fitness window.
"""
from __future__ import annotations

import time
from dataclasses import replace
from typing import Sequence

import numpy as np
import torch

from layerwise.data.windows import TokenWindows
from layerwise.evaluate.divergence import kl_per_token
from layerwise.models.loading import LoadedModel
from layerwise.plan.allocate import AllocationProblem
from layerwise.plan.objectives import objective_named
from layerwise.plan.options import DROP
from layerwise.plan.sensitivity import (SensitivityTable, base_pass, domain_means, edge_config, head_cost_in_blocks,
                                        logits_from)
from layerwise.plan.units import block_modules
from layerwise.quant.apply import quantize_linear
from layerwise.quant.qtensor import QTensor


class KLFitness:
    """`fitness(choice, stage)` -> mean KL(base || model under `choice`) on calibration windows;
    with windows of several domains, the objective's score of the per-domain means.

    `stage` counts fidelities: 0 is the table's prediction (`problem.total_loss`, or the additive
    loss without a problem), 1..len(batches_per_stage) the KL on the first `batches_per_stage[i - 1]`
    batches (None = all). Restore the model with `restore()` (also done on leaving a `with` block).
    """

    def __init__(self, loaded: LoadedModel, table: SensitivityTable, windows: TokenWindows, *,
                 batch_size: int = 2, batches_per_stage: Sequence[int | None] = (1, None),
                 problem: AllocationProblem | None = None, importance: dict | None = None,
                 statistics: TokenWindows | None = None) -> None:
        table.check_model(loaded)
        self.loaded, self.table, self.problem = loaded, table, problem
        self.importance = importance or {}  # module -> importance-matrix column weights (GGUF options)
        self.window_domains = np.asarray(windows.window_domains)
        self.score = objective_named(problem.objective if problem is not None else "mean").plan_score
        self.configs = table.configs
        modules = [name for unit in table.units for name in unit.modules]
        self.modules = {name: loaded.model.get_submodule(name) for name in modules}
        algorithms = {config.algorithm for config in self.configs if config != DROP} - {"rtn"}
        # GPTQ/AWQ fitted on `statistics` when given, so a plan is judged on text its quantizers never saw.
        self.base = base_pass(loaded, windows, block_modules(table.units), algorithms, batch_size, statistics)
        # A planned embedding changes every block's input: whole plans then run from the token ids.
        self.start = -1 if any(unit.kind == "embed" for unit in table.units) else 0
        # The modules' own weight tensors: a module holding decoded weights gets these back.
        self.originals = {name: module.weight.data for name, module in self.modules.items()}
        self.biases = {name: module.bias.detach().clone() for name, module in self.modules.items()
                       if getattr(module, "bias", None) is not None}
        # (unit, option) -> module -> stored weights (None: the unit is dropped, weights and biases zero)
        self.bank: dict[tuple[int, int], dict[str, QTensor | None]] = {}
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
        """Compute spent so far, in forward passes over all fitness windows."""
        return self.block_runs / ((self.loaded.n_blocks + self._head) * len(self.base.calls))

    def _stored(self, unit: int, option: int) -> dict[str, QTensor | None]:
        key = (unit, option)
        if key not in self.bank:
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
                stored[name] = _compact(quantize_linear(name, self.modules[name], config, stats,
                                                        self.importance.get(name)))
            self.bank[key] = stored
            self.current[unit] = None
        return self.bank[key]

    def _put_back(self, name: str) -> None:
        module = self.modules[name]
        module.weight.data = self.originals[name]
        if name in self.biases:
            module.bias.data.copy_(self.biases[name])

    def apply(self, choice: Sequence[int]) -> None:
        """Put the model in the state `choice` describes (only changed units are rewritten)."""
        for unit, option in enumerate(choice):
            option = int(option)
            if self.current[unit] == option:
                continue
            for name, qtensor in self._stored(unit, option).items():
                module, original = self.modules[name], self.originals[name]
                if qtensor is None:
                    decoded = torch.zeros_like(original)
                else:
                    decoded = _widened(qtensor).dequantize()
                    if type(module).__name__ == "Conv1D":  # GPT-2 keeps [in, out]
                        decoded = decoded.t()
                module.weight.data = decoded.to(device=original.device, dtype=original.dtype).contiguous()
                if name in self.biases:
                    module.bias.data.copy_(self.biases[name] if qtensor is not None
                                           else torch.zeros_like(self.biases[name]))
            self.current[unit] = option

    def restore(self) -> None:
        for name in self.modules:
            self._put_back(name)
        self.current = [None] * len(self.table.units)

    def __enter__(self) -> "KLFitness":
        return self

    def __exit__(self, *exc) -> None:
        self.restore()

    @torch.no_grad()
    def __call__(self, choice: Sequence[int], stage: int | None = None) -> float:
        stage = self.stages - 1 if stage is None else stage
        if stage == 0:
            if self.problem is not None:
                return self.problem.total_loss(choice)
            return float(np.sum(self.table.kl[np.arange(len(choice)), list(choice)]))
        started = time.perf_counter()
        batches = self.stage_batches[stage - 1]
        values = self._window_kl(choice, self.base, batches)
        self.calls += 1
        self.block_runs += batches * (self.loaded.n_blocks + self._head)
        self.seconds += time.perf_counter() - started
        # Windows are of equal length, so a domain's mean over windows is its mean over tokens.
        return self.score(np.array(list(domain_means(values, self.window_domains[:len(values)]).values())))

    def full(self, choice: Sequence[int]) -> float:
        """The highest fidelity."""
        return self(choice, self.stages - 1)

    @torch.no_grad()
    def held_out(self, windows: TokenWindows, batch_size: int = 2):
        """The base pass over other windows (the never-worse check's), for `window_kl`. Quantized
        weights stay those of the fitness (GPTQ/AWQ statistics from its `statistics` windows, or
        else the fitness windows)."""
        self.restore()
        return base_pass(self.loaded, windows, [], set(), batch_size)

    def window_kl(self, choice: Sequence[int], base=None) -> np.ndarray:
        """Mean KL(base || model under `choice`) of every window of `base` (from `held_out`; default
        the fitness windows); not counted as search compute."""
        return self._window_kl(choice, base if base is not None else self.base)

    @torch.no_grad()
    def _window_kl(self, choice: Sequence[int], base, batches: int | None = None) -> np.ndarray:
        self.apply(choice)
        model, adapter = self.loaded.model, self.loaded.adapter
        values = []
        for batch, reference in enumerate(base.references[:batches]):
            logits = logits_from(model, adapter, base, batch, self.start)[:, :-1]
            kl = kl_per_token(reference, logits)
            values.extend(kl.reshape(kl.shape[0], -1).mean(dim=1).tolist())
        return np.asarray(values)


def _compact(qtensor: QTensor) -> QTensor:
    """Codes kept in one byte where they fit (quantizers write int16 codes for any width)."""
    codes = qtensor.codes
    if codes is None or codes.dtype != torch.int16 or codes.numel() == 0:
        return qtensor
    low, high = int(codes.min()), int(codes.max())
    for narrow in (torch.int8, torch.uint8):
        if torch.iinfo(narrow).min <= low and high <= torch.iinfo(narrow).max:
            return replace(qtensor, codes=codes.to(narrow))
    return qtensor


def _widened(qtensor: QTensor) -> QTensor:
    """The codes as the quantizer wrote them, for decoding (one module at a time)."""
    if qtensor.codes is None or qtensor.codes.dtype not in (torch.int8, torch.uint8) or qtensor.config.format == "fp8":
        return qtensor
    return replace(qtensor, codes=qtensor.codes.to(torch.int16))
