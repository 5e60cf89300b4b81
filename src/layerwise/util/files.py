"""Atomic file writes: a crash never leaves half a file under the final name."""
from __future__ import annotations

import contextlib
import os
import tempfile
from pathlib import Path
from typing import Iterator

from layerwise.errors import LayerwiseError


def check_writable_dir(directory: str | Path) -> Path:
    """Fail early, before any long work, if `directory` cannot be created or written.

    Nothing is created here: the directory is made only when the first file is written.
    """
    directory = Path(directory)
    if directory.exists() and not directory.is_dir():
        raise LayerwiseError(f"output path {directory} exists and is not a directory")
    probe = directory
    while not probe.exists():
        probe = probe.parent
    if not probe.is_dir() or not os.access(probe, os.W_OK | os.X_OK):
        raise LayerwiseError(f"output directory {directory} is not writable (no write permission on {probe})")
    return directory


@contextlib.contextmanager
def atomic_path(target: str | Path) -> Iterator[Path]:
    """Yield a temporary path beside `target`; rename it onto `target` only if the block succeeds."""
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent)
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        yield tmp
        os.replace(tmp, target)
    finally:
        if tmp.exists():
            tmp.unlink()


def write_text_atomic(target: str | Path, text: str) -> Path:
    with atomic_path(target) as tmp:
        tmp.write_text(text, encoding="utf-8")
    return Path(target)
