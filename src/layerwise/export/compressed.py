"""A packed Hugging Face checkpoint in compressed-tensors' "pack-quantized" format, with bits and
group size per module: what llm-compressor writes and vLLM and transformers load.

Each quantized linear is stored as `weight_packed` (its integer codes, packed densely into int32
by compressed-tensors' own packer), `weight_scale` (fp16, one per group: the values our
quantizer chose, so nothing is re-rounded) and `weight_shape`. `quantization_config` in
config.json has one config group per (bits, group size), targeting its modules by name.
Everything else keeps the model's dtype. compressed-tensors is an optional dependency
(`pip install layerwise[serve]`); only this export needs it.

Tensors are stored under the names the family's own checkpoints use (transformers' conversion
mapping reverted, as `save_pretrained` does), so routed experts are stored one matrix per expert
and projection, as in the published checkpoints (Mixtral's `block_sparse_moe.experts.<e>.w1`),
which transformers reads back into its fused experts. Families whose checkpoints keep experts
fused (gpt-oss) are refused.
"""
from __future__ import annotations

import json
import re
from collections import defaultdict
from pathlib import Path

import torch

from layerwise.errors import LayerwiseError
from layerwise.export.registry import ExportJob, register_exporter
from layerwise.models.adapters import expert_of
from layerwise.models.layout import block_linears
from layerwise.models.loading import LoadedModel
from layerwise.models.saving import spill_checkpoint_tensors
from layerwise.quant.qtensor import QTensor
from layerwise.util.files import atomic_folder
from layerwise.util.tensor_files import TensorSpill


def check_plan_representable(targets: dict) -> None:
    """Before any quantization work: every module's config (name -> QuantConfig) must be one
    pack-quantized stores, and the routed experts must share one."""
    for name, config in targets.items():
        _check_config(name, config)
    expert_configs = {config.label for name, config in targets.items() if expert_of(name) >= 0}
    if len(expert_configs) > 1:
        # transformers (5.x) reads every routed expert of a checkpoint with one config group, and
        # vLLM's fused MoE kernels run one scheme per layer.
        raise LayerwiseError(f"compressed-tensors loaders read all routed experts with one scheme, but this plan "
                             f"gives them {', '.join(sorted(expert_configs))}; plan the experts with one option (or "
                             "export --format gguf or hf)")


def checkpoint_names(loaded: LoadedModel, modules: list[str]) -> dict[str, str]:
    """In-memory linear -> the module name its weight has in this family's checkpoints. Found by
    reverting transformers' conversion mapping on stand-in tensors: a plain linear's one weight,
    and per block of experts a fused stand-in whose values say which expert and projection each
    reverted piece came from."""
    from transformers.core_model_loading import revert_weight_conversion

    model, adapter = loaded.model, loaded.adapter
    names = {}
    plain = [m for m in modules if expert_of(m) < 0]
    # One stand-in per linear, its value its position in `plain`.
    reverted = revert_weight_conversion(model, {f"{m}.weight": torch.tensor([float(i)]) for i, m in enumerate(plain)})
    for key, value in reverted.items():
        if value.numel() != 1 or not key.endswith(".weight"):
            raise LayerwiseError(f"{key}: its checkpoint splits or merges this weight; pack-quantized cannot store it")
        names[plain[int(value.item())]] = key.removesuffix(".weight")
    blocks = sorted({m.removeprefix(adapter.blocks + ".").split(".", 1)[0] for m in modules if expert_of(m) >= 0})
    for block in blocks:
        prefix = f"{adapter.blocks}.{block}.{adapter.experts}"
        count = adapter.n_experts
        # gate_up [experts, 2, 1] holds 2e (gate) and 2e + 1 (up); down [experts, 1, 1] holds
        # `count` * 2 + e: a one-column stand-in for transformers' fused layout.
        stand_in = {f"{prefix}.gate_up_proj": torch.arange(2 * count, dtype=torch.float64).reshape(count, 2, 1),
                    f"{prefix}.down_proj": torch.arange(2 * count, 3 * count, dtype=torch.float64).reshape(count, 1, 1)}
        for key, value in revert_weight_conversion(model, stand_in).items():
            code = int(value.flatten()[0])
            if value.numel() != 1 or not key.endswith(".weight"):
                raise LayerwiseError(f"{loaded.model_type} checkpoints keep the routed experts fused ({key}); "
                                     "pack-quantized stores one matrix per linear: export --format gguf or hf")
            expert, projection = ((code // 2, ("gate_proj", "up_proj")[code % 2]) if code < 2 * count
                                  else (code - 2 * count, "down_proj"))
            names[f"{prefix}.{expert}.{projection}"] = key.removesuffix(".weight")
    missing = [m for m in modules if m not in names]
    if missing:
        raise LayerwiseError(f"{missing[0]}: no checkpoint name found for it")
    return names


def _check_config(name: str, config) -> None:
    if config.format != "int" or not config.symmetric:
        raise LayerwiseError(f"{name}: {config.label} has no compressed-tensors pack-quantized form; this export "
                             "takes symmetric integer formats (int2..int8, groups or per row), e.g. int4g64")
    if config.algorithm == "awq":
        raise LayerwiseError(f"{name}: AWQ's per-channel input scales have no place in pack-quantized; export "
                             "GPTQ or round-to-nearest plans")


def _check_representable(name: str, config, shape: tuple[int, ...], channel_scaled: bool) -> None:
    _check_config(name, config)
    if channel_scaled:
        raise LayerwiseError(f"{name}: AWQ's per-channel input scales have no place in pack-quantized; export "
                             "GPTQ or round-to-nearest plans")
    if config.group_size is not None and shape[1] % config.group_size:
        raise LayerwiseError(f"{name}: groups of {config.group_size} leave a shorter last group over "
                             f"{shape[1]} columns, which compressed-tensors does not store")


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
    outside = sorted(set(stored) - {name for _, name, _ in block_linears(loaded.model, loaded.adapter)})
    if outside:
        raise LayerwiseError(f"{outside[0]}: pack-quantized covers the block linears only; keep embeddings, "
                             "the LM head and routers unquantized in the plan")
    # What the checks need of each module, taken in one pass: streamed, every pass over `stored`
    # decodes each module from disk, and the packing below is the only other one.
    described = {name: (q.config, tuple(q.shape), q.channel_scale is not None) for name, q in stored.items()}
    check_plan_representable({name: config for name, (config, _, _) in described.items()})
    # Routed experts get a group of their own, named by "re:" targets that mention "experts": how
    # transformers finds the group to read the experts with.
    groups: dict[tuple[int, int | None, bool], list[str]] = defaultdict(list)
    for name, (config, shape, channel_scaled) in described.items():
        _check_representable(name, config, shape, channel_scaled)
        groups[(config.bits, config.group_size, expert_of(name) >= 0)].append(name)

    names = checkpoint_names(loaded, list(stored))
    stored_as = {names[name] for name in stored}
    # Every tensor goes to a scratch file as it is made and the file is copied into place at the
    # end: neither the unquantized tensors nor the packed codes are all in memory at once.
    tensors = TensorSpill(directory=Path(out).resolve().parent)
    planned_bytes = 0
    try:
        # The unquantized tensors (a tied head written once, as transformers does); the packed
        # modules' weights come below.
        spill_checkpoint_tensors(tensors, loaded,
                                 skip=lambda key: key.endswith(".weight") and key.rsplit(".", 1)[0] in stored_as)
        for name in stored:
            q = stored[name]
            codes = q.codes.to(torch.int8).cpu()
            scale = q.params["scale"].reshape(q.shape[0], -1).to(torch.float16).cpu()
            target = names[name]
            packed = pack_to_int32(codes, q.config.bits).contiguous()
            tensors.add(f"{target}.weight_packed", packed)
            tensors.add(f"{target}.weight_scale", scale.contiguous())
            tensors.add(f"{target}.weight_shape", torch.tensor(q.shape, dtype=torch.int64))
            planned_bytes += packed.numel() * 4 + scale.numel() * 2
            del q, codes, packed
        config = _quantized_config(loaded, names, groups, compressed_tensors.__version__)
        out = Path(out)
        with atomic_folder(out) as scratch:
            tensors.write_safetensors(scratch / "model.safetensors", metadata={"format": "pt"})
            (scratch / "config.json").write_text(json.dumps(config, indent=2) + "\n", encoding="utf-8")
            loaded.tokenizer.save_pretrained(scratch)
    finally:
        tensors.close()
    return {"path": str(out), "file_bytes": sum(p.stat().st_size for p in out.iterdir()),
            "planned_tensor_bytes": planned_bytes, "config_groups": len(groups)}


def _quantized_config(loaded: LoadedModel, names: dict[str, str], groups: dict[tuple[int, int | None, bool], list[str]],
                      version: str) -> dict:
    """config.json with its quantization_config: a config group per (bits, group size, experts)."""
    config = loaded.model.config.to_dict()
    config.pop("quantization_config", None)
    config["quantization_config"] = {
        "quant_method": "compressed-tensors", "format": "pack-quantized", "quantization_status": "compressed",
        "config_groups": {f"group_{index}": {"targets": sorted(f"re:^{re.escape(names[m])}$" if experts else names[m]
                                                                for m in members),
                                             "weights": _weights_args(bits, group),
                                             "input_activations": None, "output_activations": None,
                                             "format": "pack-quantized"}
                          for index, ((bits, group, experts), members) in enumerate(sorted(groups.items(),
                                                                               key=lambda item: str(item[0])))},
        "ignore": [], "kv_cache_scheme": None, "sparsity_config": {}, "transform_config": {},
        "global_compression_ratio": None, "version": version,
    }
    return config


@register_exporter("compressed-tensors", folder=True, streams=True, check_targets=check_plan_representable,
                   description="packed int codes and fp16 scales per module (llm-compressor's pack-quantized), which "
                               "transformers and vLLM load")
def write_compressed_tensors(job: ExportJob) -> dict:
    return export_compressed_tensors(job.loaded, job.stored, job.out)
