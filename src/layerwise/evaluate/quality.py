"""Perplexity, KL to the base model and top-1 agreement on evaluation text.

The base model's next-token distributions are computed once (`base_outputs`) and reused for
every variant evaluated against them, stored as float16 probabilities. Models run to their last
block's output; the head is applied a chunk of positions at a time.
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import Sequence

import numpy as np
import torch

from layerwise.data.windows import TokenWindows
from layerwise.engine.divergence import Reference, kl_per_token, top1_agreement
from layerwise.engine.replay import final_hidden, final_states_streamed, head_chunks, paired_head
from layerwise.models.loading import LoadedModel
from layerwise.util.intervals import mean_ci, perplexity_ci
from layerwise.util.progress import progress_bars


@dataclass(frozen=True)
class Quality:
    perplexity: float
    kl: float  # mean KL(base || this) in nats per token; 0 for the base itself
    top1: float  # share of positions where this model's top token is the base's
    tokens: int  # predicted positions averaged over
    # Per evaluation window (all windows predict the same number of tokens): what the 95%
    # bootstrap intervals are computed from, and what paired comparisons of two models need.
    window_kl: tuple[float, ...] = field(default=(), repr=False)
    window_nll: tuple[float, ...] = field(default=(), repr=False)
    window_tokens: tuple[int, ...] = field(default=(), repr=False)
    # The tail of the per-token KL, as llama-perplexity --kl-divergence reports it: a plan can
    # lower the mean and still leave a few tokens far off.
    kl_p99: float = 0.0
    kl_p999: float = 0.0

    @property
    def kl_ci(self) -> list[float]:
        return mean_ci(self.window_kl) if self.window_kl else [self.kl, self.kl]

    @property
    def perplexity_ci(self) -> list[float]:
        if not self.window_nll:
            return [self.perplexity, self.perplexity]
        return perplexity_ci(self.window_nll, self.window_tokens)

    def to_dict(self) -> dict:
        return asdict(self) | {"kl_ci": self.kl_ci, "perplexity_ci": self.perplexity_ci}


@dataclass
class BaseOutputs:
    windows: TokenWindows
    batch_size: int
    references: list[Reference]
    quality: Quality


@torch.no_grad()
def base_outputs(loaded: LoadedModel, windows: TokenWindows, *, batch_size: int = 4,
                 progress: bool = True) -> BaseOutputs:
    """Run the base model once over `windows`; keep what every later comparison needs (its
    next-token distributions as float16, filled a chunk of positions at a time)."""
    references, nll = [], []
    positions = windows.input_ids.shape[1] - 1
    vocab = loaded.model.get_submodule(loaded.adapter.lm_head).weight.shape[0]
    with progress_bars(progress) as bars:
        task = bars.add_task("base model", total=math.ceil(len(windows.input_ids) / batch_size))
        for batch in windows.batches(batch_size):
            batch = batch.to(loaded.input_device)
            final = final_hidden(loaded.model, loaded.adapter, batch)
            reference = Reference.empty(len(batch), positions, vocab, torch.float16, batch.device)
            batch_nll = [0.0] * len(batch)
            for window, start, stop, logits in head_chunks(loaded.model, loaded.adapter, final):
                batch_nll[window] += _nll_sum(logits, batch[window, start + 1:stop + 1])
                reference.put(window, start, Reference.from_logits(logits, store=torch.float16))
            nll += batch_nll
            references.append(reference)
            bars.advance(task)
    count = positions * len(nll)
    quality = Quality(math.exp(sum(nll) / count), 0.0, 1.0, count, (0.0,) * len(nll), tuple(nll),
                      (positions,) * len(nll))
    return BaseOutputs(windows, batch_size, references, quality)


@torch.no_grad()
def evaluate(loaded: LoadedModel, base: BaseOutputs, *, progress: bool = True) -> Quality:
    """Perplexity of `loaded` on the base's windows, and its KL and top-1 agreement to the base.

    Perplexity uses the standard non-overlapping windows: each window predicts its own tokens
    1..T-1 from the preceding ones (no context carried across windows)."""
    nll, window_kl, token_kl, agree_total = [], [], [], 0.0
    positions = base.windows.input_ids.shape[1] - 1
    with progress_bars(progress) as bars:
        task = bars.add_task("evaluating", total=len(base.references))
        for batch, reference in zip(base.windows.batches(base.batch_size), base.references):
            batch = batch.to(loaded.input_device)
            final = final_hidden(loaded.model, loaded.adapter, batch)
            batch_nll, batch_kl = [0.0] * len(batch), [0.0] * len(batch)
            for window, start, stop, logits in head_chunks(loaded.model, loaded.adapter, final):
                batch_nll[window] += _nll_sum(logits, batch[window, start + 1:stop + 1])
                part = reference.part(window, start, stop)
                token_kl.append(kl_per_token(part, logits).float().cpu())
                batch_kl[window] += token_kl[-1].double().sum().item()
                agree_total += top1_agreement(part, logits).double().sum().item()
            nll += batch_nll
            window_kl += [total / positions for total in batch_kl]
            bars.advance(task)
    count = positions * len(nll)
    return Quality(math.exp(sum(nll) / count), sum(window_kl) / len(window_kl), agree_total / count, count,
                   tuple(window_kl), tuple(nll), (positions,) * len(nll), *_tail(token_kl))


@torch.no_grad()
def compare_streamed(loaded: LoadedModel, windows: TokenWindows, *, compare: bool = True,
                     order: Sequence[int] | None = None, progress: bool = True) -> tuple[Quality, Quality | None]:
    """For a streamed model (`load_model(streaming=True)`): the quality of the base model (its
    checkpoint as it is) and of the model with its overrides (quantized weights) and its blocks
    run in `order` (as `prune.depth.schedule` runs them; default: the model's own), against it,
    as `base_outputs` and `evaluate` measure them. Each runs block by block, a block read once
    for all windows and run on one window at a time (a batch of windows would only add
    activations); the head is then applied a window and a chunk of positions at a time, so no
    distribution outlives its chunk (no stored references, no second model). With
    `compare=False`, only the base model runs (and None stands for the other quality)."""
    base_nll, nll, window_kl, token_kl, agree_total = [], [], [], [], 0.0
    positions = windows.input_ids.shape[1] - 1
    inputs = [batch for batch in windows.batches(1)]
    with progress_bars(progress) as bars:
        task = bars.add_task("base and quantized", total=_block_runs(loaded, compare, order) + len(inputs))
        base_final, final = final_states_streamed(loaded, inputs, compare, order, lambda: bars.advance(task))
        for window, (base_state, state) in enumerate(zip(base_final, final or base_final)):
            targets = windows.input_ids[window, 1:].to(base_state.device)
            base_total = total_nll = total_kl = 0.0
            for start, stop, base_logits, logits in paired_head(loaded, base_state[0], state[0] if compare else None):
                base_total += _nll_sum(base_logits, targets[start:stop])
                if logits is None:
                    continue
                reference = Reference.from_logits(base_logits, store=torch.float16)
                total_nll += _nll_sum(logits, targets[start:stop])
                token_kl.append(kl_per_token(reference, logits).float().cpu())
                total_kl += token_kl[-1].double().sum().item()
                agree_total += top1_agreement(reference, logits).double().sum().item()
            base_nll.append(base_total)
            bars.advance(task)
            if compare:
                nll.append(total_nll)
                window_kl.append(total_kl / positions)
    count = positions * len(base_nll)
    base = Quality(math.exp(sum(base_nll) / count), 0.0, 1.0, count, (0.0,) * len(base_nll), tuple(base_nll),
                   (positions,) * len(base_nll))
    if not compare:
        return base, None
    return base, Quality(math.exp(sum(nll) / count), sum(window_kl) / len(window_kl), agree_total / count, count,
                         tuple(window_kl), tuple(nll), (positions,) * len(nll), *_tail(token_kl))


def _block_runs(loaded: LoadedModel, compare: bool, order: Sequence[int] | None) -> int:
    return loaded.n_blocks + ((loaded.n_blocks if order is None else len(order)) if compare else 0)


def _tail(token_kl: list[torch.Tensor]) -> tuple[float, float]:
    """The 99th and 99.9th percentiles of the per-token KL (linear interpolation, as numpy's)."""
    values = torch.cat(token_kl).double().numpy()
    return float(np.percentile(values, 99.0)), float(np.percentile(values, 99.9))


def _nll_sum(logits: torch.Tensor, targets: torch.Tensor) -> float:
    """Summed negative log-likelihood of `targets` under `logits` ([positions, vocab])."""
    return -torch.log_softmax(logits.float(), dim=-1).gather(-1, targets[:, None]).double().sum().item()
