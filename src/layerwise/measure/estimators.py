"""Ways to fill a sensitivity table, from exact to cheap (a registry, `ESTIMATORS`).

Every estimator fills the same table (unit x option x domain), so allocators, reports and
`pareto` take any of them; the never-worse check still measures real KL on whole plans, so a poor
estimate costs quality, never the promise.

- `measured`: the KL at the head with only that unit quantized, re-running every block after it
  (about L/2 forward passes per entry): the reference.
- `local`: each entry's own block only: the squared error of the block's output on its cached
  inputs, turned into KL by one gain per block and domain, the ratio of KL to local error of the
  block's median entry, measured downstream once.
- `weights`: no pass per entry: each linear's weight error, column by column, weighted by the mean
  square of that input (llama.cpp's importance matrix), summed over the unit, as llama.cpp's
  target-size allocator estimates it. It knows nothing of depth: a unit's place in the model does
  not scale its error.
- `fisher`: no pass per entry either: KL(base || base + dW) ~ 1/2 sum F dW^2, with F the diagonal
  of the Fisher information of the unit's weights, from the squared gradient of the
  log-likelihood of tokens sampled from the model itself, one window at a time (a forward pass per
  window and a backward per draw of the tokens, FISHER_SAMPLES of them), per domain. In nats per
  token, and it knows depth.
- `noise`: `weights`' estimate, scaled per unit (and domain) by one measured gain: the KL at the
  head with the unit's weights disturbed by noise shaped like rounding error (uniform within the
  step of a 4-bit grid over groups of 64 inputs), over that noise's weighted error. One downstream
  pass per unit instead of one per entry (ExLlamaV3 measures sensitivity this way); it assumes the
  KL grows linearly with the weighted error across options.

The embedding and head, when they are units, are always measured (their error has no block to be
local to). Each estimator counts what it runs, in block evaluations, for the table's cost.
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from typing import Callable

import numpy as np
import torch
from torch import nn

from layerwise.engine.hooks import run_block, scoped_hooks
from layerwise.engine.replay import removed_unit
from layerwise.errors import LayerwiseError
from layerwise.models.layout import blocks_of, linear_weight, set_linear_weight, stored_transposed
from layerwise.models.loading import LoadedModel
from layerwise.plan.table import domain_means
from layerwise.plan.units import EDGE_KINDS, Unit


@dataclass
class EstimateContext:
    """What an estimator sees: the model, the base pass (`sensitivity._BaseRun`), the modules of
    every unit, the original weights of the unit being estimated, and a cache of its own."""
    loaded: LoadedModel
    base: object
    modules: dict[str, nn.Module]
    head: float  # the LM head's cost in blocks
    kl_from: Callable  # (model, adapter, base, block, removed) -> per-window KL
    window_domains: tuple[str, ...] = ()
    originals: dict[str, torch.Tensor] = field(default_factory=dict)
    cache: dict = field(default_factory=dict)
    advance: Callable[[], None] = lambda: None  # a `finish` step's downstream pass is done (progress)

    @property
    def batches(self) -> int:
        return len(self.base.calls)

    def downstream_runs(self, block: int) -> float:
        """Block evaluations of re-running from `block` (-1: the whole model) to the head."""
        return blocks_to_head(self.loaded.n_blocks, block, self.head) * self.batches


def blocks_to_head(n_blocks: int, block: int, head: float) -> float:
    """Block evaluations of re-running one batch from `block` (-1: the whole model) through the
    head, whose cost is `head` blocks."""
    return n_blocks - max(block, 0) + head


# (context, unit, removed kind or None) -> (per-window loss, block evaluations spent). The unit's
# weights are already set to the option's when it is called (removed: the unit is dropped instead).
Entry = Callable[[EstimateContext, Unit, "str | None"], tuple[np.ndarray, float]]
# Evaluates entry (unit index, option index) with a given Entry: (per-domain loss, block evaluations).
Evaluate = Callable[[int, int, Entry], tuple[np.ndarray, float]]


def _nothing(*_args) -> float:
    return 0.0


@dataclass(frozen=True)
class Estimator:
    name: str
    entry: Entry
    prepare: Callable[[EstimateContext], float] = _nothing  # before any entry; block evaluations
    # After every entry: may rewrite the [U, O, D] losses in place; block evaluations spent.
    finish: Callable[[EstimateContext, list[Unit], np.ndarray, Evaluate], float] = _nothing

    @property
    def finishes(self) -> bool:
        """Whether it does work after the entries (gains measured downstream)."""
        return self.finish is not _nothing


def measured_entry(context: EstimateContext, unit: Unit, removed: str | None) -> tuple[np.ndarray, float]:
    model, adapter = context.loaded.model, context.loaded.adapter
    return context.kl_from(model, adapter, context.base, unit.block, removed), context.downstream_runs(unit.block)


# --- local -----------------------------------------------------------------------------------

def _prepare_local(context: EstimateContext) -> float:
    """The base output of the last block (the others' are the next block's cached input)."""
    model, adapter = context.loaded.model, context.loaded.adapter
    last = context.loaded.n_blocks - 1
    block = blocks_of(model, adapter)[last]
    context.cache["last_outputs"] = [run_block(block, calls[last], calls[last].h_in).detach()
                                     for calls in context.base.calls]
    return float(context.batches)


def _base_output(context: EstimateContext, block: int, batch: int) -> torch.Tensor:
    if block + 1 < context.loaded.n_blocks:
        return context.base.calls[batch][block + 1].h_in
    return context.cache["last_outputs"][batch]


def _block_io(context: EstimateContext, block: int) -> list[tuple]:
    """Per batch, block `block`'s call, its input and the base model's output of it: from the base
    pass in memory; streamed, as the block being estimated is held (`cache["block_io"]`)."""
    if "block_io" in context.cache:
        return context.cache["block_io"]
    return [(calls[block], calls[block].h_in, _base_output(context, block, batch))
            for batch, calls in enumerate(context.base.calls)]


def local_entry(context: EstimateContext, unit: Unit, removed: str | None) -> tuple[np.ndarray, float]:
    model, adapter = context.loaded.model, context.loaded.adapter
    block = blocks_of(model, adapter)[unit.block]
    values = []
    for call, inputs, base in _block_io(context, unit.block):
        with removed_unit(block, adapter, removed) if removed else contextlib.nullcontext():
            output = run_block(block, call, inputs)
        error = (output.float() - base.float()).pow(2).sum(dim=-1)
        values.append(error[:, :-1].mean(dim=1).double().cpu().numpy())  # the positions KL is taken at
    return np.concatenate(values), float(len(values))


def _median_entry(losses: np.ndarray, entries: list[tuple[int, int]]) -> tuple[int, int] | None:
    """The entry whose mean loss is the median of `entries`' (on a log scale), among positive ones."""
    positive = [(u, o) for u, o in entries if losses[u, o].mean() > 0]
    if not positive:
        return None
    logs = np.log([losses[u, o].mean() for u, o in positive])
    return positive[int(np.argmin(np.abs(logs - np.median(logs))))]


def _finish_local(context: EstimateContext, units: list[Unit], losses: np.ndarray, evaluate: Evaluate) -> float:
    """Turn each block's local errors into KL: gain = KL / local error of the block's median entry,
    per domain (that entry's KL is then exact)."""
    runs = 0.0
    for block in sorted({unit.block for unit in units if unit.kind not in EDGE_KINDS}):
        entries = [(u, o) for u, unit in enumerate(units) if unit.block == block and unit.kind not in EDGE_KINDS
                   for o in range(losses.shape[1]) if np.all(np.isfinite(losses[u, o]))]
        chosen = _median_entry(losses, entries)
        if chosen is None:
            continue
        kl, spent = evaluate(*chosen, measured_entry)
        runs += spent
        context.advance()
        local = losses[chosen].copy()
        gain = np.divide(kl, local, out=np.zeros_like(local), where=local > 0)
        for u, o in entries:
            losses[u, o] *= gain
    return runs


# --- weights ---------------------------------------------------------------------------------

def column_squares(x: torch.Tensor) -> torch.Tensor:
    """Per window of a linear's input [windows, positions, in], the mean square of each column
    over the positions KL is taken at: [windows, in features], float32 on the CPU."""
    return x.detach().float()[:, :-1].pow(2).mean(dim=1).cpu()


def _prepare_weights(context: EstimateContext) -> float:
    """Per window, the mean square of every input column of every unit linear (one forward pass)."""
    model = context.loaded.model
    squares: dict[str, list[torch.Tensor]] = {name: [] for name in context.modules}

    def gather(name: str):
        def hook(module, args) -> None:
            squares[name].append(column_squares(args[0]))
        return hook

    def register(handles: list) -> None:
        for name, module in context.modules.items():
            handles.append(module.register_forward_pre_hook(gather(name)))

    with scoped_hooks(register), torch.no_grad():
        for ids in context.base.inputs:
            model(input_ids=ids, use_cache=False)
    context.cache["squares"] = {name: torch.cat(parts).double() for name, parts in squares.items() if parts}
    return (context.loaded.n_blocks + context.head) * context.batches


def weights_entry(context: EstimateContext, unit: Unit, removed: str | None) -> tuple[np.ndarray, float]:
    originals = {name: context.originals[name] for name in unit.modules}
    now = {name: torch.zeros_like(original) if removed else linear_weight(context.modules[name]).detach()
           for name, original in originals.items()}
    return weighted_error(context.cache["squares"], originals, now), 0.0


def weighted_error(squares: dict[str, torch.Tensor], originals: dict[str, torch.Tensor],
                   now: dict[str, torch.Tensor]) -> np.ndarray:
    """Per window, the error of weights `now` against `originals` ([out, in] each), column by
    column, weighted by the mean square of that input column (`squares`), summed over the linears."""
    total = None
    for name, original in originals.items():
        column_error = (original.double() - now[name].double()).pow(2).sum(dim=0)  # [in features]
        value = squares[name] @ column_error.cpu()  # [windows]
        total = value if total is None else total + value
    return total.numpy()


# --- fisher ----------------------------------------------------------------------------------

# Draws of the sampled tokens per window: each is a backward pass (about two forwards) and an
# independent estimate of the Fisher diagonal, whose window-level noise their mean averages out.
# On bench/sensitivity.py's calibration windows (bench/results/fisher_samples_ranks.json) more draws
# agreed only a little better with the measured table (top 10%: 0.83, 0.89, 0.86 for 1, 2, 4;
# per-option Spearman 0.957, 0.959, 0.962) for 1.5x and 2.5x the passes; the plans of more draws
# are not benchmarked yet, so one stays the default.
FISHER_SAMPLES = 1


def _prepare_fisher(context: EstimateContext) -> float:
    """Per domain, the diagonal Fisher information per token of every unit linear's weight."""
    model = context.loaded.model
    samples = FISHER_SAMPLES
    names = list(context.modules)
    parameters = [context.modules[name].weight for name in names]
    transposed = [stored_transposed(context.modules[name]) for name in names]
    trainable = {parameter: parameter.requires_grad for parameter in model.parameters()}
    fisher: dict[str, list[torch.Tensor]] = {}
    positions: dict[str, int] = {}
    generator = torch.Generator().manual_seed(0)  # the sampled tokens, so the table is reproducible
    window = 0
    try:
        for parameter in model.parameters():
            parameter.requires_grad_(False)
        for parameter in parameters:
            parameter.requires_grad_(True)
        for ids in context.base.inputs:
            for row in ids:  # one window at a time: cross terms vanish only in expectation, so fewer is less noise
                domain = context.window_domains[window]
                window += 1
                with torch.enable_grad():
                    logits = model(input_ids=row[None], use_cache=False).logits[0, :-1].float()
                    probabilities = logits.detach().softmax(-1).cpu()
                    for sample in range(samples):  # one forward, a backward per draw of the tokens
                        sampled = torch.multinomial(probabilities, 1, generator=generator)
                        loss = torch.nn.functional.cross_entropy(logits, sampled[:, 0].to(logits.device),
                                                                 reduction="sum")
                        # A routed expert no token of the window reached has a zero gradient.
                        grads = torch.autograd.grad(loss, parameters, retain_graph=sample + 1 < samples,
                                                    allow_unused=True, materialize_grads=True)
                        squares = [(g.t() if t else g).detach().float().pow(2) for g, t in zip(grads, transposed)]
                        if domain in fisher:
                            for total, square in zip(fisher[domain], squares):
                                total += square
                        else:
                            fisher[domain] = squares
                        positions[domain] = positions.get(domain, 0) + logits.shape[0]
    finally:
        for parameter, flag in trainable.items():
            parameter.requires_grad_(flag)
    context.cache["fisher"] = {domain: dict(zip(names, (total / positions[domain] for total in totals)))
                               for domain, totals in fisher.items()}
    return (1.0 + 2.0 * samples) * (context.loaded.n_blocks + context.head) * context.batches  # a backward ~ two forwards


def fisher_entry(context: EstimateContext, unit: Unit, removed: str | None) -> tuple[np.ndarray, float]:
    by_domain = {}
    for domain, fisher in context.cache["fisher"].items():
        total = 0.0
        for name in unit.modules:
            original = context.originals[name].float()
            now = torch.zeros_like(original) if removed else linear_weight(context.modules[name]).detach().float()
            total += 0.5 * float((fisher[name] * (original - now).pow(2)).sum())
        by_domain[domain] = total
    return np.array([by_domain[domain] for domain in context.window_domains]), 0.0


# --- noise -----------------------------------------------------------------------------------

NOISE_BITS, NOISE_GROUP = 4, 64


def rounding_noise(weight: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Noise a round-to-nearest quantizer would leave: uniform within half a step either side, the
    step of an asymmetric NOISE_BITS grid over groups of NOISE_GROUP inputs (whole rows when the
    row does not split into groups)."""
    rows, columns = weight.shape
    group = NOISE_GROUP if columns % NOISE_GROUP == 0 else columns
    grouped = weight.float().reshape(rows, columns // group, group)
    step = (grouped.amax(-1, keepdim=True) - grouped.amin(-1, keepdim=True)) / (2 ** NOISE_BITS - 1)
    uniform = torch.rand(grouped.shape, generator=generator).to(weight.device) - 0.5
    return (uniform * step).reshape(rows, columns).to(weight.dtype)


@dataclass(frozen=True)
class RoundingNoise:
    """What `noise` measures a unit under, in place of an option: its weights plus `rounding_noise`
    from a generator seeded with the unit's index (reproducible, and the same noise wherever the
    unit is measured, in memory or streamed)."""
    unit: int

    def weights(self, originals: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """The unit's noisy weights ([out, in] each), from its own `originals`, in their order."""
        generator = torch.Generator().manual_seed(self.unit)
        return {name: weight + rounding_noise(weight, generator) for name, weight in originals.items()}


def noise_gains(kl: np.ndarray, error: np.ndarray) -> np.ndarray:
    """Per domain, a unit's gain from its noisy copy's KL and weighted error (0 without error)."""
    return np.divide(kl, error, out=np.zeros_like(kl, dtype=float), where=error > 0)


def _finish_noise(context: EstimateContext, units: list[Unit], losses: np.ndarray, evaluate: Evaluate) -> float:
    """Per unit and domain, gain = KL / weighted error of one noisy copy of the unit's weights;
    every option's weighted error (the entries so far) times it."""

    model, adapter = context.loaded.model, context.loaded.adapter
    runs = 0.0
    for u, unit in enumerate(units):
        if unit.kind in EDGE_KINDS:
            continue
        context.originals = {name: linear_weight(context.modules[name]).detach().clone() for name in unit.modules}
        noisy = RoundingNoise(u).weights(context.originals)
        try:
            for name, weight in noisy.items():
                set_linear_weight(context.modules[name], weight)
            kl = context.kl_from(model, adapter, context.base, unit.block, None)
        finally:
            for name, weight in context.originals.items():
                set_linear_weight(context.modules[name], weight)
        error = weighted_error(context.cache["squares"], context.originals, noisy)
        runs += context.downstream_runs(unit.block)
        context.advance()
        losses[u] *= noise_gains(np.array(list(domain_means(kl, context.window_domains).values())),
                                 np.array(list(domain_means(error, context.window_domains).values())))
    return runs


ESTIMATORS: dict[str, Estimator] = {
    "measured": Estimator("measured", measured_entry),
    "local": Estimator("local", local_entry, _prepare_local, _finish_local),
    "weights": Estimator("weights", weights_entry, _prepare_weights),
    "fisher": Estimator("fisher", fisher_entry, _prepare_fisher),
    "noise": Estimator("noise", weights_entry, _prepare_weights, _finish_noise),
}
# `auto`: fisher's table, with the entries the plan hinges on then measured (`layerwise.measure.refine`),
# up to 0.1x the measured table's passes per plan. In bench/sensitivity.py (SmolLM2) its plans' test
# KL was 1.00x the measured table's at 3.25 bits and 1.016x [1.002, 1.030] (WikiText-2) and 1.013x
# [0.999, 1.027] (code) at 4.25, for 0.099x the passes; fisher alone, 1.041x [1.030, 1.051] on
# WikiText-2 at 4.25. What `compress` uses by default; `plan` keeps the measured table.
AUTO_ESTIMATOR = "fisher"
DEFAULT_ESTIMATOR = "measured"


def estimator_named(name: str) -> Estimator:
    """The estimator called `name`; "auto" is AUTO_ESTIMATOR (tables record the one that ran; the plan
    refines them, `run_plan(refine=)`)."""
    if name == "auto":
        name = AUTO_ESTIMATOR
    if name not in ESTIMATORS:
        raise LayerwiseError(f"unknown sensitivity estimator {name!r}; registered: {', '.join(ESTIMATORS)}, "
                             "or auto")
    return ESTIMATORS[name]
