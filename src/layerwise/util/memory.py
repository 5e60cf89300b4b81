"""Giving freed tensor memory back to the operating system.

glibc serves large allocations with memory maps of their own and unmaps them on free, but raises
that size threshold each time such a block is freed (up to 32 MB); tensors of a few MB then come
from its heap and stay with the process once freed, in pieces too small for the next, larger
tensor. SmolLM2's `profile` peaked 0.2x the float32 model higher that way (bench/memory.py, two
runs), and a plan, measuring hundreds of whole plans through 16 MB pieces of logits, crept up by
100 MB or more that no tensor held. The commands fix the threshold (`map_large_blocks`) and trim
the heap between rounds of long loops (`trim_freed_memory`).
"""
from __future__ import annotations

import ctypes
import ctypes.util
import functools
import sys

_M_MMAP_THRESHOLD = -3  # glibc's mallopt parameter number
# Blocks of this size or more are mapped on their own: the head's 16 MB pieces of logits and
# larger, not a block's activations (a few MB, allocated and freed many times per pass).
MAP_FROM_BYTES = 4 << 20


@functools.cache
def _glibc() -> ctypes.CDLL | None:
    if not sys.platform.startswith("linux"):
        return None
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        libc.mallopt, libc.malloc_trim  # glibc only (musl has neither)
    except (OSError, AttributeError):
        return None
    return libc


def map_large_blocks(threshold: int = MAP_FROM_BYTES) -> bool:
    """Fix glibc's mapping threshold at `threshold` bytes for this process (freed blocks that
    large go back to the system at once); False where the C library is not glibc."""
    libc = _glibc()
    return bool(libc is not None and libc.mallopt(_M_MMAP_THRESHOLD, ctypes.c_int(threshold)))


def trim_freed_memory() -> bool:
    """Return the heap's free pages to the system; False where the C library is not glibc."""
    libc = _glibc()
    return bool(libc is not None and libc.malloc_trim(ctypes.c_size_t(0)) >= 0)
