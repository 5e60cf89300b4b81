"""A quantized model on disk for layerwise itself: plan.json, the stored codes and scales
(qweights.safetensors) and quant.json (metadata and sizes). Real engines' formats are export's job.

The file holds what the size report counts, at the width it counts it: codes and integer zero
points packed at their bit width (`pack_bits`), scales as fp16 (MX: one exponent byte), AWQ's
channel scales as fp16, GGUF blocks as llama.cpp's bytes. quant.json says, per tensor, how to
restore the exact in-memory tensor (`tensors`: encoding, dtype, shape), so loading gives
bit-identical weights. Schema version 1 (int16 codes, float32 parameters) is still read.
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from layerwise.errors import LayerwiseError
from layerwise.models.layout import linear_weight
from layerwise.models.loading import LoadedModel
from layerwise.models.streaming import write_linear
from layerwise.plan.plan import Plan
from layerwise.quant.config import QuantConfig
from layerwise.quant.formats import get_format
from layerwise.quant.qtensor import QTensor
from layerwise.util.files import atomic_path, read_artifact, write_text_atomic

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


def save_quantized(out_dir: str | Path, plan: Plan, quantized: dict[str, QTensor], meta: dict) -> list[Path]:
    out_dir = Path(out_dir)
    tensors: dict[str, torch.Tensor] = {}
    modules = {}
    for name, q in quantized.items():
        stored, specs = _stored_tensors(name, q)
        tensors |= stored
        modules[name] = {"config": q.config.to_dict(), "shape": list(q.shape), "tensors": specs}
    with atomic_path(out_dir / "qweights.safetensors", named=True) as tmp:
        save_file(tensors, str(tmp))
    document = {"schema": SCHEMA, "schema_version": SCHEMA_VERSION, "meta": meta, "modules": modules}
    return [
        write_text_atomic(out_dir / "quant.json", json.dumps(document, indent=1) + "\n"),
        plan.save(out_dir / "plan.json"),
        out_dir / "qweights.safetensors",
    ]


def load_quantized(out_dir: str | Path) -> tuple[dict, dict[str, QTensor]]:
    out_dir = Path(out_dir)
    document = _read_document(out_dir / "quant.json")
    try:
        tensors = load_file(str(out_dir / "qweights.safetensors"))
    except FileNotFoundError:
        raise LayerwiseError(f"{out_dir} is not a layerwise quantized model (qweights.safetensors missing)") from None
    except SafetensorError as error:
        raise LayerwiseError(f"{out_dir} holds a corrupt quantized model: {str(error).splitlines()[0]}") from None
    quantized = {}
    for name, entry in document["modules"].items():
        if "tensors" in entry:
            missing = [f"{name}.{key}" for key in entry["tensors"] if f"{name}.{key}" not in tensors]
            if missing:
                raise LayerwiseError(f"{out_dir} holds a corrupt quantized model: tensor {missing[0]} is missing")
            parts = {key: _decode(tensors[f"{name}.{key}"], spec) for key, spec in entry["tensors"].items()}
        else:  # schema version 1: every tensor as it was in memory
            parts = {key.removeprefix(name + "."): value for key, value in tensors.items()
                     if key.startswith(name + ".")}
        packed = parts.pop("packed", None)
        codes, channel_scale = parts.pop("codes", None), parts.pop("channel_scale", None)
        quantized[name] = QTensor(QuantConfig.from_dict(entry["config"]), tuple(entry["shape"]), codes=codes,
                                  params=parts or None, packed=None if packed is None else packed.numpy(),
                                  channel_scale=channel_scale)
    return document, quantized


def _read_document(path: Path) -> dict:
    try:
        return read_artifact(path, SCHEMA, SCHEMA_VERSION, "quantized model")
    except LayerwiseError as error:
        try:  # schema version 1 stored int16 codes and float32 parameters, read as they are
            return read_artifact(path, SCHEMA, 1, "quantized model")
        except LayerwiseError:
            raise error from None


@torch.no_grad()
def apply_quantized(loaded: LoadedModel, document: dict, quantized: dict[str, QTensor]) -> None:
    """Put the dequantized weights into `loaded.model`; refuse a file made for another model."""
    fingerprint = document["meta"].get("model", {}).get("fingerprint")
    if fingerprint and fingerprint != loaded.fingerprint:
        raise LayerwiseError(f"this quantized model was made from a model with fingerprint {fingerprint[:16]}..., "
                             f"not {loaded.fingerprint[:16]}... ({loaded.source.display})")
    from layerwise.prune.depth import drop_units_

    drop_units_(loaded, document.get("meta", {}).get("drop", []))
    for name, q in quantized.items():
        try:
            module = loaded.model.get_submodule(name)
        except AttributeError:
            raise LayerwiseError(f"the quantized model names module {name!r}, which this model does not have") from None
        if tuple(linear_weight(module).shape) != q.shape:
            raise LayerwiseError(f"{name}: stored shape {q.shape} does not match the model's {tuple(linear_weight(module).shape)}")
        write_linear(loaded.streamed, loaded.model, name, q)
