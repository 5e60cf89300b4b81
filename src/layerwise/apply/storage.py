"""A quantized model on disk for layerwise itself: plan.json, the stored codes and scales
(qweights.safetensors) and quant.json (metadata and sizes). Real engines' formats are export's job.

Streamed runs keep codes out of memory: `StoredModules` holds each module in its stored form on
disk (a scratch file while quantizing, or the qweights.safetensors it reads) and decodes it when
asked, and the file is written a tensor at a time (`TensorSpill.write_safetensors`).

The file holds what the size report counts, at the width it counts it: codes and integer zero
points packed at their bit width (`pack_bits`), scales as fp16 (MX: one exponent byte), AWQ's
channel scales as fp16, GGUF blocks as llama.cpp's bytes. quant.json says, per tensor, how to
restore the exact in-memory tensor (`tensors`: encoding, dtype, shape), so loading gives
bit-identical weights. Schema version 1 (int16 codes, float32 parameters) is still read.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Callable, Iterator, Mapping

import numpy as np
import torch
from safetensors import SafetensorError, safe_open

from layerwise.errors import LayerwiseError
from layerwise.models.layout import linear_weight
from layerwise.models.loading import LoadedModel
from layerwise.models.streaming import write_linear
from layerwise.plan.plan import Plan
from layerwise.quant.config import QuantConfig
from layerwise.quant.formats import get_format
from layerwise.quant.qtensor import QTensor
from layerwise.util.files import atomic_path, read_artifact, write_text_atomic
from layerwise.util.tensor_files import TensorSpill

SCHEMA = "layerwise.quantized"
SCHEMA_VERSION = 2  # 2: codes and zero points packed at their bit width; 1: int16 codes, float32 parameters


def pack_bits(values: np.ndarray, bits: int) -> np.ndarray:
    """Integers in [0, 2^bits) -> bytes, `bits` per value, little-endian: value i occupies bits
    i*bits .. i*bits + bits - 1 of the stream, its lowest bit first. Every 8 values fill one
    64-bit word of which the low `bits` bytes are kept (vectorised over words, not bits)."""
    values = values.reshape(-1).astype(np.uint8)
    columns = np.zeros((-(-len(values) // 8), 8), dtype=np.uint8)
    columns.reshape(-1)[: len(values)] = values
    words = np.zeros(len(columns), dtype="<u8")
    for j in range(8):
        words |= columns[:, j].astype("<u8") << np.uint64(j * bits)
    return words.view(np.uint8).reshape(-1, 8)[:, :bits].reshape(-1)[: -(-len(values) * bits // 8)]


def unpack_bits(data: np.ndarray, bits: int, count: int) -> np.ndarray:
    """Inverse of `pack_bits`: the first `count` values, as uint8."""
    stream = np.zeros(-(-count // 8) * bits, dtype=np.uint8)
    stream[: len(data)] = data
    raw = np.zeros((len(stream) // bits, 8), dtype=np.uint8)
    raw[:, :bits] = stream.reshape(-1, bits)
    words = raw.view("<u8")[:, 0]
    values = np.empty((len(words), 8), dtype=np.uint8)
    for j in range(8):
        values[:, j] = (words >> np.uint64(j * bits)) & np.uint64(2**bits - 1)
    return values.reshape(-1)[:count]


def _encode(value: torch.Tensor, encoding: str, bits: int) -> tuple[torch.Tensor, dict]:
    """A tensor as stored, and the spec that restores it; `bits` is the width of "bits" encoding."""
    value = value.detach().contiguous().cpu()
    spec = {"encoding": encoding, "dtype": str(value.dtype).removeprefix("torch."), "shape": list(value.shape)}
    if encoding == "bits":
        integers = value.to(torch.int16)
        # Signed codes (symmetric integers) are kept in two's complement: sign-extended on load.
        spec |= {"bits": bits, "signed": bool((integers < 0).any())}
        stored = torch.from_numpy(pack_bits((integers & (2**bits - 1)).numpy(), bits))
    elif encoding == "float16":
        stored = value.to(torch.float16)
    elif encoding == "e8m0":  # powers of two 2^e as the byte e + 127 (OCP MX's E8M0)
        stored = (torch.frexp(value).exponent - 1 + 127).clamp(0, 255).to(torch.uint8)
    else:
        stored = value
    return stored, spec


def _decode(stored: torch.Tensor, spec: dict) -> torch.Tensor:
    dtype = getattr(torch, spec["dtype"])
    if spec["encoding"] == "bits":
        bits, count = spec["bits"], int(np.prod(spec["shape"], dtype=np.int64))
        integers = torch.from_numpy(unpack_bits(stored.numpy(), bits, count).astype(np.int16))
        if spec["signed"]:
            integers = torch.where(integers >= 2 ** (bits - 1), integers - 2**bits, integers)
        return integers.to(dtype).reshape(spec["shape"])
    if spec["encoding"] == "float16":
        return stored.to(dtype)
    if spec["encoding"] == "e8m0":
        return torch.exp2(stored.to(torch.float64) - 127).to(dtype)
    return stored


def _identical(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Bit for bit (so -0.0 differs from 0.0), not just numerically equal."""
    return (a.dtype == b.dtype and a.shape == b.shape
            and torch.equal(a.reshape(-1).view(torch.uint8), b.reshape(-1).view(torch.uint8)))


def _stored_tensors(name: str, q: QTensor) -> tuple[dict[str, torch.Tensor], dict[str, dict]]:
    """What `q` stores under `name.<key>`, and the specs that restore each tensor exactly."""
    if q.packed is not None:
        parts = {"packed": (torch.from_numpy(np.ascontiguousarray(q.packed)), "raw")}
    else:
        encodings = {"codes": "bits", "zero": "bits", "scale": get_format(q.config.format).scale_storage}
        parts = {key: (value, encodings.get(key, "raw")) for key, value in {"codes": q.codes, **q.params}.items()}
    if q.channel_scale is not None:
        parts["channel_scale"] = (q.channel_scale, "float16")
    tensors, specs = {}, {}
    for key, (value, encoding) in parts.items():
        stored, spec = _encode(value, encoding, q.config.bits)
        if not _identical(_decode(stored, spec), value.detach().contiguous().cpu()):
            raise LayerwiseError(f"{name}: its {key} does not survive {encoding} storage exactly; "
                                 "the quantizer must round it to what is stored")
        tensors[f"{name}.{key}"], specs[key] = stored, spec
    return tensors, specs


class StoredModules(Mapping[str, QTensor]):
    """Quantized modules in their stored form on disk, each decoded (bit-identical) when it is
    asked for: a streamed run never holds a model's codes at once. Backed by a scratch file that
    `add` appends to while quantizing (`StoredModules()`), or by a qweights.safetensors
    (`load_quantized(..., lazy=True)`)."""

    def __init__(self, read: Callable[[str], torch.Tensor] | None = None, modules: dict[str, dict] | None = None,
                 where: str = "the scratch file", directory: str | Path | None = None) -> None:
        # The scratch file is unnamed (gone when closed or at exit), in `directory` or the system's temporary one.
        self.spill = TensorSpill(directory) if read is None else None
        self._read = read or self.spill.read
        self.modules: dict[str, dict] = dict(modules or {})  # name -> {"config", "shape", "tensors": specs}
        self._where = where

    def add(self, name: str, q: QTensor) -> None:
        """Encode `q` as qweights.safetensors stores it and move it to the scratch file."""
        stored, specs = _stored_tensors(name, q)
        for key, tensor in stored.items():
            self.spill.add(key, tensor)
        self.modules[name] = _module_entry(q, specs)

    def stored_form(self, name: str) -> "StoredModule":
        """Something `write_linear` takes: decoded from disk each time it is dequantized."""
        return StoredModule(self, name)

    def configs(self) -> dict[str, QuantConfig]:
        return {name: QuantConfig.from_dict(entry["config"]) for name, entry in self.modules.items()}

    def __getitem__(self, name: str) -> QTensor:
        entry = self.modules[name]
        try:
            parts = {key: _decode(self._read(f"{name}.{key}"), spec) for key, spec in entry["tensors"].items()}
        except (KeyError, SafetensorError):
            raise LayerwiseError(f"{self._where} holds a corrupt quantized model: a tensor of {name} is missing "
                                 "or unreadable") from None
        return _qtensor(entry, parts)

    def __iter__(self) -> Iterator[str]:
        return iter(self.modules)

    def __len__(self) -> int:
        return len(self.modules)


class StoredModule:
    """One module of a `StoredModules`, read and decoded from disk at each `dequantize()`."""

    def __init__(self, modules: StoredModules, name: str) -> None:
        self.modules, self.name = modules, name

    def dequantize(self) -> torch.Tensor:
        return self.modules[self.name].dequantize()


def _module_entry(q: QTensor, specs: dict[str, dict]) -> dict:
    return {"config": q.config.to_dict(), "shape": list(q.shape), "tensors": specs}


def _qtensor(entry: dict, parts: dict[str, torch.Tensor]) -> QTensor:
    packed = parts.pop("packed", None)
    codes, channel_scale = parts.pop("codes", None), parts.pop("channel_scale", None)
    return QTensor(QuantConfig.from_dict(entry["config"]), tuple(entry["shape"]), codes=codes, params=parts or None,
                   packed=None if packed is None else packed.numpy(), channel_scale=channel_scale)


def save_quantized(out_dir: str | Path, plan: Plan, quantized: Mapping[str, QTensor], meta: dict) -> list[Path]:
    """Write plan.json, quant.json and qweights.safetensors; the codes go to disk a module at a
    time (from `quantized`'s own scratch file when it is a `StoredModules` that has one)."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    on_disk = quantized if isinstance(quantized, StoredModules) and quantized.spill is not None else None
    if on_disk is None:
        on_disk = StoredModules(directory=out_dir)
        for name, q in quantized.items():
            on_disk.add(name, q)
    try:
        with atomic_path(out_dir / "qweights.safetensors") as tmp:
            on_disk.spill.write_safetensors(tmp)
    finally:
        if on_disk is not quantized:
            on_disk.spill.close()
    document = {"schema": SCHEMA, "schema_version": SCHEMA_VERSION, "meta": meta, "modules": on_disk.modules}
    return [
        write_text_atomic(out_dir / "quant.json", json.dumps(document, indent=1) + "\n"),
        plan.save(out_dir / "plan.json"),
        out_dir / "qweights.safetensors",
    ]


def load_quantized(out_dir: str | Path, lazy: bool = False) -> tuple[dict, Mapping[str, QTensor]]:
    """The document (quant.json) and every module's stored form; `lazy`: a `StoredModules` that
    reads and decodes a module from qweights.safetensors when asked (schema version 2)."""
    out_dir = Path(out_dir)
    document = _read_document(out_dir / "quant.json")
    weights = out_dir / "qweights.safetensors"
    try:
        with safe_open(str(weights), framework="pt") as handle:
            names = set(handle.keys())
            modules = document["modules"]
            for name, entry in modules.items():
                missing = [f"{name}.{key}" for key in entry.get("tensors", ()) if f"{name}.{key}" not in names]
                if missing:
                    raise LayerwiseError(f"{out_dir} holds a corrupt quantized model: tensor {missing[0]} is missing")
            if lazy and all("tensors" in entry for entry in modules.values()):
                return document, StoredModules(_reader(weights), modules, str(out_dir))
            tensors = {key: handle.get_tensor(key) for key in names}
    except FileNotFoundError:
        raise LayerwiseError(f"{out_dir} is not a layerwise quantized model (qweights.safetensors missing)") from None
    except SafetensorError as error:
        raise LayerwiseError(f"{out_dir} holds a corrupt quantized model: {str(error).splitlines()[0]}") from None
    quantized = {}
    for name, entry in document["modules"].items():
        if "tensors" in entry:
            parts = {key: _decode(tensors[f"{name}.{key}"], spec) for key, spec in entry["tensors"].items()}
        else:  # schema version 1: every tensor as it was in memory
            parts = {key.removeprefix(name + "."): value for key, value in tensors.items()
                     if key.startswith(name + ".")}
        quantized[name] = _qtensor(entry, parts)
    return document, quantized


def _reader(path: Path) -> Callable[[str], torch.Tensor]:
    """Reads one tensor of a safetensors file, opening it for that read alone (its pages leave
    the process after)."""
    def read(key: str) -> torch.Tensor:
        with safe_open(str(path), framework="pt") as handle:
            return handle.get_tensor(key)
    return read


def _read_document(path: Path) -> dict:
    try:
        return read_artifact(path, SCHEMA, SCHEMA_VERSION, "quantized model")
    except LayerwiseError as error:
        try:  # schema version 1 stored int16 codes and float32 parameters, read as they are
            return read_artifact(path, SCHEMA, 1, "quantized model")
        except LayerwiseError:
            raise error from None


@torch.no_grad()
def apply_quantized(loaded: LoadedModel, document: dict, quantized: Mapping[str, QTensor]) -> None:
    """Put the dequantized weights into `loaded.model`; refuse a file made for another model. A
    `StoredModules` is not decoded here: a streamed model decodes each module from disk as its
    part loads."""
    fingerprint = document["meta"].get("model", {}).get("fingerprint")
    if fingerprint and fingerprint != loaded.fingerprint:
        raise LayerwiseError(f"this quantized model was made from a model with fingerprint {fingerprint[:16]}..., "
                             f"not {loaded.fingerprint[:16]}... ({loaded.source.display})")
    from layerwise.prune.depth import drop_units_

    drop_units_(loaded, document.get("meta", {}).get("drop", []))
    on_disk = isinstance(quantized, StoredModules)
    for name in quantized:
        try:
            module = loaded.model.get_submodule(name)
        except AttributeError:
            raise LayerwiseError(f"the quantized model names module {name!r}, which this model does not have") from None
        stored = quantized.stored_form(name) if on_disk else quantized[name]
        shape = tuple(quantized.modules[name]["shape"]) if on_disk else stored.shape
        if tuple(linear_weight(module).shape) != shape:
            raise LayerwiseError(f"{name}: stored shape {shape} does not match the model's {tuple(linear_weight(module).shape)}")
        write_linear(loaded.streamed, loaded.model, name, stored)
