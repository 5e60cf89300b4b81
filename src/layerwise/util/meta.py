"""What every artifact carries so that it explains itself (STYLE.md section 8)."""
from __future__ import annotations

import datetime as _dt
import hashlib
import shlex
import sys
from pathlib import Path

import layerwise

# Files above this size are fingerprinted by their size, head and tail rather than read in full:
# hashing a 100 GB checkpoint would cost more than profiling it.
FULL_HASH_LIMIT = 2 << 30
_SAMPLE = 4 << 20


def sha256_text(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def file_fingerprint(path: str | Path) -> str:
    """sha256 of the file, or 'sampled-sha256:' of size + first and last 4 MiB for huge files."""
    path = Path(path)
    size = path.stat().st_size
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        if size <= FULL_HASH_LIMIT:
            for chunk in iter(lambda: handle.read(1 << 20), b""):
                digest.update(chunk)
            return digest.hexdigest()
        digest.update(str(size).encode())
        digest.update(handle.read(_SAMPLE))
        handle.seek(size - _SAMPLE)
        digest.update(handle.read(_SAMPLE))
    return "sampled-sha256:" + digest.hexdigest()


def files_fingerprint(paths: list[Path]) -> str:
    """One hash for a set of files (a Hugging Face folder): hash of their names and fingerprints."""
    digest = hashlib.sha256()
    for path in sorted(paths):
        digest.update(path.name.encode())
        digest.update(file_fingerprint(path).encode())
    return digest.hexdigest()


def command_line() -> str:
    """The command that is running, as a person would type it again."""
    argv = list(sys.argv)
    if argv and Path(argv[0]).name in {"layerwise", "__main__.py"}:
        argv[0] = "layerwise"
    return shlex.join(argv)


def run_metadata() -> dict:
    return {
        "layerwise_version": layerwise.__version__,
        "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "command": command_line(),
        "python": sys.version.split()[0],
    }
