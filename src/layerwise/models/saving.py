"""Writing a model as a plain Hugging Face folder that `AutoModelForCausalLM.from_pretrained`
loads, and the model's tensors under its checkpoint names, a part at a time, for that folder and
the exports that store some tensors otherwise.

The tensors go to a scratch file as they are taken and are copied into one safetensors file at
the end, so neither a model streamed from disk nor one in memory is ever copied whole (transformers'
`save_pretrained` builds the whole state dict, reverted to checkpoint names, first).
"""
from __future__ import annotations

import contextlib
import copy
import itertools
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator

import torch

from layerwise.models.experts import fused_experts
from layerwise.models.loading import LoadedModel
from layerwise.models.streaming import head_rows, head_step, held
from layerwise.util.files import atomic_folder
from layerwise.util.tensor_files import TensorSpill


@dataclass(frozen=True)
class Rows:
    """A streamed tensor given a slice of rows at a time (the embedding, the head): never whole."""
    dtype: torch.dtype
    shape: tuple[int, ...]
    pieces: Callable[[], Iterator[torch.Tensor]]


def head_is_tied_in_config(loaded: LoadedModel) -> bool:
    """Whether the checkpoint stores the head as the embedding (written once, as transformers does)."""
    return bool(getattr(loaded.model.config, "tie_word_embeddings", False))


def checkpoint_tensors(loaded: LoadedModel, tied: bool) -> Iterator[tuple[str, torch.Tensor | Rows]]:
    """(checkpoint name, tensor) of every tensor of the model as it now is (quantized weights
    dequantized), in its state dict's order, a tied head left out. Streamed, a part is held, its
    overrides (quantized weights, a dropped unit's silenced projection) applied, while its tensors
    are taken, then let go; the embedding and an untied head, as the checkpoint has them, come a
    slice of rows at a time."""
    from transformers.core_model_loading import revert_weight_conversion

    model, streamed, adapter = loaded.model, loaded.streamed, loaded.adapter
    head = f"{adapter.lm_head}.weight"
    if streamed is None:
        with fused_experts(model, adapter):
            state = model.state_dict()
            yield from revert_weight_conversion(model, {key: value for key, value in state.items()
                                                        if not (tied and key == head)}).items()
        return

    def part_of(key: str) -> str | None:
        return streamed.part_of(key.rsplit(".", 1)[0])

    for part, group in itertools.groupby(model.state_dict(keep_vars=True), key=part_of):
        keys = [key for key in group if not (tied and key == head)]
        if not keys:
            continue
        if _in_rows(loaded, part, keys):
            (key,) = keys
            placeholder = model.get_parameter(key)
            (name,) = revert_weight_conversion(model, {key: torch.zeros(1)})  # its name in the checkpoint
            rows, dtype, step = placeholder.shape[0], placeholder.dtype, head_step(placeholder.shape[1])
            yield name, Rows(dtype, tuple(placeholder.shape), lambda part=part, rows=rows, dtype=dtype, step=step: (
                head_rows(streamed, part, start, min(rows, start + step), dtype) for start in range(0, rows, step)))
            continue
        with held(streamed, part) if part is not None else contextlib.nullcontext():
            current = model.state_dict(keep_vars=True) if part is None else \
                streamed.parts[part].state_dict(prefix=f"{part}.", keep_vars=True)
            yield from revert_weight_conversion(model, {key: current[key].detach() for key in keys}).items()


def _in_rows(loaded: LoadedModel, part: str | None, keys: list[str]) -> bool:
    """Whether a streamed part is the embedding or a head whose one weight the checkpoint gives
    row by row as the model holds it (no override; the head: where a streamed head is sliced)."""
    streamed = loaded.streamed
    if part not in (loaded.adapter.embed, loaded.adapter.lm_head) or keys != [f"{part}.weight"]:
        return False
    if streamed.checkpoint_names[keys[0]] in streamed.overrides:
        return False
    return part == loaded.adapter.embed or part in streamed.sliced


def spill_checkpoint_tensors(tensors: TensorSpill, loaded: LoadedModel,
                             skip: Callable[[str], bool] = lambda key: False) -> None:
    """Every tensor of `checkpoint_tensors` whose name `skip` does not refuse, into `tensors`."""
    for key, value in checkpoint_tensors(loaded, head_is_tied_in_config(loaded)):
        if skip(key):
            continue
        if isinstance(value, Rows):
            tensors.add_rows(key, value.dtype, value.shape, (piece.cpu() for piece in value.pieces()))
        else:
            tensors.add(key, value.detach().contiguous().cpu())


def save_plain(loaded: LoadedModel, folder: str | Path, extra_files: dict[str, str] | None = None) -> Path:
    """Config, safetensors weights and tokenizer, written to a temporary folder beside `folder` and
    renamed onto it only when complete; an older folder at that path is replaced only then. Works
    for a model in memory and one streamed from disk alike (a part held at a time).

    A model read from a GGUF file carries a `quantization_config` naming its origin, which other
    loaders (and transformers itself, on reload) treat as a request to dequantize: it is dropped,
    since the weights are written as plain floats.
    """
    folder = Path(folder)
    folder.parent.mkdir(parents=True, exist_ok=True)
    model = loaded.model
    config = copy.deepcopy(model.config)
    if getattr(config, "quantization_config", None) is not None:
        del config.quantization_config
    # What save_pretrained records of the model it writes.
    config.dtype = str(model.dtype).split(".")[1]
    config.architectures = [type(model).__name__]
    tensors = TensorSpill(directory=folder.resolve().parent)
    try:
        spill_checkpoint_tensors(tensors, loaded)
        with atomic_folder(folder) as scratch:
            tensors.write_safetensors(scratch / "model.safetensors", metadata={"format": "pt"})
            config.save_pretrained(scratch)
            if model.can_generate() and model.generation_config is not None:
                model.generation_config.save_pretrained(scratch)
            loaded.tokenizer.save_pretrained(scratch)
            for name, text in (extra_files or {}).items():
                (scratch / name).write_text(text, encoding="utf-8")
    finally:
        tensors.close()
    return folder
