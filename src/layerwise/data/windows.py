"""Text -> fixed-length token windows, deterministic for a seed, with BOS handled per tokenizer."""
from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch

from layerwise.errors import LayerwiseError
from layerwise.util.meta import sha256_text

DEFAULT_CALIBRATION = Path(__file__).parent / "calibration" / "wikitext2_valid_excerpt.txt"


@dataclass(frozen=True)
class TokenWindows:
    """`input_ids` is [n_windows, seq_len]; `describe()` goes into every artifact's metadata."""

    input_ids: torch.Tensor
    source: str
    text_sha256: str
    seed: int | None
    bos_token_id: int | None

    @property
    def n_tokens(self) -> int:
        return self.input_ids.numel()

    def batches(self, batch_size: int) -> list[torch.Tensor]:
        return list(self.input_ids.split(batch_size))

    def describe(self) -> dict:
        n_windows, seq_len = self.input_ids.shape
        return {
            "source": self.source,
            "text_sha256": self.text_sha256,
            "tokens": self.n_tokens,
            "windows": n_windows,
            "seq_len": seq_len,
            "seed": self.seed,
            "bos_token_id": self.bos_token_id,
            "sampling": "sequential" if self.seed is None else "random non-overlapping chunks",
        }


def read_text(data: str | Path | Sequence[str] | None) -> tuple[str, str]:
    """(text, description) from a file path, a list of strings, or None for the shipped excerpt."""
    if data is None:
        return DEFAULT_CALIBRATION.read_text(encoding="utf-8"), "layerwise:wikitext2_valid_excerpt"
    if isinstance(data, (str, Path)):
        path = Path(data)
        if not path.is_file():
            raise LayerwiseError(f"data file {path} does not exist")
        try:
            return path.read_text(encoding="utf-8"), str(path)
        except UnicodeDecodeError as error:
            raise LayerwiseError(f"data file {path} is not UTF-8 text ({error.reason} at byte {error.start})") from None
    strings = list(data)
    if not all(isinstance(s, str) for s in strings):
        raise LayerwiseError("data must be a file path or a list of strings")
    return "\n\n".join(strings), f"<{len(strings)} strings>"


def bos_policy(tokenizer: Any) -> int | None:
    """The BOS id to put at the start of every window, or None.

    An explicit `add_bos_token` in the tokenizer's files wins (SmolLM2's GGUF says False). With none
    given, a BOS token distinct from EOS is taken as one the model was trained to see first:
    llama2.c's stories260K tokenizer prepends nothing itself, yet its model expects id 1. A BOS equal
    to EOS (GPT-2's <|endoftext|>) is a document separator, not a start token.
    """
    bos = tokenizer.bos_token_id
    if bos is None:
        return None
    explicit = tokenizer.init_kwargs.get("add_bos_token")
    if explicit is not None:
        return bos if explicit else None
    return bos if bos != tokenizer.eos_token_id else None


def _encode(tokenizer: Any, text: str) -> list[int]:
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    return list(ids)


def token_windows(
    tokenizer: Any,
    data: str | Path | Sequence[str] | None = None,
    *,
    tokens: int,
    seq_len: int = 512,
    seed: int | None = 0,
    bos: bool | None = None,
) -> TokenWindows:
    """Cut at least `tokens` tokens of text into windows of `seq_len`.

    seed=None takes the first windows in order (the standard for evaluation); an integer seed
    draws non-overlapping windows at random (calibration), the same ones for the same seed.
    bos=None applies `bos_policy`; True/False force it. With a BOS, each window is BOS + seq_len-1
    text tokens. When `tokens` <= `seq_len`, one window of `tokens` is used.
    """
    if tokens <= 0:
        raise LayerwiseError(f"tokens must be a positive number, got {tokens}")
    if seq_len <= 1:
        raise LayerwiseError(f"seq_len must be at least 2, got {seq_len}")
    text, description = read_text(data)
    if not text.strip():
        raise LayerwiseError(f"data {description} is empty")
    seq_len = min(seq_len, tokens)
    n_windows = math.ceil(tokens / seq_len)
    bos_id = bos_policy(tokenizer) if bos is None else (tokenizer.bos_token_id if bos else None)
    if bos and bos_id is None:
        raise LayerwiseError("bos=True, but the tokenizer has no BOS token")
    body = seq_len - (bos_id is not None)
    ids = _encode(tokenizer, text)
    available = len(ids) // body
    if available < n_windows:
        raise LayerwiseError(
            f"data {description} has {len(ids)} tokens: {available} windows of {seq_len}, "
            f"but {n_windows} were asked for ({tokens} tokens); give more text or fewer tokens"
        )
    if seed is None:
        starts = np.arange(n_windows) * body
    else:
        chosen = np.random.default_rng(seed).choice(available, size=n_windows, replace=False)
        starts = np.sort(chosen) * body
    chunks = torch.tensor(np.stack([np.asarray(ids[s : s + body]) for s in starts]), dtype=torch.long)
    if bos_id is not None:
        chunks = torch.cat([torch.full((n_windows, 1), bos_id, dtype=torch.long), chunks], dim=1)
    return TokenWindows(chunks, description, sha256_text(text), seed, bos_id)
