"""KL(base || other) and top-1 agreement per token, against a base distribution computed once."""
from __future__ import annotations

from dataclasses import dataclass

import torch

# Positions processed at once when comparing: bounds the float64 temporaries to three of 8 MB
# (a larger chunk is no faster, and its temporaries set the peak of a plan's check).
_CHUNK_ELEMENTS = 1 << 20


@dataclass(frozen=True)
class Reference:
    """The base model's next-token distributions, normalised once and reused for every variant
    compared against them (llama.cpp's --kl-divergence does the same with its saved base logits)."""

    probs: torch.Tensor  # [..., vocab], float32, or float16 when kept for many comparisons
    neg_entropy: torch.Tensor  # sum p log p over the probabilities as stored, float64, [...]
    top1: torch.Tensor  # [...]

    @classmethod
    def from_logits(cls, logits: torch.Tensor, store: torch.dtype = torch.float32) -> "Reference":
        """With store=float16 the probabilities take half the memory. The entropy term uses the
        stored probabilities, so KL = sum p16 (log p - log q): rounding p changes KL by a relative
        ~1e-3 and cannot leave an absolute offset that would swamp small divergences."""
        logprobs = torch.log_softmax(logits.float(), dim=-1)
        probs = logprobs.exp().to(store)
        neg_entropy = _chunked_dot(probs, logprobs)
        return cls(probs, neg_entropy, logits.argmax(dim=-1))

    @classmethod
    def empty(cls, windows: int, positions: int, vocab: int, store: torch.dtype,
              device: torch.device | str) -> "Reference":
        """Room for `windows` x `positions` distributions, filled a part at a time (`put`)."""
        return cls(torch.empty(windows, positions, vocab, dtype=store, device=device),
                   torch.empty(windows, positions, dtype=torch.float64, device=device),
                   torch.empty(windows, positions, dtype=torch.long, device=device))

    def put(self, window: int, start: int, part: "Reference") -> None:
        """Positions start.. of one window become `part`'s."""
        stop = start + part.top1.shape[0]
        self.probs[window, start:stop] = part.probs
        self.neg_entropy[window, start:stop] = part.neg_entropy
        self.top1[window, start:stop] = part.top1

    def part(self, window: int, start: int, stop: int) -> "Reference":
        """Positions start..stop of one window (a view, nothing copied)."""
        return Reference(self.probs[window, start:stop], self.neg_entropy[window, start:stop],
                         self.top1[window, start:stop])


def _chunked_dot(probs: torch.Tensor, logprobs: torch.Tensor) -> torch.Tensor:
    """sum p * log q over the vocabulary in float64, a few hundred positions at a time."""
    vocab = probs.shape[-1]
    flat_p = probs.reshape(-1, vocab)
    flat_l = logprobs.reshape(-1, vocab)
    rows = max(1, _CHUNK_ELEMENTS // vocab)
    sums = [(p.double() * l.double()).sum(dim=-1) for p, l in zip(flat_p.split(rows), flat_l.split(rows))]
    return torch.cat(sums).reshape(probs.shape[:-1])


def kl_per_token(reference: Reference, other_logits: torch.Tensor) -> torch.Tensor:
    """KL(base || other) in nats for every position: [..., vocab] -> [...] (float64).

    Summed in float64 from normalised log-probabilities: with a 49k vocabulary, float32 sums of
    raw logits lose ~1e-3 nats, the size of an 8-bit model's whole KL.
    """
    other_logprobs = torch.log_softmax(other_logits.float(), dim=-1)
    probs = reference.probs
    if probs.shape != other_logprobs.shape:
        probs = probs.expand(other_logprobs.shape)
    neg_entropy = reference.neg_entropy.expand(other_logprobs.shape[:-1])
    return (neg_entropy - _chunked_dot(probs, other_logprobs)).clamp_min(0.0)


def top1_agreement(reference: Reference, other_logits: torch.Tensor) -> torch.Tensor:
    """1.0 where both pick the same most likely next token, else 0.0."""
    return (reference.top1 == other_logits.argmax(dim=-1)).float()
