"""A quantized model on disk for layerwise itself: plan.json, the stored codes and scales
(qweights.safetensors) and quant.json (metadata and sizes). Real engines' formats are export's job.
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from layerwise.errors import LayerwiseError
from layerwise.models.layout import linear_weight, set_linear_weight
from layerwise.models.loading import LoadedModel
from layerwise.plan.plan import Plan
from layerwise.quant.config import QuantConfig
from layerwise.quant.qtensor import QTensor
from layerwise.util.files import atomic_path, read_artifact, write_text_atomic

SCHEMA = "layerwise.quantized"
SCHEMA_VERSION = 1


def save_quantized(out_dir: str | Path, plan: Plan, quantized: dict[str, QTensor], meta: dict) -> list[Path]:
    out_dir = Path(out_dir)
    tensors: dict[str, torch.Tensor] = {}
    modules = {}
    for name, q in quantized.items():
        modules[name] = {"config": q.config.to_dict(), "shape": list(q.shape)}
        if q.packed is not None:
            tensors[f"{name}.packed"] = torch.from_numpy(np.ascontiguousarray(q.packed))
        else:
            tensors[f"{name}.codes"] = q.codes.contiguous().cpu()
            for key, value in q.params.items():
                tensors[f"{name}.{key}"] = value.contiguous().cpu()
        if q.channel_scale is not None:
            tensors[f"{name}.channel_scale"] = q.channel_scale.contiguous().cpu()
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
    document = read_artifact(out_dir / "quant.json", SCHEMA, SCHEMA_VERSION, "quantized model")
    try:
        tensors = load_file(str(out_dir / "qweights.safetensors"))
    except FileNotFoundError:
        raise LayerwiseError(f"{out_dir} is not a layerwise quantized model (qweights.safetensors missing)") from None
    except SafetensorError as error:
        raise LayerwiseError(f"{out_dir} holds a corrupt quantized model: {str(error).splitlines()[0]}") from None
    quantized = {}
    for name, entry in document["modules"].items():
        config = QuantConfig.from_dict(entry["config"])
        if f"{name}.packed" in tensors:
            q = QTensor(config, tuple(entry["shape"]), packed=tensors[f"{name}.packed"].numpy())
        else:
            params = {key.rsplit(".", 1)[1]: value for key, value in tensors.items()
                      if key.startswith(name + ".") and key.rsplit(".", 1)[1] not in ("codes", "channel_scale")}
            q = QTensor(config, tuple(entry["shape"]), codes=tensors[f"{name}.codes"], params=params)
        q.channel_scale = tensors.get(f"{name}.channel_scale")
        quantized[name] = q
    return document, quantized


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
        set_linear_weight(module, q.dequantize())
