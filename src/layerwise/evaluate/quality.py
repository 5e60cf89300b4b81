"""Perplexity, KL to the base model and top-1 agreement on evaluation text.

The base model's next-token distributions are computed once (`base_outputs`) and reused for
every variant evaluated against them, stored as float16 probabilities.
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field

import torch

from layerwise.data.windows import TokenWindows
from layerwise.evaluate.divergence import Reference, kl_per_token, top1_agreement
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


def _window_nll(logits: torch.Tensor, batch: torch.Tensor) -> list[float]:
    logprobs = torch.log_softmax(logits.float(), dim=-1)
    return (-logprobs.gather(-1, batch[:, 1:, None])).double().sum(dim=(1, 2)).tolist()


@torch.no_grad()
def base_outputs(loaded: LoadedModel, windows: TokenWindows, *, batch_size: int = 4,
                 progress: bool = True) -> BaseOutputs:
    """Run the base model once over `windows`; keep what every later comparison needs."""
    references, nll = [], []
    with progress_bars(progress) as bars:
        task = bars.add_task("base model", total=math.ceil(len(windows.input_ids) / batch_size))
        for batch in windows.batches(batch_size):
            batch = batch.to(loaded.input_device)
            logits = loaded.model(input_ids=batch, use_cache=False).logits[:, :-1]
            nll += _window_nll(logits, batch)
            references.append(Reference.from_logits(logits, store=torch.float16))
            bars.advance(task)
    per_window = windows.input_ids.shape[1] - 1
    count = per_window * len(nll)
    quality = Quality(math.exp(sum(nll) / count), 0.0, 1.0, count, (0.0,) * len(nll), tuple(nll),
                      (per_window,) * len(nll))
    return BaseOutputs(windows, batch_size, references, quality)


@torch.no_grad()
def evaluate(loaded: LoadedModel, base: BaseOutputs, *, progress: bool = True) -> Quality:
    """Perplexity of `loaded` on the base's windows, and its KL and top-1 agreement to the base.

    Perplexity uses the standard non-overlapping windows: each window predicts its own tokens
    1..T-1 from the preceding ones (no context carried across windows)."""
    nll, window_kl, agree_total = [], [], 0.0
    with progress_bars(progress) as bars:
        task = bars.add_task("evaluating", total=len(base.references))
        for batch, reference in zip(base.windows.batches(base.batch_size), base.references):
            batch = batch.to(loaded.input_device)
            logits = loaded.model(input_ids=batch, use_cache=False).logits[:, :-1]
            nll += _window_nll(logits, batch)
            kl = kl_per_token(reference, logits).double()
            window_kl += kl.reshape(kl.shape[0], -1).mean(dim=1).tolist()
            agree_total += top1_agreement(reference, logits).double().sum().item()
            bars.advance(task)
    per_window = base.windows.input_ids.shape[1] - 1
    count = per_window * len(nll)
    return Quality(math.exp(sum(nll) / count), sum(window_kl) / len(window_kl), agree_total / count, count,
                   tuple(window_kl), tuple(nll), (per_window,) * len(nll))
