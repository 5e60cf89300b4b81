"""Where a Hugging Face module lives in a GGUF file: llama.cpp's architecture name and tensor names.

Both the GGUF export and the importance matrix (whose entries are keyed by GGUF tensor name) need
this map; it is gguf-py's own (`gguf.get_tensor_name_map`), the one llama.cpp's converter uses.
"""
from __future__ import annotations

from pathlib import Path

from layerwise.errors import LayerwiseError
from layerwise.models.adapters import merged_expert_path
from layerwise.models.integrity import check_gguf
from layerwise.models.loading import LoadedModel

# transformers' model_type -> llama.cpp's architecture, where the two names differ
# (convert_hf_to_gguf.py writes these HF families under these GGUF architectures).
_ARCH_OF_MODEL_TYPE = {"mistral": "llama", "gpt_neox": "gptneox", "phi": "phi2", "mixtral": "llama",
                       "qwen2_moe": "qwen2moe", "qwen3_moe": "qwen3moe", "qwen3_next": "qwen3next",
                       "gpt_oss": "gpt-oss", "deepseek_v3": "deepseek2", "falcon_h1": "falcon-h1"}


def gguf_architecture(loaded: LoadedModel) -> str:
    """The GGUF architecture of the model: the file's own for a GGUF source, else llama.cpp's name
    for the transformers model type."""
    import gguf

    source = loaded.source
    if source.kind == "gguf" and source.gguf_file:
        return check_gguf(Path(source.location) / source.gguf_file)["architecture"]
    arch = _ARCH_OF_MODEL_TYPE.get(loaded.model_type, loaded.model_type)
    if arch not in gguf.MODEL_ARCH_NAMES.values():
        raise LayerwiseError(f"gguf-py knows no GGUF architecture for model type {loaded.model_type!r}")
    return arch


def gguf_tensor_names(loaded: LoadedModel, modules: list[str], arch: str | None = None,
                      strict: bool = True) -> dict[str, str]:
    """HF module name -> GGUF tensor name (with ".weight"), by gguf-py's own name map. The routed
    experts of a block share one tensor per projection (`blk.N.ffn_gate_exps`, expert-major), so
    all of them map to it; `expert_of` says which slice is whose. With strict=False a module the
    map does not name is left out instead of refused."""
    import gguf

    arch = arch or gguf_architecture(loaded)
    try:
        arch_enum = next(a for a, name in gguf.MODEL_ARCH_NAMES.items() if name == arch)
    except StopIteration:
        raise LayerwiseError(f"gguf-py does not know the architecture {arch!r}") from None
    name_map = gguf.get_tensor_name_map(arch_enum, loaded.n_blocks)
    names = {}
    for module in modules:
        mapped = name_map.get_name(merged_expert_path(module))
        if mapped is None:
            if not strict:
                continue
            raise LayerwiseError(f"no GGUF tensor name for {module} in architecture {arch!r}")
        names[module] = f"{mapped}.weight"
    return names


def gguf_tensor_parts(loaded: LoadedModel, modules: list[str], arch: str | None = None) -> dict[str, tuple[str, ...]]:
    """HF module name -> the GGUF tensors holding it: the one gguf-py's map names, or the pieces
    llama.cpp's converter splits it into by rows (the adapter's `gguf_splits`; each piece reads the
    module's whole input, so an importance matrix row serves them all)."""
    prefix = loaded.adapter.blocks + "."
    parts: dict[str, tuple[str, ...]] = {}
    for module in modules:
        block, _, path = module.removeprefix(prefix).partition(".")
        if module.startswith(prefix) and path in loaded.adapter.gguf_splits:
            parts[module] = tuple(f"blk.{block}.{piece}.weight" for piece in loaded.adapter.gguf_splits[path])
    names = gguf_tensor_names(loaded, [module for module in modules if module not in parts], arch)
    return {module: parts.get(module) or (names[module],) for module in modules}
