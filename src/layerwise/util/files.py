"""Atomic file writes: a crash never leaves half a file under the final name."""
from __future__ import annotations

import contextlib
import json
import os
import tempfile
from pathlib import Path
from typing import Iterator

from layerwise.errors import LayerwiseError


def check_writable_dir(directory: str | Path) -> Path:
    """Fail early, before any long work, if `directory` cannot be created or written.

    Nothing is left behind: the directory itself is made only when the first file is written.
    The nearest existing ancestor is probed with a real temporary file, because permission bits
    say nothing for root or for read-only mounts.
    """
    directory = Path(directory)
    if directory.exists() and not directory.is_dir():
        raise LayerwiseError(f"output path {directory} exists and is not a directory")
    probe = directory
    while not probe.exists():
        probe = probe.parent
    if not probe.is_dir():
        raise LayerwiseError(f"output directory {directory} cannot be created: {probe} is not a directory")
    try:
        with tempfile.TemporaryFile(dir=probe):
            pass
    except OSError as error:
        raise LayerwiseError(f"output directory {directory} is not writable ({error.strerror} in {probe})") from None
    return directory


@contextlib.contextmanager
def atomic_path(target: str | Path) -> Iterator[Path]:
    """Yield a temporary path beside `target`; rename it onto `target` only if the block succeeds."""
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent)
    os.close(fd)
    tmp = Path(tmp_name)
    # mkstemp makes the file private (0600); give it the permissions a plain open() would.
    umask = os.umask(0)
    os.umask(umask)
    tmp.chmod(0o666 & ~umask)
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


def read_artifact(path: str | Path, schema: str, version: int, what: str) -> dict:
    """A layerwise JSON artifact, with one-line errors for a missing, corrupt or foreign file."""
    path = Path(path)
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise LayerwiseError(f"no {what} at {path}") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise LayerwiseError(f"{path} is not a valid {what} file ({error})") from None
    check_schema(data, schema, version, str(path), what)
    return data


def check_schema(data: object, schema: str, version: int, where: str, what: str) -> None:
    if not isinstance(data, dict) or data.get("schema") != schema:
        found = data.get("schema") if isinstance(data, dict) else type(data).__name__
        raise LayerwiseError(f"{where} is not a layerwise {what} (schema {found!r})")
    if data.get("schema_version") != version:
        raise LayerwiseError(f"{where} has {what} schema version {data.get('schema_version')}; "
                             f"this layerwise reads {version}")
