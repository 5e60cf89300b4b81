"""A packed Hugging Face checkpoint in compressed-tensors' "pack-quantized" format, with bits and
group size per module: what llm-compressor writes and vLLM and transformers load.

Each quantized linear is stored as `weight_packed` (its integer codes, packed densely into int32
by compressed-tensors' own packer), `weight_scale` (fp16, one per group: the values our
quantizer chose, so nothing is re-rounded) and `weight_shape`. `quantization_config` in
config.json has one config group per (bits, group size), targeting its modules by name.
Everything else keeps the model's dtype. compressed-tensors is an optional dependency
(`pip install layerwise[serve]`); only this export needs it.
"""
from __future__ import annotations

import json
from collections import defaultdict
from pathlib import Path

import torch

from layerwise.errors import LayerwiseError
from layerwise.export.registry import ExportJob, register_exporter
from layerwise.models.adapters import expert_of
from layerwise.models.loading import LoadedModel
from layerwise.quant.qtensor import QTensor
from layerwise.util.files import atomic_folder


def check_plan_representable(targets: dict) -> None:
    """Before any quantization work: every module's config (name -> QuantConfig) must be one
    pack-quantized stores."""
    for name, config in targets.items():
        _check_config(name, config)
        if expert_of(name) >= 0:
            raise LayerwiseError(f"{name}: compressed-tensors export of routed experts is not supported yet "
                                 "(transformers keeps them fused in 3-D tensors); export --format gguf or hf")


def _check_config(name: str, config) -> None:
    if config.format != "int" or not config.symmetric:
        raise LayerwiseError(f"{name}: {config.label} has no compressed-tensors pack-quantized form; this export "
                             "takes symmetric integer formats (int2..int8, groups or per row), e.g. int4g64")
    if config.algorithm == "awq":
        raise LayerwiseError(f"{name}: AWQ's per-channel input scales have no place in pack-quantized; export "
                             "GPTQ or round-to-nearest plans")


def _check_representable(name: str, q: QTensor) -> None:
    config = q.config
    _check_config(name, config)
    if q.channel_scale is not None:
        raise LayerwiseError(f"{name}: AWQ's per-channel input scales have no place in pack-quantized; export "
                             "GPTQ or round-to-nearest plans")
    if config.group_size is not None and q.shape[1] % config.group_size:
        raise LayerwiseError(f"{name}: groups of {config.group_size} leave a shorter last group over "
                             f"{q.shape[1]} columns, which compressed-tensors does not store")


def _weights_args(bits: int, group_size: int | None) -> dict:
    return {"num_bits": bits, "type": "int", "symmetric": True, "dynamic": False, "actorder": None,
            "strategy": "group" if group_size else "channel", "group_size": group_size,
            "block_structure": None, "observer": "minmax", "observer_kwargs": {}}


def export_compressed_tensors(loaded: LoadedModel, stored: dict[str, QTensor], out: str | Path) -> dict:
    """Write `out` (a folder): config.json with quantization_config, model.safetensors, tokenizer."""
    try:
        import compressed_tensors
        from compressed_tensors.compressors.pack_quantized.helpers import pack_to_int32
    except ImportError:
        raise LayerwiseError("the compressed-tensors export needs the compressed-tensors package: "
                             "pip install 'layerwise[serve]'") from None
    from safetensors.torch import save_file

    linears = set(stored)
    outside = sorted(name for name in linears if not name.startswith(loaded.adapter.blocks + "."))
    if outside:
        raise LayerwiseError(f"{outside[0]}: pack-quantized covers the block linears only; keep embeddings and "
                             "the LM head unquantized in the plan")
    groups: dict[tuple[int, int | None], list[str]] = defaultdict(list)
    for name, q in stored.items():
        _check_representable(name, q)
        groups[(q.config.bits, q.config.group_size)].append(name)

    tensors: dict[str, torch.Tensor] = {}
    for key, value in loaded.model.state_dict().items():
        module = key.rsplit(".", 1)[0]
        if module in linears and key.endswith(".weight"):
            continue
        tensors[key] = value.detach().contiguous().cpu()
    planned_bytes = 0
    for name, q in stored.items():
        codes = q.codes.to(torch.int8).cpu()
        scale = q.params["scale"].reshape(q.shape[0], -1).to(torch.float16).cpu()
        tensors[f"{name}.weight_packed"] = pack_to_int32(codes, q.config.bits).contiguous()
        tensors[f"{name}.weight_scale"] = scale.contiguous()
        tensors[f"{name}.weight_shape"] = torch.tensor(q.shape, dtype=torch.int64)
        planned_bytes += tensors[f"{name}.weight_packed"].numel() * 4 + scale.numel() * 2
    # Shared tensors (a tied LM head) are written once, as transformers does.
    tied = [key for key in tensors if key.endswith("lm_head.weight")]
    if tied and getattr(loaded.model.config, "tie_word_embeddings", False):
        for key in tied:
            del tensors[key]

    config = loaded.model.config.to_dict()
    config.pop("quantization_config", None)
    config["quantization_config"] = {
        "quant_method": "compressed-tensors", "format": "pack-quantized", "quantization_status": "compressed",
        "config_groups": {f"group_{index}": {"targets": sorted(names), "weights": _weights_args(bits, group),
                                             "input_activations": None, "output_activations": None,
                                             "format": "pack-quantized"}
                          for index, ((bits, group), names) in enumerate(sorted(groups.items(),
                                                                               key=lambda item: str(item[0])))},
        "ignore": [], "kv_cache_scheme": None, "sparsity_config": {}, "transform_config": {},
        "global_compression_ratio": None, "version": compressed_tensors.__version__,
    }
    out = Path(out)
    with atomic_folder(out) as scratch:
        save_file(tensors, str(scratch / "model.safetensors"), metadata={"format": "pt"})
        (scratch / "config.json").write_text(json.dumps(config, indent=2) + "\n", encoding="utf-8")
        loaded.tokenizer.save_pretrained(scratch)
    return {"path": str(out), "file_bytes": sum(p.stat().st_size for p in out.iterdir()),
            "planned_tensor_bytes": planned_bytes, "config_groups": len(groups)}


@register_exporter("compressed-tensors", folder=True, check_targets=check_plan_representable,
                   description="packed int codes and fp16 scales per module (llm-compressor's pack-quantized), which "
                               "transformers and vLLM load")
def write_compressed_tensors(job: ExportJob) -> dict:
    return export_compressed_tensors(job.loaded, job.stored, job.out)
