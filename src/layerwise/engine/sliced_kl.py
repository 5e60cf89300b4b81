"""KL(base || variant) summed at the head a slice of vocabulary rows at a time, for many variants
at once: no position's full distribution is ever in memory, and a streamed head is read one slice
at a time (`SlicedKL`). The streamed sensitivity table and plan check (`measure.streamed`) and the
profile's ablation (`profile.runner`) compare their variants with the base model this way.

KL = sum p log p - sum p z + logsumexp(z) * sum p, with z the variant's logits, p the base model's
probabilities (rounded as an in-memory reference would store them) and a running log-sum-exp.
"""
from __future__ import annotations

from typing import Callable, Iterator, Sequence

import numpy as np
import torch
from torch import nn

from layerwise.models.loading import LoadedModel
from layerwise.models.streaming import has_overrides, head_rows, head_step, held
from layerwise.util.memory import trim_freed_memory

# Logits made at once while KL is summed over vocabulary slices (float32; a few temporaries of
# this size and twice it in float64).
_LOGIT_ELEMENTS = 1 << 20
# The pieces a head slice is cut into when a variant applies its own head.
_HEAD_PIECES = 4


def plain_head(loaded: LoadedModel) -> bool:
    """Whether the head is a plain linear, which `SlicedKL` applies a slice of rows at a time."""
    return type(loaded.model.get_submodule(loaded.adapter.lm_head)) is nn.Linear


def head_slices(loaded: LoadedModel) -> Iterator[tuple[int, int, torch.Tensor, torch.Tensor | None]]:
    """(first row, end row, weight rows, bias rows) of the head, a slice of vocabulary rows at a
    time: read from the checkpoint, or from the head held whole where it is not read in slices (a
    GGUF output tensor, a bias, an overridden head)."""
    streamed, path = loaded.streamed, loaded.adapter.lm_head
    head = loaded.model.get_submodule(path)
    vocab, width = head.weight.shape
    step = head_step(width)
    if streamed is not None and path in streamed.sliced and head.bias is None and not has_overrides(streamed, path):
        for start in range(0, vocab, step):
            stop = min(vocab, start + step)
            yield start, stop, head_rows(streamed, path, start, stop, head.weight.dtype), None
        return
    with held(streamed, path):
        for start in range(0, vocab, step):
            stop = min(vocab, start + step)
            yield start, stop, head.weight[start:stop], None if head.bias is None else head.bias[start:stop]

class SlicedKL:
    """Per window, the mean KL(base || variant) over its next-token positions (`every_position`:
    the last position too, whose distribution is there though no token of the window follows),
    for many variants at once, the head read a slice of vocabulary rows at a time (once per call
    for all variants; a head other than a plain linear is applied whole to fewer positions).

    `finals` are the base model's last block outputs per batch (replaced in the list by their
    normed states, so the two are never held at once; `normed=True` where they already are); the
    base distributions are stored in `store` precision as the in-memory references are (float16
    for the table, float32 for the check and the ablation) and recomputed from `finals` slice by
    slice, never kept whole. Variants' states are given through the final norm (`normed`), once,
    not for every slice."""

    def __init__(self, loaded: LoadedModel, finals: list[torch.Tensor], store: torch.dtype, *,
                 normed: bool = False, every_position: bool = False) -> None:
        model, adapter = loaded.model, loaded.adapter
        self.loaded, self.store = loaded, store
        self.norm = model.get_submodule(adapter.final_norm)
        if not normed:
            for part, final in enumerate(finals):
                finals[part] = self.normed(final)
                del final  # else the loop variable keeps the last raw state through the sums below
        self.finals = finals
        self.device = finals[0].device  # where the sums run: beside the states and the head
        self.head = model.get_submodule(adapter.lm_head)
        self.softcap = getattr(model.config, "final_logit_softcapping", None)
        # A head other than a plain linear (a quantized module) is applied whole, to fewer
        # positions at a time: its logits for a chunk are then the whole vocabulary's.
        self.plain = plain_head(loaded)
        if self.plain:
            self.step = head_step(self.head.weight.shape[1])
        else:
            with held(loaded.streamed, adapter.lm_head):
                self.step = self.head(finals[0][:1, :1]).shape[-1]
        self.rows = max(1, _LOGIT_ELEMENTS // self.step)
        self.positions = finals[0].shape[1] - (0 if every_position else 1)
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

    def _slices(self) -> Iterator[tuple[torch.Tensor | None, torch.Tensor | None]]:
        """The head's (weight rows, bias rows) a slice at a time; (None, None) once for a head
        that is not a plain linear (`_logits` then applies the module)."""
        if not self.plain:
            with held(self.loaded.streamed, self.loaded.adapter.lm_head):
                yield None, None
            return
        for _, _, weight, bias in head_slices(self.loaded):
            yield weight, bias

    def normed(self, states: torch.Tensor) -> torch.Tensor:
        """A last block's output as the head receives it."""
        return self.norm(states)

    def _logits(self, normed: torch.Tensor, weight: torch.Tensor | None, bias: torch.Tensor | None) -> torch.Tensor:
        logits = self.head(normed) if weight is None else nn.functional.linear(normed, weight, bias)
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
                # One float64 copy, multiplied in place: the products of float64 copies of both,
                # without two more temporaries of 8 MB beside it.
                probs = probs.double()
                mass[span] += probs.sum(dim=-1)
                neg_entropy[span] += probs.mul_(logprobs).sum(dim=-1)
                del logprobs, probs
        return lse, neg_entropy, mass

    @torch.no_grad()
    def window_kl(self, variants: int, rows_of: Callable[[int, int, int, int, int], torch.Tensor],
                  heads: Sequence[Callable[[torch.Tensor], torch.Tensor] | None] | None = None) -> np.ndarray:
        """[variants, windows] mean KL per window (`token_kl` averaged over each window's positions)."""
        return self.token_kl(variants, rows_of, heads).mean(axis=-1)

    @torch.no_grad()
    def token_kl(self, variants: int, rows_of: Callable[[int, int, int, int, int], torch.Tensor],
                 heads: Sequence[Callable[[torch.Tensor], torch.Tensor] | None] | None = None) -> np.ndarray:
        """[variants, windows, positions] KL at every position; `rows_of(variant, batch, window,
        start, stop)` gives a variant's last block output at those positions, through the final
        norm (`normed`). `heads[variant]`, where given, makes that variant's head rows of the base
        head's (a quantized head: rows are quantized independently, so a slice at a time is the whole)."""
        heads = list(heads) if heads is not None else [None] * variants
        groups: dict[int, tuple[Callable | None, list[int]]] = {}  # variants that share a head
        for variant, head in enumerate(heads):
            groups.setdefault(id(head), (head, []))[1].append(variant)
        peak = torch.full((variants, self.total), -torch.inf, dtype=torch.float64, device=self.device)
        summed = torch.zeros((variants, self.total), dtype=torch.float64, device=self.device)
        cross = torch.zeros((variants, self.total), dtype=torch.float64, device=self.device)  # sum p z
        # A variant's head is made a quarter of a slice at a time: its copy and the quantizer's
        # temporaries stay a few MB beside the slice.
        pieces = _HEAD_PIECES if any(head is not None for head in heads) else 1
        if pieces > 1 and not self.plain:
            raise ValueError("variants' own heads are made of a plain linear head's rows")
        for whole_weight, whole_bias in self._slices():
            rows = self.step if whole_weight is None else whole_weight.shape[0]
            step = -(-rows // pieces)
            for first in range(0, rows, step):
                weight = None if whole_weight is None else whole_weight[first:first + step]
                bias = None if whole_bias is None else whole_bias[first:first + step]
                for head, members in groups.values():
                    variant_weight = weight if head is None else head(weight)
                    for chunk in self.chunks:
                        part, window, start, stop, offset = chunk
                        count = stop - start
                        logprobs, probs = self._base_distribution(chunk, weight, bias, self.lse)
                        probs = probs.float()
                        del logprobs
                        for variant in members:
                            logits = self._logits(rows_of(variant, part, window, start, stop), variant_weight, bias)
                            _running_lse(peak[variant], summed[variant], offset, logits)
                            cross[variant, offset:offset + count] += (probs * logits).sum(dim=-1,
                                                                                          dtype=torch.float64)
                            del logits
                    del variant_weight
            del whole_weight, weight
            trim_freed_memory()
        lse = peak + summed.log()
        kl = (self.neg_entropy - (cross - lse * self.mass)).clamp_min(0.0)
        return kl.reshape(variants, -1, self.positions).cpu().numpy()  # chunks run window by window, in order


def _running_lse(peak: torch.Tensor, summed: torch.Tensor, offset: int, logits: torch.Tensor) -> None:
    """Fold a slice of float32 logits [positions, rows] into a running log-sum-exp (float64 peak,
    and sum of exp below it) of positions offset.. ; the exponentials in float32, summed in float64."""
    span = slice(offset, offset + logits.shape[0])
    top = torch.maximum(peak[span], logits.max(dim=-1).values.double())  # float32 values, exactly
    summed[span] = (summed[span] * torch.exp(peak[span] - top)
                    + torch.exp(logits - top.float()[:, None]).sum(dim=-1, dtype=torch.float64))
    peak[span] = top
