"""Checks on weight files before a third-party loader reads them, and on the weights after.

Loaders assume well-formed files: a truncated or corrupted GGUF sends transformers into struct
errors or reshape failures, and a pickle checkpoint can run code. Here every length read from
a header is checked against the bytes that are really left before anything is read with it, so
a corrupt file ends in one line naming the part that is wrong (header, metadata, tensor table or
data), never in a hang or a huge allocation.
"""
from __future__ import annotations

import functools
import mmap
import pickle
import struct
from pathlib import Path
from typing import NamedTuple

import torch
from torch import nn

from layerwise.errors import LayerwiseError

# GGUF value types (gguf.GGUFValueType) and the size of each fixed-size one.
_FIXED_SIZES = {0: 1, 1: 1, 2: 2, 3: 2, 4: 4, 5: 4, 6: 4, 7: 1, 10: 8, 11: 8, 12: 8}
_STRING, _ARRAY = 8, 9
_MAX_DIMS = 4
_MAX_NESTING = 2


class GGUFTensorInfo(NamedTuple):
    """One entry of a GGUF tensor table, as `check_gguf` walks it."""
    tensor_type: int  # gguf.GGMLQuantizationType
    elements: int
    nbytes: int
    dims: tuple[int, ...]  # as the file gives them: fastest-varying first
    offset: int  # of its data, from the start of the file


class _Cursor:
    """Bounded little-endian reads: each one checks that the bytes exist first."""

    def __init__(self, data: mmap.mmap | bytes, where: str) -> None:
        self.data, self.offset, self.where = data, 0, where

    @property
    def left(self) -> int:
        return len(self.data) - self.offset

    def need(self, count: int, what: str) -> None:
        if count < 0 or count > self.left:
            raise LayerwiseError(f"{self.where}: {what} needs {count:,} bytes at offset {self.offset:,} but only "
                                 f"{max(self.left, 0):,} remain (truncated or corrupt)")

    def unpack(self, fmt: str, what: str) -> tuple:
        size = struct.calcsize(fmt)
        self.need(size, what)
        values = struct.unpack_from(fmt, self.data, self.offset)
        self.offset += size
        return values

    def string(self, what: str) -> str:
        (length,) = self.unpack("<Q", what + " length")
        self.need(length, what)
        raw = bytes(self.data[self.offset:self.offset + length])
        self.offset += length
        try:
            return raw.decode("utf-8")
        except UnicodeDecodeError:
            raise LayerwiseError(f"{self.where}: {what} is not valid UTF-8 (corrupt file)") from None

    def skip_value(self, value_type: int, what: str, depth: int = 0) -> object:
        """Skip one value, returning it when it is a scalar (for the few keys we need)."""
        if value_type in _FIXED_SIZES:
            fmt = {0: "<B", 1: "<b", 2: "<H", 3: "<h", 4: "<I", 5: "<i", 6: "<f", 7: "<?", 10: "<Q", 11: "<q",
                   12: "<d"}[value_type]
            return self.unpack(fmt, what)[0]
        if value_type == _STRING:
            return self.string(what)
        if value_type == _ARRAY and depth < _MAX_NESTING:
            element_type, count = self.unpack("<IQ", what + " array header")
            if element_type in _FIXED_SIZES:
                self.need(count * _FIXED_SIZES[element_type], f"{what} ({count:,} elements)")
                self.offset += count * _FIXED_SIZES[element_type]
                return None
            # Every variable-size element takes at least 8 bytes, which bounds the loop below.
            self.need(count * 8, f"{what} ({count:,} elements)")
            for index in range(count):
                self.skip_value(element_type, f"{what}[{index}]", depth + 1)
            return None
        raise LayerwiseError(f"{self.where}: {what} has unknown value type {value_type} (corrupt file)")


def check_gguf(path: str | Path) -> dict:
    """Walk a GGUF file's header, metadata and tensor table with bounded reads; check that every
    tensor's data lies inside the file. Returns a summary; raises LayerwiseError naming the part
    that is wrong."""
    path = Path(path)
    stat = path.stat()
    return _check_gguf_cached(str(path), stat.st_size, stat.st_mtime_ns)


@functools.lru_cache(maxsize=8)
def _check_gguf_cached(path: str, size: int, mtime_ns: int) -> dict:
    import gguf

    if size == 0:
        raise LayerwiseError(f"{path} is empty")
    with open(path, "rb") as handle, mmap.mmap(handle.fileno(), 0, access=mmap.ACCESS_READ) as data:
        cursor = _Cursor(data, f"GGUF header of {path}")
        (magic,) = cursor.unpack("<I", "the magic number")
        if magic != gguf.GGUF_MAGIC:
            raise LayerwiseError(f"{path} is not a GGUF file (magic {magic:#010x})")
        (version,) = cursor.unpack("<I", "the version")
        if version not in (2, 3):
            raise LayerwiseError(f"{path}: GGUF version {version} is not supported (2 and 3 are)")
        n_tensors, n_kv = cursor.unpack("<QQ", "the tensor and metadata counts")
        # Each metadata entry takes at least 8 + 4 + 1 bytes, each tensor entry 8 + 4 + 8 + 4 + 8.
        cursor.need(n_kv * 13 + n_tensors * 32, f"{n_kv:,} metadata entries and {n_tensors:,} tensors")

        cursor.where = f"GGUF metadata of {path}"
        alignment = gguf.GGUF_DEFAULT_ALIGNMENT
        architecture = None
        for index in range(n_kv):
            key = cursor.string(f"metadata key {index}")
            (value_type,) = cursor.unpack("<I", f"the type of {key!r}")
            value = cursor.skip_value(value_type, repr(key))
            if key == "general.architecture":
                architecture = value
            if key == "general.alignment":
                if not isinstance(value, int) or value <= 0 or value & (value - 1):
                    raise LayerwiseError(f"{path}: general.alignment is {value!r}, not a power of two (corrupt file)")
                alignment = value

        cursor.where = f"GGUF tensor table of {path}"
        tensors = []
        for index in range(n_tensors):
            name = cursor.string(f"tensor {index}'s name")
            (n_dims,) = cursor.unpack("<I", f"{name}'s dimension count")
            if not 1 <= n_dims <= _MAX_DIMS:
                raise LayerwiseError(f"{cursor.where}: tensor {name!r} has {n_dims} dimensions (corrupt file)")
            dims = cursor.unpack(f"<{n_dims}Q", f"{name}'s shape")
            tensor_type, offset = cursor.unpack("<IQ", f"{name}'s type and offset")
            try:
                block, type_size = gguf.GGML_QUANT_SIZES[gguf.GGMLQuantizationType(tensor_type)]
            except (ValueError, KeyError):
                raise LayerwiseError(f"{cursor.where}: tensor {name!r} has unknown type {tensor_type} "
                                     "(corrupt file)") from None
            if any(d == 0 for d in dims) or dims[0] % block:
                raise LayerwiseError(f"{cursor.where}: tensor {name!r} has shape {list(dims)}, which its type "
                                     f"{gguf.GGMLQuantizationType(tensor_type).name} cannot hold (corrupt file)")
            count = 1
            for d in dims:
                count *= d
            tensors.append((name, offset, count // block * type_size, int(tensor_type), count, tuple(dims)))

        data_start = -(-cursor.offset // alignment) * alignment
        for name, offset, nbytes, _, _, _ in tensors:
            end = data_start + offset + nbytes
            if offset % alignment or end > size:
                what = ("lies beyond the end" if end > size else f"is not aligned to {alignment} bytes")
                raise LayerwiseError(f"GGUF data of {path}: tensor {name!r} (bytes {data_start + offset:,} to "
                                     f"{end:,}) {what} of the {size:,}-byte file (truncated or corrupt)")
    return {"version": version, "tensors": len(tensors), "metadata": n_kv, "data_start": data_start,
            "architecture": architecture,
            # What streaming and plans sized like this file need, read without gguf-py's reader,
            # which parses every metadata array into objects (SmolLM2's vocabulary: 160 MB).
            "tensor_table": {name: GGUFTensorInfo(tensor_type, count, nbytes, dims, data_start + offset)
                             for name, offset, nbytes, tensor_type, count, dims in tensors}}


def check_safetensors(path: str | Path) -> None:
    """Let the safetensors library validate the header (it bounds it, and checks that the data
    is exactly covered), turning its error into one line."""
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(str(path), framework="pt"):
            pass
    except SafetensorError as error:
        raise LayerwiseError(f"{path} is truncated or corrupt ({error})") from None


def check_weight_files(folder: str | Path) -> None:
    """Validate every safetensors file of a model folder, and every pickle checkpoint without
    unpickling anything but tensors (transformers reads pickles only where no safetensors exist)."""
    folder = Path(folder)
    files = sorted(folder.glob("*.safetensors")) or sorted(
        [*folder.glob("*.bin"), *folder.glob("*.pt"), *folder.glob("*.pth")])
    _check_files_cached(tuple((str(f), f.stat().st_size, f.stat().st_mtime_ns) for f in files))


@functools.lru_cache(maxsize=8)
def _check_files_cached(files: tuple[tuple[str, int, int], ...]) -> None:
    for file, _, _ in files:
        if file.endswith(".safetensors"):
            check_safetensors(file)
        else:
            check_pickle(file)


def check_pickle(path: str | Path) -> None:
    """A .bin/.pt checkpoint is read only with torch.load(weights_only=True), which refuses any
    object that is not a tensor or a plain container; a file that needs more is refused."""
    try:
        torch.load(path, map_location="meta", weights_only=True, mmap=True)
    except pickle.UnpicklingError as error:
        found = next((line.strip() for line in str(error).splitlines() if "GLOBAL" in line), "")
        raise LayerwiseError(f"refusing to unpickle {path}: it holds more than tensors"
                             f"{' (' + found + ')' if found else ''}; layerwise loads pickle checkpoints only "
                             "with torch.load(weights_only=True). If you trust it, convert it to safetensors") from None
    except (RuntimeError, EOFError, OSError, ValueError) as error:
        lines = str(error).strip().splitlines()
        raise LayerwiseError(f"{path} is truncated or corrupt ({lines[0] if lines else type(error).__name__})") from None


# Entries checked at once: a whole embedding's boolean mask would be a second tensor of its size.
_FINITE_CHECK_ELEMENTS = 1 << 22


def check_finite(model: nn.Module, where: str) -> None:
    """NaN or Inf in any weight makes every downstream number meaningless: refuse early."""
    for name, tensor in model.named_parameters():
        if tensor.is_floating_point() and tensor.device.type != "meta" and not _all_finite(tensor.detach()):
            bad = int((~torch.isfinite(tensor)).sum())
            raise LayerwiseError(f"{where}: weight {name} has {bad:,} NaN or Inf values; the checkpoint is corrupt")


def _all_finite(tensor: torch.Tensor) -> bool:
    return all(bool(torch.isfinite(piece).all()) for piece in tensor.reshape(-1).split(_FINITE_CHECK_ELEMENTS))
