"""Atomic file writes: a crash never leaves half a file under the final name."""
from __future__ import annotations

import contextlib
import glob
import json
import os
import re
import secrets
import shutil
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


def check_output(path: str | Path, overwrite: bool = False, *, directory: bool = False) -> Path:
    """Fail early if `path` exists (unless `overwrite`) or cannot be written.

    An empty existing directory counts as free for a `directory` output, so that a user may
    make the folder first.
    """
    path = Path(path)
    if path.exists() and not overwrite and not (directory and path.is_dir() and not any(path.iterdir())):
        raise LayerwiseError(f"output {path} already exists; pass --overwrite (overwrite=True) to replace it")
    if directory:
        check_writable_dir(path)
    else:
        if path.is_dir():
            raise LayerwiseError(f"output {path} is a directory; give a file name")
        check_writable_dir(path.parent)
    return path


def _temporary_name(target: Path) -> Path:
    """A hidden name beside `target` that says whose it is, so that leftovers can be recognised."""
    return target.with_name(f".{target.name}.{os.getpid()}-{secrets.token_hex(4)}.tmp")


def remove_stale_temporaries(target: str | Path) -> list[Path]:
    """Remove the temporaries that a killed writer of `target` left behind (their process is gone)."""
    target = Path(target)
    removed = []
    if not target.parent.is_dir():
        return removed
    for leftover in target.parent.glob(f".{glob.escape(target.name)}.*-*.tmp"):
        match = re.fullmatch(rf"\.{re.escape(target.name)}\.(\d+)-[0-9a-f]+\.tmp", leftover.name)
        if match and not _process_alive(int(match.group(1))):
            if leftover.is_dir():
                shutil.rmtree(leftover)
            else:
                leftover.unlink(missing_ok=True)
            removed.append(leftover)
    return removed


def _process_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _unnamed_file(directory: Path) -> int | None:
    """An unnamed file in `directory` (Linux O_TMPFILE): if the process dies, even by SIGKILL,
    the kernel frees it and nothing is left to clean up. None where the system cannot."""
    if not hasattr(os, "O_TMPFILE") or not Path("/proc/self/fd").is_dir():
        return None
    try:
        return os.open(directory, os.O_TMPFILE | os.O_RDWR, 0o666)
    except OSError:
        return None


@contextlib.contextmanager
def atomic_path(target: str | Path, *, named: bool = False) -> Iterator[Path]:
    """Yield a path to write instead of `target`; it becomes `target` only if the block succeeds.

    On Linux the path names an unnamed file (O_TMPFILE, reached through /proc/self/fd), linked
    into place at the end: a crash at any point, SIGKILL included, leaves `target` as it was and
    no stray file. `named=True` is for writers that need a real directory entry (safetensors
    writes its own temporary beside the path and renames it), and is what other systems get: a
    hidden temporary beside `target`, removed on failure and, after a hard kill, by the next
    write to the same target.
    """
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_temporaries(target)
    umask = os.umask(0)
    os.umask(umask)
    fd = None if named else _unnamed_file(target.parent)
    if fd is None:
        tmp = _temporary_name(target)
        try:
            yield tmp
            tmp.chmod(0o666 & ~umask)
            os.replace(tmp, target)
        finally:
            tmp.unlink(missing_ok=True)
        return
    try:
        yield Path(f"/proc/self/fd/{fd}")
        os.fsync(fd)
        os.fchmod(fd, 0o666 & ~umask)
        link = _temporary_name(target)
        proc_fds = os.open("/proc/self/fd", os.O_RDONLY | os.O_DIRECTORY)
        try:
            # link() would link the /proc symlink itself; linkat with AT_SYMLINK_FOLLOW (what
            # os.link does once a dir_fd is given) links the file it points to.
            os.link(str(fd), link, src_dir_fd=proc_fds, follow_symlinks=True)
        finally:
            os.close(proc_fds)
        try:
            os.replace(link, target)
        finally:
            link.unlink(missing_ok=True)
    finally:
        os.close(fd)


@contextlib.contextmanager
def atomic_folder(target: str | Path) -> Iterator[Path]:
    """Yield a hidden folder beside `target` to fill; it replaces `target` only if the block succeeds.

    A folder cannot be unnamed, so a hard kill can leave the hidden folder; its name carries the
    writer's process id, and the next write to the same target removes it.
    """
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_temporaries(target)
    scratch = _temporary_name(target)
    scratch.mkdir()
    try:
        yield scratch
        old = None
        if target.exists():
            old = _temporary_name(target)
            os.replace(target, old)
        os.replace(scratch, target)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    finally:
        if scratch.exists():
            shutil.rmtree(scratch, ignore_errors=True)


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
