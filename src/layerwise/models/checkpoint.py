"""Reading a checkpoint's tensors a few at a time: the model's skeleton on the meta device, the
safetensors or GGUF tensors under the model's own parameter names, and a whole model read into
memory that way.

transformers' `from_pretrained` maps the checkpoint's files whole and converts every tensor while
the mapped pages are still resident, so loading a float16 folder as float32 peaks at the model
plus half its size again; read a part at a time, a float32 model costs its own size and one
piece (`read_model`). Checkpoints that need transformers' own conversions (renamed or fused
tensors, quantized checkpoints, persistent buffers) are left to it.
"""
from __future__ import annotations

import contextlib
import json
import math
import mmap
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import torch
from torch import nn

from layerwise.errors import LayerwiseError
from layerwise.models.integrity import check_finite, check_gguf

# Elements read and converted at once: a float16 embedding of 28M entries read as float32 would
# otherwise also hold its float16 copy and the file's mapped pages (170 MB more, for SmolLM2).
_READ_ELEMENTS = 1 << 22


class SafetensorsTensors:
    """Tensors of a folder of .safetensors files, read a few at a time, each file closed after."""

    def __init__(self, folder: Path, rename: Callable[[str], str] | None = None) -> None:
        from safetensors import safe_open

        index = folder / "model.safetensors.index.json"
        if index.is_file():
            weight_map = json.loads(index.read_text())["weight_map"]
            self.files = {name: folder / file for name, file in weight_map.items()}
        else:
            self.files = {}
            for file in sorted(folder.glob("*.safetensors")):
                with safe_open(file, framework="pt") as handle:
                    self.files.update({name: file for name in handle.keys()})
        if not self.files:
            raise LayerwiseError(f"streaming reads .safetensors or .gguf weights, and {folder} has neither")
        # Names as the model spells them -> as the file does (legacy names transformers renames).
        self.stored_as = {}
        if rename is not None:
            for stored in list(self.files):
                name = rename(stored)
                if name != stored:
                    self.stored_as[name] = stored
                    self.files[name] = self.files.pop(stored)

    def names(self) -> set[str]:
        return set(self.files)

    def elements(self) -> int:
        """Entries of all the tensors, from the files' headers (no tensor is read)."""
        from safetensors import safe_open

        by_file: dict[Path, list[str]] = {}
        for name, file in self.files.items():
            by_file.setdefault(file, []).append(self.stored_as.get(name, name))
        total = 0
        for file, names in by_file.items():
            with safe_open(file, framework="pt") as handle:
                total += sum(math.prod(handle.get_slice(name).get_shape()) for name in names)
        return total

    def read(self, names: list[str], dtypes: dict[str, torch.dtype]) -> dict[str, torch.Tensor]:
        """Each tensor in its dtype from `dtypes`. Large ones are read a few million entries at a
        time into the converted tensor, the file reopened for each piece (closing it unmaps the
        pages read), so a piece is all that exists twice."""
        from safetensors import safe_open

        tensors = {}
        for name in names:
            file = self.files[name]
            stored = self.stored_as.get(name, name)
            with safe_open(file, framework="pt") as handle:
                whole = handle.get_slice(stored)
                shape = whole.get_shape()
                row = math.prod(shape[1:])
                if len(shape) < 2 or shape[0] * row <= _READ_ELEMENTS:
                    tensors[name] = handle.get_tensor(stored).to(dtypes[name])
                    continue
            values = torch.empty(shape, dtype=dtypes[name])
            step = max(1, _READ_ELEMENTS // row)
            for start in range(0, shape[0], step):
                with safe_open(file, framework="pt") as handle:
                    values[start:start + step] = handle.get_slice(stored)[start:start + step]
            tensors[name] = values
        return tensors

    def read_rows(self, name: str, rows: list[int]) -> torch.Tensor:
        """Rows `rows` (sorted) of a 2-D tensor, each contiguous run read as one slice."""
        from safetensors import safe_open

        runs = _runs(rows)
        with safe_open(self.files[name], framework="pt") as handle:
            whole = handle.get_slice(self.stored_as.get(name, name))
            if len(runs) == 1:  # a head slice: no second copy to join
                return whole[runs[0][0]:runs[0][1]]
            return torch.cat([whole[start:stop] for start, stop in runs])


@dataclass(frozen=True)
class _GGUFTensor:
    """A GGUF tensor's name, type and data (a view of the mapped file), as gguf-py's reader gives them."""
    name: str
    tensor_type: Any  # gguf.GGMLQuantizationType
    data: Any  # numpy: floats in the tensor's shape, or a quantized type's bytes per row


def gguf_tensor_views(path: Path, data: Any) -> dict[str, _GGUFTensor]:
    """Every tensor of the GGUF at `path` over `data` (the file mapped as uint8), laid out as
    gguf-py's reader lays them out (its reader is not used: it parses every metadata array into
    objects, 160 MB for SmolLM2's vocabulary, for the whole of a streamed run)."""
    import gguf
    import numpy as np
    from gguf.quants import quant_shape_to_byte_shape

    types = gguf.GGMLQuantizationType
    # Types stored as plain numbers, viewed as such (gguf-py's reader does the same); the rest are
    # a quantized type's bytes per row.
    plain = {types.F16: np.float16, types.F32: np.float32, types.F64: np.float64, types.I8: np.int8,
             types.I16: np.int16, types.I32: np.int32, types.I64: np.int64}
    views = {}
    for name, info in check_gguf(path)["tensor_table"].items():
        tensor_type = types(info.tensor_type)
        shape = tuple(reversed(info.dims))
        raw = data[info.offset:info.offset + info.nbytes]
        if tensor_type in plain:
            values = raw.view(plain[tensor_type]).reshape(shape)
        else:
            values = raw.reshape(quant_shape_to_byte_shape(shape, tensor_type))
        views[name] = _GGUFTensor(name, tensor_type, values)
    return views


class GGUFTensors:
    """Tensors of a GGUF file under their Hugging Face names, dequantized one at a time as
    transformers' GGUF loader does (the same per-tensor conversion, e.g. llama's q/k un-permute)."""

    def __init__(self, path: Path, skeleton: nn.Module, config: Any) -> None:
        import gguf
        import numpy as np
        from transformers.modeling_gguf_pytorch_utils import TENSOR_PROCESSORS, TensorProcessor

        architecture = check_gguf(path)["architecture"]
        self.data = np.memmap(path, dtype=np.uint8, mode="r")
        self.processor = TENSOR_PROCESSORS.get(architecture, TensorProcessor)(config=config.to_dict())
        # transformers' get_gguf_hf_weights_map, once for the whole model (it rebuilds gguf-py's
        # name map for every submodule: seconds per load), with the file's own architecture.
        arch = next((key for key, value in gguf.MODEL_ARCH_NAMES.items() if value == architecture), None)
        if arch is None:
            raise LayerwiseError(f"gguf-py does not know the GGUF architecture {architecture!r}")
        name_map = gguf.get_tensor_name_map(arch, config.num_hidden_layers)
        self.mapping = {}
        for hf_name in skeleton.state_dict():
            stem, dot, suffix = self.processor.preprocess_name(hf_name).rpartition(".")
            gguf_name = name_map.get_name(stem) if suffix in ("weight", "bias") else None
            if gguf_name is not None:
                self.mapping[f"{gguf_name}.{suffix}"] = hf_name
        self.tensors = {self.mapping[name]: tensor for name, tensor in gguf_tensor_views(path, self.data).items()
                        if name in self.mapping}

    def names(self) -> set[str]:
        return set(self.tensors)

    def read(self, names: list[str], dtypes: dict[str, torch.dtype]) -> dict[str, torch.Tensor]:
        import numpy as np
        from gguf.quants import dequantize

        tensors = {}
        for name in names:
            tensor = self.tensors[name]
            values = dequantize(tensor.data, tensor.tensor_type)
            values = self.processor.process(weights=values, name=tensor.name, tensor_key_mapping=self.mapping,
                                            parsed_parameters={}).weights
            # A copy only where the values still view the mapped file (float types, un-permuted views).
            tensors[name] = torch.from_numpy(np.require(values, requirements=["O", "W", "C"])).to(dtypes[name])
            self._let_pages_go()
        return tensors

    def read_rows(self, name: str, rows: list[int]) -> torch.Tensor:
        """Rows `rows` (sorted) of a 2-D tensor: a quantized type's rows are whole blocks, so only
        these are dequantized. (The per-tensor conversions transformers applies leave the
        embedding's rows as they are.)"""
        import numpy as np
        from gguf.quants import dequantize

        tensor = self.tensors[name]
        values = torch.from_numpy(np.copy(dequantize(tensor.data[rows], tensor.tensor_type)))
        self._let_pages_go()
        return values

    def _let_pages_go(self) -> None:
        # The file's pages just read stay mapped into the process (counted in its resident size)
        # until told otherwise; they are the page cache's to keep, not ours.
        with contextlib.suppress(AttributeError, ValueError, OSError):
            self.data._mmap.madvise(mmap.MADV_DONTNEED)


def owner_of(module: nn.Module, name: str) -> tuple[nn.Module, str]:
    """The submodule that holds parameter `name` (relative to `module`) and its attribute name."""
    owner_path, _, attribute = name.rpartition(".")
    return (module.get_submodule(owner_path) if owner_path else module), attribute


def checkpoint_names(model: nn.Module, available: set[str], prefix: str) -> dict[str, str]:
    """Parameter name -> checkpoint tensor name: the same name, the name without or with the base
    model's prefix (checkpoints saved from the bare model), or a tied twin's name."""
    names: dict[str, str] = {}
    by_parameter: dict[int, list[str]] = {}
    for name, parameter in model.named_parameters(remove_duplicate=False):
        by_parameter.setdefault(id(parameter), []).append(name)
    for name, parameter in model.named_parameters(remove_duplicate=False):
        spellings = [name] + [twin for twin in by_parameter[id(parameter)] if twin != name]
        candidates = [variant for spelling in spellings for variant in
                      ([spelling, spelling.removeprefix(prefix + "."), f"{prefix}.{spelling}"]
                       if prefix else [spelling])]
        found = next((c for c in candidates if c in available), None)
        if found is None:
            raise LayerwiseError(f"the checkpoint has no tensor for {name}; it cannot be read a part at a time "
                                 "(--streaming)")
        names[name] = found
    return names


def _runs(rows: list[int]) -> list[tuple[int, int]]:
    """Sorted row indices as [start, stop) runs of consecutive rows."""
    runs: list[list[int]] = []
    for row in rows:
        if runs and runs[-1][1] == row:
            runs[-1][1] = row + 1
        else:
            runs.append([row, row + 1])
    return [(start, stop) for start, stop in runs]


def skeleton(config: Any, dtype: torch.dtype, trust_remote_code: bool = False) -> nn.Module:
    """The model `config` describes with every parameter on the meta device (buffers such as
    rotary frequencies computed for real), tied as `from_pretrained` ties them, in eval mode."""
    from accelerate import init_empty_weights
    from transformers import AutoModelForCausalLM

    with init_empty_weights(include_buffers=False):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype, trust_remote_code=trust_remote_code)
    model.tie_weights()  # from_pretrained ties after loading; a tied head is read as the embedding
    return model.eval()


def open_checkpoint(weights_at: Path, gguf_file: str | None, model: nn.Module,
                    config: Any) -> SafetensorsTensors | GGUFTensors:
    """The tensors of the GGUF `gguf_file` in `weights_at`, or of its safetensors files (under the
    names transformers would give them)."""
    if gguf_file:
        return GGUFTensors(weights_at / gguf_file, model, config)
    return SafetensorsTensors(weights_at, transformers_renaming(model))


def transformers_renaming(model: nn.Module) -> Callable[[str], str] | None:
    """The renaming transformers applies to this model's checkpoint names (legacy names such as
    GPT-NeoX's embed_out for lm_head), or None where its loader also converts values (fused or
    split tensors), which is left to it (the names then do not match and the caller says so)."""
    try:
        from transformers.conversion_mapping import get_model_conversion_mapping
        from transformers.core_model_loading import WeightRenaming, rename_source_key
    except ImportError:  # a transformers without renaming tables
        return None
    transforms = get_model_conversion_mapping(model)
    if any(not isinstance(transform, WeightRenaming) for transform in transforms):
        return None
    return lambda name: rename_source_key(name, transforms, [])[0]


def place(model: nn.Module, name: str, values: torch.Tensor, device: torch.device | str) -> None:
    """Parameter `name` becomes `values` (in its own dtype, on `device`), a new frozen parameter."""
    owner, attribute = owner_of(model, name)
    old = owner._parameters[attribute]
    if tuple(values.shape) != tuple(old.shape):
        raise LayerwiseError(f"{name}: the checkpoint's tensor has shape {tuple(values.shape)}, "
                             f"the model expects {tuple(old.shape)}")
    owner._parameters[attribute] = nn.Parameter(values.to(device=device, dtype=old.dtype), requires_grad=False)


def buffers_to(model: nn.Module, device: torch.device | str) -> None:
    """Every buffer that holds values (not the meta device's placeholders) moved to `device`."""
    for module in model.modules():
        for name, buffer in module._buffers.items():
            if buffer is not None and not buffer.is_meta:
                module._buffers[name] = buffer.to(device)


def read_model(config: Any, folder: Path, dtype: torch.dtype, device: str,
               trust_remote_code: bool = False) -> nn.Module | None:
    """The model of the safetensors folder `folder`, every parameter read a top-level module or
    block at a time straight into its dtype on `device`; None when the checkpoint is one to leave
    to transformers' loader: no safetensors, a quantized checkpoint, custom code, modules kept in
    float32 at a lower dtype, or tensors that do not map one to one onto the model's parameters
    under transformers' renaming (tensors it fuses or splits, persistent buffers)."""
    if _quantized(config) or getattr(config, "auto_map", None) or not any(folder.glob("*.safetensors")):
        return None
    model = skeleton(config, dtype, trust_remote_code)
    if dtype != torch.float32 and (getattr(model, "_keep_in_fp32_modules", None)
                                   or getattr(model, "_keep_in_fp32_modules_strict", None)):
        return None
    rename = transformers_renaming(model)
    if rename is None:
        return None
    source = SafetensorsTensors(folder, rename)
    available = source.names()
    buffers = {name for name, _ in model.named_buffers()}
    prefix = getattr(model, "base_model_prefix", "")
    if any(name in available or f"{prefix}.{name}" in available or name.removeprefix(prefix + ".") in available
           for name in buffers):
        return None
    try:
        names = checkpoint_names(model, available, prefix)
    except LayerwiseError:
        return None
    # Tied parameters are read once (under their first name) and tied again afterwards; a checkpoint
    # that stores them apart (a head unlike the embedding) is one transformers may leave untied.
    stored_as: dict[int, set[str]] = {}
    for name, parameter in model.named_parameters(remove_duplicate=False):
        stored_as.setdefault(id(parameter), set()).add(names[name])
    if any(len(keys) > 1 for keys in stored_as.values()):
        return None
    unique = [name for name, _ in model.named_parameters()]
    for group in _groups(unique):
        tensors = source.read(sorted({names[name] for name in group}),
                              {names[name]: model.get_parameter(name).dtype for name in group})
        for name in group:
            try:
                place(model, name, tensors[names[name]], device)
            except LayerwiseError:
                return None
    model.tie_weights()
    buffers_to(model, device)
    check_finite(model, str(folder))
    _generation_config(model, folder)
    return model


def _quantized(config: Any) -> bool:
    """Whether the checkpoint's tensors are in a quantized form transformers decodes. A folder
    saved from a model loaded out of a GGUF keeps a "gguf" note whose tensors are plain."""
    quantization = getattr(config, "quantization_config", None)
    if quantization is None:
        return False
    method = quantization.get("quant_method") if isinstance(quantization, dict) else getattr(quantization, "quant_method", None)
    return str(method) != "gguf"


def _groups(names: list[str]) -> list[list[str]]:
    """Parameter names grouped by the module a streamed model would load as one part: each
    numbered block ("model.layers.3"), else the first two levels of the name ("model.norm")."""
    groups: dict[str, list[str]] = {}
    for name in names:
        parts = name.split(".")
        cut = next((i + 1 for i, part in enumerate(parts[:-1]) if part.isdigit()), min(2, len(parts) - 1))
        groups.setdefault(".".join(parts[:cut]), []).append(name)
    return list(groups.values())


def _generation_config(model: nn.Module, folder: Path) -> None:
    """The folder's generation settings, as `from_pretrained` would give the model."""
    if not (folder / "generation_config.json").is_file():
        return
    from transformers import GenerationConfig

    with contextlib.suppress(Exception):  # not needed for anything layerwise does
        model.generation_config = GenerationConfig.from_pretrained(folder)
