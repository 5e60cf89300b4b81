"""Perplexity, KL to the base model and top-1 agreement on evaluation text.

The base model's next-token distributions are computed once (`base_outputs`) and reused for
every variant evaluated against them, stored as float16 probabilities.
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import torch

from layerwise.data.windows import TokenWindows
from layerwise.evaluate.divergence import Reference, kl_per_token, top1_agreement
from layerwise.models.loading import LoadedModel
from layerwise.util.progress import progress_bars


@dataclass(frozen=True)
class Quality:
    perplexity: float
    kl: float  # mean KL(base || this) in nats per token; 0 for the base itself
    top1: float  # share of positions where this model's top token is the base's
    tokens: int  # predicted positions averaged over

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass
class BaseOutputs:
    windows: TokenWindows
    batch_size: int
    references: list[Reference]
    quality: Quality


def _nll_sum(logits: torch.Tensor, batch: torch.Tensor) -> float:
    logprobs = torch.log_softmax(logits.float(), dim=-1)
    return -logprobs.gather(-1, batch[:, 1:, None]).double().sum().item()


@torch.no_grad()
def base_outputs(loaded: LoadedModel, windows: TokenWindows, *, batch_size: int = 4,
                 progress: bool = True) -> BaseOutputs:
    """Run the base model once over `windows`; keep what every later comparison needs."""
    references, nll, count = [], 0.0, 0
    with progress_bars(progress) as bars:
        task = bars.add_task("base model", total=math.ceil(len(windows.input_ids) / batch_size))
        for batch in windows.batches(batch_size):
            batch = batch.to(loaded.input_device)
            logits = loaded.model(input_ids=batch, use_cache=False).logits[:, :-1]
            nll += _nll_sum(logits, batch)
            count += batch[:, 1:].numel()
            references.append(Reference.from_logits(logits, store=torch.float16))
            bars.advance(task)
    return BaseOutputs(windows, batch_size, references, Quality(math.exp(nll / count), 0.0, 1.0, count))


@torch.no_grad()
def evaluate(loaded: LoadedModel, base: BaseOutputs, *, progress: bool = True) -> Quality:
    """Perplexity of `loaded` on the base's windows, and its KL and top-1 agreement to the base.

    Perplexity uses the standard non-overlapping windows: each window predicts its own tokens
    1..T-1 from the preceding ones (no context carried across windows)."""
    nll, kl_total, agree_total, count = 0.0, 0.0, 0.0, 0
    with progress_bars(progress) as bars:
        task = bars.add_task("evaluating", total=len(base.references))
        for batch, reference in zip(base.windows.batches(base.batch_size), base.references):
            batch = batch.to(loaded.input_device)
            logits = loaded.model(input_ids=batch, use_cache=False).logits[:, :-1]
            nll += _nll_sum(logits, batch)
            kl_total += kl_per_token(reference, logits).double().sum().item()
            agree_total += top1_agreement(reference, logits).double().sum().item()
            count += batch[:, 1:].numel()
            bars.advance(task)
    return Quality(math.exp(nll / count), kl_total / count, agree_total / count, count)
