"""Estimated sensitivity tables of a streamed model (issue 17): every estimator of
`layerwise.measure.estimators`, one block's weights in memory at a time, and the measurements
with which a plan refines them (`auto`).

The estimators' own entry functions give every entry, called while the unit's block is held with
the unit quantized; only what they are given is gathered otherwise:
- `weights` (and `noise`): the mean square of every unit linear's input columns per window, taken
  as each block runs on the calibration windows;
- `local`: each block's inputs and base outputs, as the block runs;
- `fisher`: the squared gradient of the log-likelihood of tokens sampled from the model, by a
  backward pass a block at a time: the forward pass keeps every block's inputs in a scratch file,
  the head gives the gradient at the last block's output (its logits made for a few positions at a
  time, from head slices: never a whole distribution of every position), and each block, read
  again in reverse order, is run forward with gradients from its kept input and backward from its
  output's gradient. The tokens are drawn from the same generator in the same order as in memory,
  so the table is the in-memory one up to float rounding.
What `local` and `noise` then measure downstream (a block's median entry; a unit with rounding
noise) is measured from every block's kept inputs (`finish_streamed`). The embedding and head,
when they are units, are measured (`measure_entries`), as in memory.
"""
from __future__ import annotations

import contextlib
import time
from typing import Callable

import numpy as np
import torch
from torch import nn

from layerwise.data.windows import TokenWindows
from layerwise.engine.hooks import BlockCall, advance_batches, run_block, scoped_hooks, take_first_inputs
from layerwise.engine.replay import calls_of
from layerwise.engine.sliced_kl import SlicedKL, head_slices
from layerwise.errors import LayerwiseError
from layerwise.measure.estimators import (FISHER_SAMPLES, EstimateContext, Estimator, RoundingNoise, column_squares,
                                         noise_gains, weighted_error)
from layerwise.measure.streamed import StreamedEntries, _entry_outputs, _part, _statistics, measure_entries
from layerwise.models.layout import blocks_of, linear_weight, stored_transposed
from layerwise.models.loading import LoadedModel
from layerwise.models.streaming import held
from layerwise.plan.options import DROP
from layerwise.plan.table import domain_means
from layerwise.plan.units import EDGE_KINDS, Unit
from layerwise.util.tensor_files import TensorSlots

# Logits of the head made at once (positions x vocabulary, float32) while the sampled tokens'
# gradient is taken: a few copies of 16 MB.
_GRADIENT_LOGITS = 1 << 22


@torch.no_grad()
def estimate_entries(loaded: LoadedModel, calibration: TokenWindows, units: list[Unit], configs: list,
                     modules: dict[str, nn.Module], *, method: Estimator, importance: dict,
                     statistics: TokenWindows | None, batch_size: int, head: float,
                     record: Callable[[int, int, np.ndarray | None, float | None, str | None, float], None],
                     first_unit: int = 0, block_done: Callable[[int], None] = lambda units_done: None
                     ) -> tuple[StreamedEntries, float, EstimateContext]:
    """Every entry (unit u >= `first_unit`, option o) of a streamed model's table estimated by
    `method`: `record(u, o, per-window values, stored bits, why skipped, block evaluations)`, a
    block at a time, then `block_done(units done)`; the embedding's and head's entries measured.
    Returns the base pass, the block evaluations the estimate's preparation spent (a window
    counted as a batch, as the base pass counts them), and the context `finish_streamed` takes
    (for `noise`, every unit's noisy copy's weighted error, from first_unit 0 on)."""
    model, adapter, streamed = loaded.model, loaded.adapter, loaded.streamed
    windows, seq_len = calibration.input_ids.shape
    edges = [u for u, unit in enumerate(units) if u >= first_unit and unit.kind in EDGE_KINDS]
    if edges:
        run = measure_entries(loaded, calibration, units, configs, modules, importance=importance,
                              statistics=statistics, batch_size=batch_size, head=head, record=record,
                              first_unit=first_unit, block_done=block_done, wanted=set(edges))
    else:
        run = StreamedEntries(0.0, windows * (seq_len - 1), windows)
    started = time.perf_counter()
    # Units whose block is visited: those with entries left, and for `noise` every unit (its gain
    # needs its noisy copy's weighted error, also after a resumed table).
    by_block: dict[int, list[int]] = {}
    noisy: dict[int, list[int]] = {}
    for u, unit in enumerate(units):
        if unit.kind not in EDGE_KINDS:
            if u >= first_unit:
                by_block.setdefault(unit.block, []).append(u)
            if method.name == "noise":
                noisy.setdefault(unit.block, []).append(u)
    context = EstimateContext(loaded, None, modules, head, None, tuple(calibration.window_domains))
    squared = method.name in ("weights", "noise")  # the input columns' mean squares weigh the error
    # Block evaluations, counted a window at a time as `run` counts them (the passes come out as in memory).
    if method.name == "fisher":
        linears: dict[int, list[str]] = {}
        for unit in units:
            if unit.kind not in EDGE_KINDS:
                linears.setdefault(unit.block, []).extend(unit.modules)
        context.cache["fisher"] = streamed_fisher(loaded, calibration, linears, samples=FISHER_SAMPLES)
        prepared = (1.0 + 2.0 * FISHER_SAMPLES) * (loaded.n_blocks + head) * windows  # a backward ~ two forwards
    elif squared:
        context.cache["squares"] = {}
        prepared = (loaded.n_blocks + head) * windows
    else:  # local: in memory, the last block's base outputs
        prepared = float(windows)
    algorithms = {config.algorithm for config in configs if config != DROP} - {"rtn"}
    calls = calls_of(loaded, calibration) if method.name != "fisher" else []
    stat_calls = calls_of(loaded, statistics or calibration, batch_size) if algorithms else []
    hidden, stat_hidden = take_first_inputs(calls), take_first_inputs(stat_calls)
    for index, block in enumerate(blocks_of(model, adapter)):
        if not (by_block.keys() | noisy.keys()) - set(range(index)):
            break  # no entries left
        todo = by_block.get(index, [])
        names = [name for u in todo for name in units[u].modules]
        if squared:
            seen = sorted(set(todo) | set(noisy.get(index, [])))
            hooks = scoped_hooks(_squares_hooks(modules, [n for u in seen for n in units[u].modules],
                                                context.cache["squares"]))
        with held(streamed, _part(loaded, index)):
            inputs = list(hidden)  # the block's inputs, which its outputs replace in `hidden`
            with hooks if squared else contextlib.nullcontext():
                hidden = advance_batches(block, calls, hidden, index)
            if method.name == "local":
                context.cache["block_io"] = [(batch[index], inputs[b], hidden[b]) for b, batch in enumerate(calls)]
            del inputs
            stats = _statistics(model, block, names, algorithms, stat_calls, stat_hidden, index) if todo else {}
            for u in todo:
                for o, config in enumerate(configs):
                    values, bits, why, runs = _estimate(context, method, units[u], config, stats, importance)
                    record(u, o, values, bits, why, runs)
            for u in noisy.get(index, []):
                originals = {name: linear_weight(modules[name]).detach().clone() for name in units[u].modules}
                context.cache.setdefault("noise_errors", {})[u] = weighted_error(
                    context.cache["squares"], originals, RoundingNoise(u).weights(originals))
            context.cache.pop("block_io", None)
            del stats
            stat_hidden = advance_batches(block, stat_calls, stat_hidden, index)
        if todo:
            block_done(max(todo) + 1)
    if not edges:
        run.seconds = time.perf_counter() - started  # the estimate's own passes: its base pass
    return run, prepared, context


def finish_streamed(context: EstimateContext, method: Estimator, units: list[Unit], configs: list,
                    losses: np.ndarray, calibration: TokenWindows, domains: list[str], *, importance: dict,
                    statistics: TokenWindows | None, batch_size: int) -> float:
    """`method`'s finish on a streamed model, after `estimate_entries`: the entries it measures
    downstream (`local`: each block's median entry; `noise`: each unit with its rounding noise)
    measured from every block's kept inputs (`StreamedEntryMeasurer`), and `losses` ([unit,
    option, domain]) scaled by the gains, as in memory. Returns the block evaluations spent."""
    loaded = context.loaded
    measurer = StreamedEntryMeasurer(loaded, units, configs, domains, calibration, importance=importance,
                                     statistics=statistics, batch_size=batch_size)
    per_pass = (loaded.n_blocks + context.head) * len(measurer.calls)

    def evaluate(u: int, o: int, entry) -> tuple[np.ndarray, float]:
        kl, passes = measurer(u, o)
        return kl, passes * per_pass

    if method.name != "noise":
        return method.finish(context, units, losses, evaluate)
    runs = 0.0
    for u, unit in enumerate(units):
        if unit.kind in EDGE_KINDS:
            continue
        kl, passes = measurer.measure(u, RoundingNoise(u))
        runs += passes * per_pass
        context.advance()
        error = domain_means(context.cache["noise_errors"][u], calibration.window_domains)
        losses[u] *= noise_gains(kl, np.array([error[name] for name in domains]))
    return runs


def _squares_hooks(modules: dict[str, nn.Module], names: list[str], squares: dict[str, torch.Tensor]):
    """Hooks keeping, per window, the mean square of each input column of `names` (as `weights`
    gathers them in memory), appended a window at a time."""
    def gather(name: str):
        def hook(module, args) -> None:
            value = column_squares(args[0]).double()
            squares[name] = value if name not in squares else torch.cat([squares[name], value])
        return hook

    def register(handles: list) -> None:
        for name in names:
            handles.append(modules[name].register_forward_pre_hook(gather(name)))
    return register


def _estimate(context: EstimateContext, method: Estimator, unit: Unit, config, stats: dict,
              importance: dict) -> tuple[np.ndarray | None, float | None, str | None, float]:
    """One entry by the estimator's own function (`sensitivity.evaluate_entry`, a held block's
    unit): (per-window values, stored bits or None when dropped, why skipped, block evaluations)."""
    from layerwise.measure.sensitivity import evaluate_entry

    try:
        values, runs, bits = evaluate_entry(context, unit, config, stats, importance, method.entry)
    except LayerwiseError as error:
        return None, None, str(error), 0.0
    return values, bits, None, runs


def kept_block_inputs(loaded: LoadedModel, calls: list[list[BlockCall]]) -> tuple[TensorSlots, list[torch.Tensor]]:
    """One pass over `calls` (each block held once for all batches) keeping every block's inputs
    in an unnamed scratch file (slot b: block b's), and the last block's outputs."""
    hidden = take_first_inputs(calls)
    inputs = TensorSlots([tuple(state.shape) for state in hidden], hidden[0].dtype)
    for index, block in enumerate(blocks_of(loaded.model, loaded.adapter)):
        inputs.write(index, hidden)
        with held(loaded.streamed, _part(loaded, index)):
            hidden = advance_batches(block, calls, hidden, index)
    return inputs, hidden


def streamed_fisher(loaded: LoadedModel, calibration: TokenWindows, linears: dict[int, list[str]], *,
                    samples: int = FISHER_SAMPLES) -> dict[str, dict[str, torch.Tensor]]:
    """Per domain, the diagonal Fisher information per token of the weights of `linears` (block
    index -> its unit linears), as `estimators._prepare_fisher` computes it in memory, a block at a
    time."""
    model, adapter, streamed = loaded.model, loaded.adapter, loaded.streamed
    blocks = blocks_of(model, adapter)
    calls = calls_of(loaded, calibration)
    inputs, hidden = kept_block_inputs(loaded, calls)
    try:
        generator = torch.Generator().manual_seed(0)  # as in memory: the same draws in the same order
        # gradients[window][sample]: d(sampled tokens' log-likelihood) / d(the block output reached)
        gradients = [_head_gradients(loaded, final, samples, generator) for final in hidden]
        del hidden
        domains = calibration.window_domains
        positions: dict[str, int] = {}
        for window, ids in enumerate(calibration.input_ids):
            positions[domains[window]] = positions.get(domains[window], 0) + samples * (ids.shape[0] - 1)
        fisher: dict[str, dict[str, torch.Tensor]] = {domain: {} for domain in positions}
        for index in reversed(range(len(blocks))):
            owned = linears.get(index, [])
            with held(streamed, _part(loaded, index)):
                for window, state in enumerate(inputs.read(index)):
                    squares = _block_backward(model, blocks[index], calls[window][index], state, gradients[window],
                                              {name: model.get_submodule(name) for name in owned})
                    totals = fisher[domains[window]]
                    for name, square in squares.items():
                        if name in totals:
                            totals[name] += square
                        else:
                            totals[name] = square
    finally:
        inputs.close()
    return {domain: {name: total / positions[domain] for name, total in totals.items()}
            for domain, totals in fisher.items()}


def _block_backward(model: nn.Module, block: nn.Module, call: BlockCall, state: torch.Tensor,
                    gradients: list[torch.Tensor], modules: dict[str, nn.Module]) -> dict[str, torch.Tensor]:
    """The block run forward from its kept input with gradients; per sample, backward from its
    output's gradient: the squared gradients of `modules`' weights ([out, in], summed over the
    samples), and each sample's gradient at the block's input (written over `gradients`)."""
    parameters = [module.weight for module in modules.values()]
    trainable = {parameter: parameter.requires_grad for parameter in block.parameters()}
    squares: dict[str, torch.Tensor] = {}
    try:
        for parameter in block.parameters():
            parameter.requires_grad_(False)
        for parameter in parameters:
            parameter.requires_grad_(True)
        with torch.enable_grad():
            x = state.detach().requires_grad_(True)
            output = run_block(block, call, x)
            for sample, gradient in enumerate(gradients):
                got = torch.autograd.grad(output, [x, *parameters], grad_outputs=gradient.to(output.dtype),
                                          retain_graph=sample + 1 < len(gradients), allow_unused=True,
                                          materialize_grads=True)
                gradients[sample] = got[0].detach()
                for (name, module), grad in zip(modules.items(), got[1:]):
                    square = (grad.t() if stored_transposed(module) else grad).detach().float().pow(2)
                    squares[name] = square if name not in squares else squares[name] + square
    finally:
        for parameter, flag in trainable.items():
            parameter.requires_grad_(flag)
    return squares


def _head_gradients(loaded: LoadedModel, final: torch.Tensor, samples: int,
                    generator: torch.Generator) -> list[torch.Tensor]:
    """For one window's last block output [1, positions, hidden]: per draw of tokens from the
    model's own next-token distributions, the gradient of their summed cross-entropy at that
    output. The logits are made for a few positions at a time from head slices; their gradient,
    softmax less the drawn token (through the soft cap, if any), goes back through the slices,
    then through the final norm by autograd."""
    model, adapter = loaded.model, loaded.adapter
    norm = model.get_submodule(adapter.final_norm)
    softcap = getattr(model.config, "final_logit_softcapping", None)
    vocab = model.get_submodule(adapter.lm_head).weight.shape[0]
    with torch.enable_grad():
        states = final.detach().requires_grad_(True)
        normed = norm(states)
    predicting = normed[0, :-1].detach()  # the positions whose next token is scored
    rows = max(1, _GRADIENT_LOGITS // vocab)
    gradients = []
    for sample in range(samples):
        at_normed = torch.zeros_like(predicting)
        for start in range(0, predicting.shape[0], rows):
            part = predicting[start:start + rows]
            logits = torch.empty(part.shape[0], vocab, dtype=torch.float32, device=part.device)
            for first, end, weight, bias in head_slices(loaded):
                pre = nn.functional.linear(part, weight, bias)
                logits[:, first:end] = (torch.tanh(pre / softcap) * softcap if softcap else pre).float()
            probabilities = logits.softmax(-1)
            drawn = torch.multinomial(probabilities.cpu(), 1, generator=generator)[:, 0].to(part.device)
            upstream = probabilities  # d(sum of cross-entropies) / d logits: softmax less the drawn token
            upstream[torch.arange(part.shape[0], device=part.device), drawn] -= 1.0
            if softcap:
                upstream = upstream * (1.0 - (logits / softcap).pow(2))
            del logits
            for first, end, weight, _ in head_slices(loaded):
                at_normed[start:start + part.shape[0]] += upstream[:, first:end].to(weight.dtype) @ weight
            del upstream, probabilities
        full = torch.zeros_like(normed)
        full[0, :-1] = at_normed
        gradients.append(torch.autograd.grad(normed, states, grad_outputs=full, retain_graph=sample + 1 < samples)[0])
    return gradients


class StreamedEntryMeasurer:
    """`measurer(u, o)` -> (the KL per domain of entry (u, o), passes spent), as
    `sensitivity.entry_measurer` measures it in memory, for the entries a plan refines on a
    streamed model: one base pass keeps every block's inputs (and the GPTQ/AWQ statistics
    windows' inputs) in unnamed scratch files (gone with the measurer), so an entry of block b
    reads blocks b..L-1 only."""

    def __init__(self, loaded: LoadedModel, units: list[Unit], configs: list, domains: list[str] | None,
                 calibration: TokenWindows, *, importance: dict | None = None, statistics: TokenWindows | None = None,
                 batch_size: int = 4) -> None:
        self.loaded, self.units, self.configs, self.importance = loaded, units, configs, importance or {}
        self.modules = {name: loaded.model.get_submodule(name) for unit in units for name in unit.modules}
        self.algorithms = {config.algorithm for config in configs if config != DROP} - {"rtn"}
        self.window_domains = calibration.window_domains
        self.domains = domains or list(dict.fromkeys(calibration.window_domains))
        self.calls = calls_of(loaded, calibration)
        self.stat_calls = calls_of(loaded, statistics or calibration, batch_size) if self.algorithms else []
        self.inputs, finals = kept_block_inputs(loaded, self.calls)
        self.stat_inputs = kept_block_inputs(loaded, self.stat_calls)[0] if self.stat_calls else None
        self.device = finals[0].device
        self.kl = SlicedKL(loaded, finals, torch.float16)
        self.first = True

    def __call__(self, u: int, o: int) -> tuple[np.ndarray, float]:
        return self.measure(u, self.configs[o])

    def measure(self, u: int, config) -> tuple[np.ndarray, float]:
        """Unit u under `config` (an option, or `RoundingNoise`): the KL per domain, passes spent."""
        from layerwise.measure.sensitivity import entry_passes

        unit = self.units[u]
        if unit.kind in EDGE_KINDS:
            raise LayerwiseError(f"{unit.name}: the embedding's and head's entries are measured with the table")
        model, adapter, streamed = self.loaded.model, self.loaded.adapter, self.loaded.streamed
        blocks = blocks_of(model, adapter)
        index = unit.block
        hidden = [state.to(self.device) for state in self.inputs.read(index)]

        def refuse(_u, _o, _values, _bits, why, _runs) -> None:
            raise LayerwiseError(why)

        with torch.no_grad():
            with held(streamed, _part(self.loaded, index)):
                stats = {}
                if self.stat_inputs is not None:
                    stat_hidden = [state.to(self.device) for state in self.stat_inputs.read(index)]
                    stats = _statistics(model, blocks[index], list(unit.modules), self.algorithms, self.stat_calls,
                                        stat_hidden, index)
                hidden, _ = _entry_outputs(blocks[index], adapter, self.modules, unit, config, stats,
                                           self.importance, self.calls, hidden, index, refuse, u, -1)
            for later in range(index + 1, len(blocks)):
                with held(streamed, _part(self.loaded, later)):
                    hidden = advance_batches(blocks[later], self.calls, hidden, later)
            normed = [self.kl.normed(state) for state in hidden]
            values = self.kl.window_kl(1, lambda _, part, window, start, stop: normed[part][window, start:stop])[0]
        means = domain_means(values, self.window_domains)
        spent = entry_passes(self.loaded, unit) + (1.0 if self.first else 0.0)  # the base pass, once
        self.first = False
        return np.array([means[name] for name in self.domains]), spent
