"""KL(base || other) and top-1 agreement per token, against a base distribution computed once."""
from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class Reference:
    """The base model's next-token distributions, normalised once and reused for every variant
    compared against them (llama.cpp's --kl-divergence does the same with its saved base logits)."""

    probs: torch.Tensor  # [..., vocab], float32 or float16 when kept for many comparisons
    neg_entropy: torch.Tensor  # sum p log p, [...], from the probabilities as stored
    top1: torch.Tensor  # [...]

    @classmethod
    def from_logits(cls, logits: torch.Tensor, store: torch.dtype = torch.float32) -> "Reference":
        """With store=float16 the probabilities take half the memory. The entropy term is computed
        from the stored probabilities, so KL = sum p16 (log p - log q): rounding p changes KL by a
        relative ~1e-3, not by an absolute amount that would swamp small divergences."""
        logprobs = torch.log_softmax(logits.float(), dim=-1)
        probs = logprobs.exp().to(store)
        return cls(probs, _dot(probs.float(), logprobs), logits.argmax(dim=-1))

    def __getitem__(self, index) -> "Reference":
        return Reference(self.probs[index], self.neg_entropy[index], self.top1[index])


def _dot(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Row-wise dot product over the vocabulary, as a batched matmul (no [..., vocab] temporary)."""
    return (a.unsqueeze(-2) @ b.unsqueeze(-1)).squeeze(-1).squeeze(-1)


def kl_per_token(reference: Reference, other_logits: torch.Tensor) -> torch.Tensor:
    """KL(base || other) in nats for every position: [..., vocab] -> [...].

    KL = sum p log p - sum p log q, and sum p log q = sum p z - logsumexp(z) for logits z, so
    only one pass over the other's logits is needed beyond the logsumexp.
    """
    z = other_logits.float()
    probs = reference.probs.float()
    probs = probs.expand(z.shape) if probs.shape != z.shape else probs
    kl = reference.neg_entropy - _dot(probs, z) + torch.logsumexp(z, dim=-1)
    return kl.clamp_min(0.0)


def top1_agreement(reference: Reference, other_logits: torch.Tensor) -> torch.Tensor:
    """1.0 where both pick the same most likely next token, else 0.0."""
    return (reference.top1 == other_logits.argmax(dim=-1)).float()
