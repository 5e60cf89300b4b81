"""Is evaluation text held out? Evaluation windows are compared, token for token, with every set
of calibration windows a plan or quantized model was made with (sensitivity table, search,
never-worse check, GPTQ/AWQ statistics).

File identity is not enough: a copy of the calibration file with one character changed, or a
larger file that contains it, would pass. Windows are compared by runs of `SHARED_RUN` tokens:
two pieces of text that share that many tokens in a row are the same text.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from layerwise.data.windows import (DEFAULT_CALIBRATION_NAME, DEFAULT_CALIBRATION_PARENT, SHIPPED_PREFIX, TokenWindows,
                                    mix_windows, text_slots)
from layerwise.errors import LayerwiseError

SHARED_RUN = 32


def _runs(row: np.ndarray, length: int) -> list[bytes]:
    if row.size < length:
        return []
    view = np.lib.stride_tricks.sliding_window_view(np.ascontiguousarray(row, dtype=np.int64), length)
    return [item.tobytes() for item in view]


def shared_windows(evaluation: TokenWindows, calibration: TokenWindows,
                   run: int = SHARED_RUN) -> list[tuple[int, int]]:
    """(evaluation window, calibration window) pairs that share `run` or more tokens in a row
    (BOS left out)."""
    def body(windows: TokenWindows) -> np.ndarray:
        ids = windows.input_ids.numpy()
        return ids[:, 1:] if windows.bos_token_id is not None else ids

    owner: dict[bytes, int] = {}
    for j, row in enumerate(body(calibration)):
        for key in _runs(row, run):
            owner.setdefault(key, j)
    pairs = []
    for i, row in enumerate(body(evaluation)):
        hit = next((owner[key] for key in _runs(row, run) if key in owner), None)
        if hit is not None:
            pairs.append((i, hit))
    return pairs


def rebuild_windows(tokenizer: Any, description: dict) -> TokenWindows | None:
    """The calibration windows `description` (a `TokenWindows.describe()`) names, re-cut from their
    source file; None when the file is gone or no longer holds the same text."""
    if "domains" in description:  # windows of several texts, mixed
        parts = {name: rebuild_windows(tokenizer, part) for name, part in description["domains"].items()}
        return None if any(part is None for part in parts.values()) else mix_windows(parts)
    source = description.get("source")
    if not (source and (source.startswith(SHIPPED_PREFIX) or Path(source).is_file())):
        return None
    try:
        slots = text_slots(tokenizer, source, seq_len=int(description["seq_len"]),
                           bos=description.get("bos_token_id") is not None)
    except LayerwiseError:
        return None
    if slots.text_sha256 != description.get("text_sha256"):
        return None
    if description.get("slots") is not None:
        return slots.windows(description["slots"], description.get("seed"))
    return slots.take(int(description["windows"]), description.get("seed"))


def check_held_out(tokenizer: Any, evaluation: TokenWindows, data_label: str,
                   calibrations: dict[str, dict]) -> list[str]:
    """Refuse (LayerwiseError) evaluation windows that share text with any calibration windows in
    `calibrations` (job name -> windows description), saying which; returns warnings for sets whose
    text could not be found to compare."""
    warnings = []
    for job, description in calibrations.items():
        if not description:
            continue
        source = description.get("source")
        if (source == DEFAULT_CALIBRATION_NAME
                and evaluation.text_sha256 == DEFAULT_CALIBRATION_PARENT["text_sha256"]):
            raise LayerwiseError(
                f"{data_label} is {DEFAULT_CALIBRATION_PARENT['name']}, the text layerwise's default calibration "
                f"excerpt (used for the {job}) was cut from; evaluate on held-out text such as WikiText-2 test")
        if description.get("text_sha256") == evaluation.text_sha256:
            raise LayerwiseError(f"{data_label} is the text this model was calibrated on (for the {job}); "
                                 f"evaluate on held-out text")
        calibration = rebuild_windows(tokenizer, description) if "seq_len" in description else None
        if calibration is None:
            warnings.append(f"could not re-read {source} (the {job}'s calibration text) to check that the "
                            f"evaluation windows are held out")
            continue
        pairs = shared_windows(evaluation, calibration)
        if pairs:
            i, j = pairs[0]
            raise LayerwiseError(
                f"evaluation window {i} of {data_label} shares text with calibration window {j} of {source} "
                f"(used for the {job}; {len(pairs)} of {len(evaluation.input_ids)} evaluation windows do); "
                f"evaluate on held-out text")
    return warnings


def calibrations_of(plan_meta: dict | None, quant_meta: dict | None) -> dict[str, dict]:
    """Every set of calibration windows a plan's metadata and a quantized model's metadata name."""
    found: dict[str, dict] = {}
    provenance = (plan_meta or {}).get("provenance") or {}
    calibration = provenance.get("calibration") or {}
    # Plans calibrated on several domains record each domain as plans of one text record theirs.
    domains = calibration.get("domains") or {None: calibration}
    if calibration.get("table_elsewhere"):
        domains = domains | {None: calibration["table_elsewhere"]}
    for domain, record in domains.items():
        for job, description in ((record or {}).get("jobs") or {}).items():
            found[f"plan's {job}" + (f" ({domain} domain)" if domain else "")] = description
    if quant_meta and quant_meta.get("calibration"):
        found["quantization statistics"] = quant_meta["calibration"]
    return found
