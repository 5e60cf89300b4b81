"""safetensors files written a tensor at a time, and a scratch file that keeps tensors out of
memory until they are asked for. safetensors' own `save_file` builds the whole file in memory
first: for a quantized model or an export, about its size again at the peak.

The format: a little-endian u64 header length, a JSON header (per tensor its dtype, shape and
byte range in the data that follows; optional "__metadata__" strings) padded with spaces to 8
bytes, then the tensors' bytes.
"""
from __future__ import annotations

import json
import shutil
import struct
import tempfile
from pathlib import Path
from typing import Iterable, Mapping

import numpy as np
import torch

from layerwise.errors import LayerwiseError

# safetensors' names of the dtypes stored tensors have.
SAFETENSORS_DTYPES = {torch.uint8: "U8", torch.int8: "I8", torch.int16: "I16", torch.int32: "I32", torch.int64: "I64",
                      torch.float16: "F16", torch.bfloat16: "BF16", torch.float32: "F32", torch.float64: "F64",
                      torch.bool: "BOOL", torch.float8_e4m3fn: "F8_E4M3", torch.float8_e5m2: "F8_E5M2"}


def save_safetensors(tensors: Mapping[str, torch.Tensor], path: str | Path, metadata: dict[str, str] | None = None) -> None:
    """What `safetensors.torch.save_file` writes (tensors in the mapping's order), one tensor at a time."""
    entries = {key: (tensor.dtype, tuple(tensor.shape), tensor.numel() * tensor.element_size())
               for key, tensor in tensors.items()}
    with open(path, "wb") as out:
        out.write(_header(entries, metadata))
        for tensor in tensors.values():
            out.write(memoryview(_as_bytes(tensor)))


class TensorSpill:
    """Tensors appended one at a time to an unnamed scratch file and read back on demand, so
    that what is written is out of memory until asked for; `write_safetensors` copies them, in
    the order they came, into one safetensors file without holding them all."""

    def __init__(self, directory: str | Path | None = None) -> None:
        self._file = tempfile.TemporaryFile(dir=directory)
        self._entries: dict[str, tuple[torch.dtype, tuple[int, ...], int, int]] = {}  # dtype, shape, offset, bytes
        self._end = 0

    def add(self, key: str, tensor: torch.Tensor) -> None:
        if key in self._entries:
            raise LayerwiseError(f"tensor {key} is already stored")
        _dtype_name(key, tensor.dtype)  # refused before anything is written
        data = _as_bytes(tensor)
        self._file.seek(self._end)
        self._file.write(memoryview(data))
        self._entries[key] = (tensor.dtype, tuple(tensor.shape), self._end, data.nbytes)
        self._end += data.nbytes

    def add_rows(self, key: str, dtype: torch.dtype, shape: tuple[int, ...], pieces: Iterable[torch.Tensor]) -> None:
        """A tensor of `shape` given as consecutive pieces of its rows, none of them kept."""
        if key in self._entries:
            raise LayerwiseError(f"tensor {key} is already stored")
        _dtype_name(key, dtype)
        self._file.seek(self._end)
        rows = 0
        for piece in pieces:
            if piece.dtype != dtype or tuple(piece.shape[1:]) != tuple(shape[1:]):
                raise LayerwiseError(f"tensor {key}: a piece of another dtype or width than {dtype}, {shape}")
            self._file.write(memoryview(_as_bytes(piece)))
            rows += piece.shape[0]
        if rows != shape[0]:
            raise LayerwiseError(f"tensor {key}: pieces of {rows} rows for a tensor of {shape[0]}")
        size = int(np.prod(shape)) * torch.empty((), dtype=dtype).element_size()
        self._entries[key] = (dtype, tuple(shape), self._end, size)
        self._end += size

    def read(self, key: str) -> torch.Tensor:
        dtype, shape, offset, size = self._entries[key]
        raw = bytearray(size)
        self._file.seek(offset)
        if self._file.readinto(raw) != size:
            raise LayerwiseError(f"the scratch file lost tensor {key}")
        if not size:
            return torch.empty(shape, dtype=dtype)
        return torch.frombuffer(raw, dtype=torch.uint8).view(dtype).reshape(shape)

    def write_safetensors(self, path: str | Path, metadata: dict[str, str] | None = None) -> None:
        """The tensors as one safetensors file at `path`, copied from the scratch file in pieces."""
        self._file.flush()
        self._file.seek(0)
        with open(path, "wb") as out:
            out.write(_header({key: (dtype, shape, size) for key, (dtype, shape, _, size) in self._entries.items()},
                              metadata))
            shutil.copyfileobj(self._file, out, 1 << 22)

    def close(self) -> None:
        self._file.close()


class TensorSlots:
    """Numbered slots in an unnamed scratch file, each holding tensors of the same shapes and
    dtype (say, a batch list of hidden states), written over in place: the states of many
    variants of a model wait here between blocks instead of in memory."""

    def __init__(self, shapes: list[tuple[int, ...]], dtype: torch.dtype, directory: str | Path | None = None) -> None:
        self.shapes, self.dtype = [tuple(shape) for shape in shapes], dtype
        if any(not shape for shape in self.shapes):
            raise LayerwiseError("slots hold tensors of one dimension or more")
        itemsize = torch.empty((), dtype=dtype).element_size()
        self._sizes = [int(np.prod(shape)) * itemsize for shape in self.shapes]
        self._starts = [sum(self._sizes[:i]) for i in range(len(self._sizes))]
        self._slot_bytes = sum(self._sizes)
        self._file = tempfile.TemporaryFile(dir=directory)

    def write(self, slot: int, tensors: list[torch.Tensor]) -> None:
        if [tuple(t.shape) for t in tensors] != self.shapes or any(t.dtype != self.dtype for t in tensors):
            raise LayerwiseError("tensors of other shapes or dtype than the slots were made for")
        self._file.seek(slot * self._slot_bytes)
        for tensor in tensors:
            self._file.write(memoryview(_as_bytes(tensor)))

    def read(self, slot: int) -> list[torch.Tensor]:
        return [self.read_rows(slot, part, 0, shape[0]) for part, shape in enumerate(self.shapes)]

    def read_rows(self, slot: int, part: int, start: int, stop: int) -> torch.Tensor:
        """Rows start..stop of tensor `part` of `slot` along its first axis."""
        shape = self.shapes[part]
        row_bytes = self._sizes[part] // max(shape[0], 1)
        size = (stop - start) * row_bytes
        raw = bytearray(size)
        self._file.seek(slot * self._slot_bytes + self._starts[part] + start * row_bytes)
        if self._file.readinto(raw) != size:
            raise LayerwiseError(f"the scratch file has no slot {slot} written")
        rows = torch.frombuffer(raw, dtype=torch.uint8).view(self.dtype) if size else torch.empty(0, dtype=self.dtype)
        return rows.reshape(stop - start, *shape[1:])

    def close(self) -> None:
        self._file.close()


def _header(entries: dict[str, tuple[torch.dtype, tuple[int, ...], int]], metadata: dict[str, str] | None) -> bytes:
    """The header for tensors (key -> dtype, shape, bytes) whose data follow in this order."""
    header: dict = {"__metadata__": dict(metadata)} if metadata else {}
    offset = 0
    for key, (dtype, shape, size) in entries.items():
        header[key] = {"dtype": _dtype_name(key, dtype), "shape": list(shape), "data_offsets": [offset, offset + size]}
        offset += size
    text = json.dumps(header, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)
    return struct.pack("<Q", len(text)) + text


def _dtype_name(key: str, dtype: torch.dtype) -> str:
    if dtype not in SAFETENSORS_DTYPES:
        raise LayerwiseError(f"{key}: safetensors does not store {dtype}")
    return SAFETENSORS_DTYPES[dtype]


def _as_bytes(tensor: torch.Tensor) -> np.ndarray:
    return tensor.detach().contiguous().cpu().reshape(-1).view(torch.uint8).numpy()
