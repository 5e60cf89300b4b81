"""Writing a model as a plain Hugging Face folder that `AutoModelForCausalLM.from_pretrained` loads."""
from __future__ import annotations

import copy
from pathlib import Path

from layerwise.models.experts import fused_experts
from layerwise.models.loading import LoadedModel
from layerwise.util.files import atomic_folder


def save_plain(loaded: LoadedModel, folder: str | Path, extra_files: dict[str, str] | None = None) -> Path:
    """Config, safetensors weights and tokenizer, written to a temporary folder beside `folder` and
    renamed onto it only when complete; an older folder at that path is replaced only then.

    A model read from a GGUF file carries a `quantization_config` naming its origin, which other
    loaders (and transformers itself, on reload) treat as a request to dequantize: it is dropped,
    since the weights are written as plain floats.
    """
    from transformers import AutoModelForCausalLM

    folder = Path(folder)
    folder.parent.mkdir(parents=True, exist_ok=True)
    config = copy.deepcopy(loaded.model.config)
    if getattr(config, "quantization_config", None) is not None:
        del config.quantization_config
    model = loaded.model
    with atomic_folder(folder) as scratch, fused_experts(loaded.model, loaded.adapter):
        if getattr(loaded.model.config, "quantization_config", None) is not None:
            model = AutoModelForCausalLM.from_config(config, dtype=next(loaded.model.parameters()).dtype)
            model.load_state_dict(loaded.model.state_dict())
        model.save_pretrained(scratch)
        loaded.tokenizer.save_pretrained(scratch)
        for name, text in (extra_files or {}).items():
            (scratch / name).write_text(text, encoding="utf-8")
    return folder
