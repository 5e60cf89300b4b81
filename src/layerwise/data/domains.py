"""Calibration that spans kinds of text: one named text per domain, windows drawn from each.

A plan fitted on one kind of text (prose) can be bad on another (code, tables): the cheap options
that prose tolerates are not the ones code tolerates. The shipped default is therefore a mix of
four domains (see calibration/LICENSE); a user gives their own as several files, one per domain.
"""
from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Mapping, Sequence

from layerwise.data.windows import (DEFAULT_CALIBRATION_NAME, TextSlots, TokenWindows, mix_windows, text_slots,
                                    token_windows)
from layerwise.errors import LayerwiseError

DEFAULT_DOMAINS = {
    "prose": DEFAULT_CALIBRATION_NAME,
    "code": "layerwise:python_stdlib_excerpt",
    "verse": "layerwise:shakespeare_excerpt",
    "tables": "layerwise:tables_excerpt",
}
# Names the whole shipped mix where a list of texts is given, so that a user can add their own
# text to the mix (`--calib layerwise:mix --calib mine.txt`) instead of replacing it.
SHIPPED_MIX = "layerwise:mix"

Calibration = str | Path | Sequence[str | Path] | Mapping[str, str | Path] | None


def calibration_domains(calib: Calibration) -> dict[str, str | Path]:
    """Domain name -> text (a file path or a shipped "layerwise:<name>"): None gives the shipped
    mix; one file is one domain; a list of files is one domain per file, named by file stem, where
    "layerwise:mix" stands for the shipped mix's four domains; a mapping names the domains itself."""
    if calib is None or (isinstance(calib, str) and calib == SHIPPED_MIX):
        return dict(DEFAULT_DOMAINS)
    if isinstance(calib, (str, Path)):
        return {_name_of(calib): calib}
    if isinstance(calib, Mapping):
        domains = dict(calib)
    else:
        domains = {}
        items = [shipped for item in calib
                 for shipped in (DEFAULT_DOMAINS.values() if str(item) == SHIPPED_MIX else [item])]
        for item in items:
            name = _name_of(item)
            if name in domains:
                raise LayerwiseError(f"two calibration files are both named {name!r} ({domains[name]} and {item}); "
                                     "give files with different names, one per domain")
            domains[name] = item
    if not domains:
        raise LayerwiseError("no calibration text given; give one or more files, or none for the shipped mix")
    for name in domains:
        if not isinstance(name, str) or not name:
            raise LayerwiseError(f"calibration domain names must be non-empty strings, not {name!r}")
    return domains


def _name_of(data: str | Path) -> str:
    for name, shipped in DEFAULT_DOMAINS.items():
        if str(data) == shipped:
            return name
    return Path(data).stem


def domain_slots(tokenizer: Any, calib: Calibration, *, seq_len: int = 512) -> dict[str, TextSlots]:
    """Each domain's text, tokenized once and cut into slots (`TextSlots`)."""
    return {name: text_slots(tokenizer, data, seq_len=seq_len) for name, data in calibration_domains(calib).items()}


def windows_per_domain(tokens: int, domains: int, seq_len: int) -> int:
    """How many windows each domain gives so that all of them hold at least `tokens` together."""
    return max(1, math.ceil(tokens / (domains * seq_len)))


def take_from_domains(slots: dict[str, TextSlots], tokens: int, seed: int | None,
                      exclude: Mapping[str, set[int]] | None = None) -> TokenWindows:
    """`tokens` tokens split evenly over the domains, drawn with `seed` from each domain's slots
    outside `exclude[name]`; mixed into one set of windows (one domain: its own windows)."""
    exclude = exclude or {}
    count = windows_per_domain(tokens, len(slots), next(iter(slots.values())).seq_len)
    return mix_windows({name: text.take(count, seed, exclude=exclude.get(name, set()))
                        for name, text in slots.items()})


def calibration_windows(tokenizer: Any, calib: Calibration, *, tokens: int, seq_len: int = 512,
                        seed: int | None = 0, at_most: bool = False) -> TokenWindows:
    """Windows to fit quantizers on (GPTQ, AWQ, an importance matrix): one file cut as
    `token_windows` cuts it; None (the shipped mix, as `plan` calibrates by default) or several
    files: `tokens` split evenly over the domains.

    `at_most`: `tokens` is a default's size rather than the user's request, so a text that holds
    fewer windows gives all it holds (every domain the same number); a requested size that the
    text cannot give stays an error."""
    if isinstance(calib, (str, Path)) and str(calib) != SHIPPED_MIX:
        if not at_most:
            return token_windows(tokenizer, calib, tokens=tokens, seq_len=seq_len, seed=seed)
        slots = text_slots(tokenizer, calib, seq_len=min(seq_len, tokens))
        return slots.take(max(1, min(math.ceil(tokens / slots.seq_len), slots.available)), seed)
    slots = domain_slots(tokenizer, calib, seq_len=min(seq_len, tokens))
    if at_most:
        body = next(iter(slots.values())).seq_len
        count = min(windows_per_domain(tokens, len(slots), body), min(text.available for text in slots.values()))
        tokens = max(1, count) * len(slots) * body
    return take_from_domains(slots, tokens, seed)


def parts_of(description: dict) -> dict[str, dict]:
    """The per-domain window descriptions of a (possibly mixed) `TokenWindows.describe()`."""
    if "domains" in description:
        return dict(description["domains"])
    return {"calibration": description}
