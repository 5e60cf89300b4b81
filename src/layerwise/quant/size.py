"""Counting every bit: block linears (codes + scales + zero points + metadata) beside the rest."""
from __future__ import annotations

import math
from typing import Collection

from torch import nn

from layerwise.errors import LayerwiseError
from layerwise.models.layout import block_linears, linear_weight
from layerwise.models.loading import LoadedModel
from layerwise.quant.config import QuantConfig
from layerwise.quant.qtensor import QTensor, storage_bits

# Tensors left unquantized are counted at 16 bits: the size of the usual fp16/bf16 checkpoint,
# whatever dtype the model happens to be evaluated in.
FLOAT_BITS = 16


def size_report(loaded: LoadedModel, quantized: dict[str, QTensor] | dict[str, QuantConfig],
                dropped: Collection[str] = ()) -> dict:
    """Bits per weight of the block linears, bytes of everything else, and total bytes.

    `quantized` maps module names to their stored form (after quantize_) or to their configs
    (before: the sizes are the same, so a plan can be sized without quantizing); `dropped`
    modules (weights and biases) cost nothing, since a pruned model does not store them. Tied tensors
    (an LM head sharing the embedding matrix) are counted once.
    """
    model: nn.Module = loaded.model
    linear_names = {name for _, name, _ in block_linears(model, loaded.adapter)}

    # A tied LM head shares the embedding's tensor: quantizing either quantizes both.
    owners: dict[int, list[str]] = {}
    for module_name, module in model.named_modules():
        if isinstance(getattr(module, "weight", None), nn.Parameter):
            owners.setdefault(id(module.weight), []).append(module_name)

    dropped = set(dropped)

    def bits_of(module_name: str, kind: str, parameter) -> int:
        if module_name in dropped:
            return 0
        names = owners.get(id(parameter), [module_name]) if kind == "weight" else []
        entry = next((quantized[n] for n in names if n in quantized), None)
        module_name = next((n for n in names if n in quantized), module_name)
        if isinstance(entry, QTensor):
            return entry.n_bits
        if isinstance(entry, QuantConfig):
            try:
                return storage_bits(entry, tuple(linear_weight(model.get_submodule(module_name)).shape))
            except LayerwiseError as error:  # say which module, as a plan names many
                if module_name in str(error):
                    raise
                raise LayerwiseError(f"{module_name}: {error}") from None
        return FLOAT_BITS * parameter.numel()

    linear_bits = linear_weights = other_bits = 0
    parts: dict[str, int] = {"embeddings_and_head": 0, "norms_and_biases": 0}
    for name, parameter in model.named_parameters(remove_duplicate=True):
        module_name, kind = name.rsplit(".", 1)
        bits = bits_of(module_name, kind, parameter)
        if module_name in linear_names and kind == "weight":
            linear_bits += bits
            linear_weights += parameter.numel()
        else:
            other_bits += bits
            key = "embeddings_and_head" if module_name in (loaded.adapter.embed, loaded.adapter.lm_head) \
                else "norms_and_biases"
            parts[key] += bits
    return {
        "linear_weights": linear_weights,
        "linear_bits_per_weight": linear_bits / linear_weights if linear_weights else math.nan,
        "linear_bytes": math.ceil(linear_bits / 8),
        "embeddings_and_head_bytes": math.ceil(parts["embeddings_and_head"] / 8),
        "norms_and_biases_bytes": math.ceil(parts["norms_and_biases"] / 8),
        "total_bytes": math.ceil((linear_bits + other_bits) / 8),
        "float16_total_bytes": sum(FLOAT_BITS * p.numel() for p in model.parameters()) // 8,
    }
