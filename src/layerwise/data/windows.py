"""Text -> fixed-length token windows, deterministic for a seed, with BOS handled per tokenizer."""
from __future__ import annotations

import math
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch

from layerwise.errors import LayerwiseError
from layerwise.util.meta import sha256_text

CALIBRATION_FOLDER = Path(__file__).parent / "calibration"
DEFAULT_CALIBRATION = CALIBRATION_FOLDER / "wikitext2_valid_excerpt.txt"
DEFAULT_CALIBRATION_NAME = "layerwise:wikitext2_valid_excerpt"
# Every calibration text shipped with layerwise goes by "layerwise:<file stem>" (see its LICENSE).
SHIPPED_PREFIX = "layerwise:"
# The corpus the shipped excerpt was cut from (the start of WikiText-2 valid, tokenized form):
# evaluating a model calibrated on the excerpt on that corpus is evaluating on calibration text.
DEFAULT_CALIBRATION_PARENT = {"name": "WikiText-2 valid",
                              "text_sha256": "f0737ed31fc1329026e95cb8b98e19c2a182c39c240ab909dc31abf2f8af58e8"}


@dataclass(frozen=True)
class TokenWindows:
    """`input_ids` is [n_windows, seq_len]; `describe()` goes into every artifact's metadata."""

    input_ids: torch.Tensor
    source: str
    text_sha256: str
    seed: int | None
    bos_token_id: int | None
    # Which slots of the text (consecutive runs of seq_len - BOS tokens, counted from the start)
    # these windows are: what lets two uses of one text be proven disjoint.
    slots: tuple[int, ...] | None = None
    # Windows drawn from several texts (calibration domains): (name, windows) per domain, and the
    # domain of every row of input_ids. None for windows of one text.
    parts: tuple[tuple[str, "TokenWindows"], ...] | None = None
    row_domains: tuple[str, ...] | None = None

    @property
    def window_domains(self) -> tuple[str, ...]:
        """The calibration domain of every window (one name for windows of a single text)."""
        return self.row_domains or ("calibration",) * len(self.input_ids)

    @property
    def n_tokens(self) -> int:
        return self.input_ids.numel()

    def batches(self, batch_size: int) -> list[torch.Tensor]:
        return list(self.input_ids.split(batch_size))

    def describe(self) -> dict:
        n_windows, seq_len = self.input_ids.shape
        if self.parts is not None:
            return {"source": self.source, "text_sha256": self.text_sha256, "tokens": self.n_tokens,
                    "windows": n_windows, "seq_len": seq_len, "seed": self.seed, "bos_token_id": self.bos_token_id,
                    "sampling": "per domain, interleaved", "slots": None,
                    "domains": {name: part.describe() for name, part in self.parts}}
        return {
            "source": self.source,
            "text_sha256": self.text_sha256,
            "tokens": self.n_tokens,
            "windows": n_windows,
            "seq_len": seq_len,
            "seed": self.seed,
            "bos_token_id": self.bos_token_id,
            "sampling": "sequential" if self.seed is None else "random non-overlapping chunks",
            "slots": None if self.slots is None else list(self.slots),
        }


def mix_windows(parts: dict[str, TokenWindows]) -> TokenWindows:
    """Windows of several domains as one set, interleaved (so that the first batches already hold
    every domain), each row remembering its domain; one domain is returned as it is."""
    if len(parts) == 1:
        return next(iter(parts.values()))
    shapes = {windows.input_ids.shape[1] for windows in parts.values()}
    bos = {windows.bos_token_id for windows in parts.values()}
    if len(shapes) != 1 or len(bos) != 1:
        raise LayerwiseError("windows of every calibration domain need the same length and BOS to be mixed")
    order = [(name, row) for row in range(max(len(w.input_ids) for w in parts.values()))
             for name, w in parts.items() if row < len(w.input_ids)]
    input_ids = torch.stack([parts[name].input_ids[row] for name, row in order])
    combined = sha256_text("\n".join(f"{name} {w.text_sha256}" for name, w in parts.items()))
    seeds = {w.seed for w in parts.values()}
    return TokenWindows(input_ids, "mix of " + ", ".join(parts), combined, seeds.pop() if len(seeds) == 1 else None,
                        bos.pop(), None, tuple(parts.items()), tuple(name for name, _ in order))


def read_text(data: str | Path | Sequence[str] | None) -> tuple[str, str]:
    """(text, description) from a file path, a list of strings, "layerwise:<name>" for a shipped
    text, or None for the shipped prose excerpt."""
    if data is None:
        return DEFAULT_CALIBRATION.read_text(encoding="utf-8"), DEFAULT_CALIBRATION_NAME
    if isinstance(data, str) and data.startswith(SHIPPED_PREFIX):
        shipped = CALIBRATION_FOLDER / (data[len(SHIPPED_PREFIX):] + ".txt")
        if not shipped.is_file():
            known = ", ".join(SHIPPED_PREFIX + path.stem for path in sorted(CALIBRATION_FOLDER.glob("*.txt")))
            raise LayerwiseError(f"{data} is not a text shipped with layerwise; shipped: {known}")
        return shipped.read_text(encoding="utf-8"), data
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


# Characters tokenized at once. A fast tokenizer holds ~500 bytes per token of a text it encodes
# (offsets, strings): 155 MB for WikiText-2 test whole, growing with the file.
PIECE_CHARS = 1 << 16


def encode_text(tokenizer: Any, text: str) -> list[int]:
    """The token ids of `text`, tokenized a piece of about `PIECE_CHARS` characters at a time, cut
    after a line end. Tokenizers that add something at the start of every text they are given
    (a SentencePiece dummy prefix) or merge across a line end would give other ids for pieces than
    for the whole: the first cut is checked (the two pieces on their own against their join), and
    such a tokenizer gets the whole text at once."""
    pieces = _line_pieces(text, PIECE_CHARS)

    def encode(piece: str) -> list[int]:
        return list(tokenizer(piece, add_special_tokens=False)["input_ids"])

    if len(pieces) < 2:
        return encode(text)
    ids = encode(pieces[0]) + encode(pieces[1])
    if ids != encode(pieces[0] + pieces[1]):
        return encode(text)
    for piece in pieces[2:]:
        ids += encode(piece)
    return ids


def _line_pieces(text: str, size: int) -> list[str]:
    """`text` cut into pieces of at least `size` characters (the last may be shorter). A cut falls
    only where a byte-level BPE's pre-tokenizer (GPT-2's, Llama 3's rules) splits the same way in
    the whole text and in the pieces: after a line end whose next line starts with one space and
    then text (the run of whitespace before it ends the piece either way), or after a lone line
    end between two non-space characters. Blank lines and indentation are never cut."""
    pieces, start = [], 0
    while len(text) - start > size:
        cut = start + size
        while cut + 1 < len(text) and not _safe_cut(text, cut):
            cut += 1
        if cut + 1 >= len(text):
            break
        pieces.append(text[start:cut])
        start = cut
    pieces.append(text[start:])
    return pieces


def _safe_cut(text: str, cut: int) -> bool:
    """Whether `text` may be cut before position `cut` (see `_line_pieces`)."""
    if text[cut - 1] != "\n":
        return False
    if text[cut] == " ":
        return not text[cut + 1].isspace()
    return not text[cut].isspace() and cut >= 2 and not text[cut - 2].isspace()


@dataclass(frozen=True)
class TextSlots:
    """A text tokenized once and cut into slots of `body` tokens: the units that windows for
    different jobs (sensitivity table, search, never-worse check) are drawn from, disjointly."""

    ids: list[int]
    seq_len: int
    bos_id: int | None
    source: str
    text_sha256: str

    @property
    def body(self) -> int:
        return self.seq_len - (self.bos_id is not None)

    @property
    def available(self) -> int:
        return len(self.ids) // self.body

    def take(self, n_windows: int, seed: int | None, exclude: Sequence[int] = ()) -> TokenWindows:
        """`n_windows` slots: the first ones (seed=None), or drawn at random among those not in
        `exclude`. With nothing excluded the draw is the one `token_windows` has always made."""
        excluded = {int(s) for s in exclude}
        candidates = [s for s in range(self.available) if s not in excluded]
        if len(candidates) < n_windows:
            taken = f" ({len(excluded)} of them taken by other jobs)" if excluded else ""
            raise LayerwiseError(
                f"data {self.source} has {len(self.ids)} tokens: {self.available} windows of {self.seq_len}"
                f"{taken}, but {n_windows} were asked for ({n_windows * self.seq_len} tokens); "
                f"give more text or fewer tokens"
            )
        if seed is None:
            slots = candidates[:n_windows]
        else:
            # Drawing from range(available) when nothing is excluded keeps the draws of older runs.
            population = candidates if excluded else self.available
            slots = np.sort(np.random.default_rng(seed).choice(population, size=n_windows, replace=False))
        return self.windows(slots, seed)

    def touched_by(self, description: dict) -> set[int]:
        """The slots of this text that windows described by `description` (a `TokenWindows.describe()`,
        e.g. a sensitivity table's calibration) share tokens with; none if they come from another text.
        Descriptions written before slots were recorded are redrawn from their seed."""
        if description.get("text_sha256") != self.text_sha256:
            return set()
        their_seq_len = int(description["seq_len"])
        their_bos = description.get("bos_token_id")
        theirs = replace(self, seq_len=their_seq_len, bos_id=their_bos)
        their_slots = description.get("slots")
        if their_slots is None:
            their_slots = theirs.take(int(description["windows"]), description.get("seed")).slots
        ranges = [(s * theirs.body, (s + 1) * theirs.body) for s in their_slots]
        body = self.body
        return {k for k in range(self.available) for start, end in ranges if k * body < end and start < (k + 1) * body}

    def windows(self, slots: Sequence[int], seed: int | None = None) -> TokenWindows:
        body = self.body
        chunks = torch.tensor(np.stack([np.asarray(self.ids[s * body: (s + 1) * body]) for s in slots]),
                              dtype=torch.long)
        if self.bos_id is not None:
            chunks = torch.cat([torch.full((len(slots), 1), self.bos_id, dtype=torch.long), chunks], dim=1)
        return TokenWindows(chunks, self.source, self.text_sha256, seed, self.bos_id,
                            tuple(int(s) for s in slots))


def text_slots(tokenizer: Any, data: str | Path | Sequence[str] | None, *, seq_len: int = 512,
               bos: bool | None = None) -> TextSlots:
    """Tokenize `data` once and cut it into slots for windows of `seq_len` (BOS per `bos_policy`)."""
    if seq_len <= 1:
        raise LayerwiseError(f"seq_len must be at least 2, got {seq_len}")
    text, description = read_text(data)
    if not text.strip():
        raise LayerwiseError(f"data {description} is empty")
    bos_id = bos_policy(tokenizer) if bos is None else (tokenizer.bos_token_id if bos else None)
    if bos and bos_id is None:
        raise LayerwiseError("bos=True, but the tokenizer has no BOS token")
    return TextSlots(encode_text(tokenizer, text), seq_len, bos_id, description, sha256_text(text))


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
    seq_len = min(seq_len, tokens)
    return text_slots(tokenizer, data, seq_len=seq_len, bos=bos).take(math.ceil(tokens / seq_len), seed)
