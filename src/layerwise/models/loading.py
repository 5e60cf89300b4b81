"""One entry point that loads a causal LM from a local folder, a GGUF file or a hub id."""
from __future__ import annotations

import functools
import logging
import os
import re
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch
from torch import nn

from layerwise.errors import LayerwiseError
from layerwise.models.adapters import Adapter, get_adapter
from layerwise.models.checkpoint import SafetensorsTensors, read_model
from layerwise.models.experts import split_experts
from layerwise.models.integrity import check_finite, check_gguf, check_weight_files
from layerwise.models.multipliers import fold_multipliers
from layerwise.models.streaming import StreamedWeights, stream_model
from layerwise.util.memory import trim_freed_memory
from layerwise.util.meta import file_fingerprint, files_fingerprint

_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*(/[\w.-]+)?$")
_WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth")
DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


@dataclass(frozen=True)
class ModelSource:
    """Where a model comes from: `kind` is 'folder', 'gguf' or 'hub'."""

    kind: str
    location: str  # the folder, the GGUF's folder, or the hub id
    gguf_file: str | None = None

    @property
    def display(self) -> str:
        return str(Path(self.location) / self.gguf_file) if self.gguf_file else self.location

    def from_pretrained_args(self) -> tuple[str, dict[str, Any]]:
        kwargs: dict[str, Any] = {"gguf_file": self.gguf_file} if self.gguf_file else {}
        return self.location, kwargs

    def fingerprint(self, config: object) -> str:
        if self.kind == "gguf":
            return file_fingerprint(Path(self.location) / self.gguf_file)
        if self.kind == "folder":
            folder = Path(self.location)
            files = [p for p in folder.iterdir() if p.name.endswith(_WEIGHT_SUFFIXES) or p.name == "config.json"]
            return files_fingerprint(files)
        return "hub-commit:" + str(getattr(config, "_commit_hash", None) or "unknown")


@dataclass
class LoadedModel:
    """A model ready for layerwise: eval mode, its tokenizer, and where its parts live."""

    model: nn.Module
    tokenizer: Any
    adapter: Adapter
    source: ModelSource
    fingerprint: str
    # Set when the blocks, embedding and head are read from disk as they run (`load_model(streaming=True)`).
    streamed: StreamedWeights | None = None
    # Reads the tokenizer again after `set_tokenizer_aside` (models loaded from a source).
    tokenizer_loader: Callable[[], Any] | None = field(default=None, repr=False)
    model_type: str = field(init=False)

    def __post_init__(self) -> None:
        self.model_type = self.model.config.model_type
        if self.streamed is None:
            fold_multipliers(self.model, self.adapter.fold)
            split_experts(self.model, self.adapter)

    def set_tokenizer_aside(self) -> None:
        """Free the tokenizer until it is next asked for (read again from the source then): a
        streamed run has tokenized its text before any block runs (SmolLM2's tokenizer holds
        13.5 MiB, 0.026x of its float32 weights). Nothing happens for a model given in memory."""
        if self.tokenizer_loader is not None and "tokenizer" in self.__dict__:
            del self.tokenizer
            trim_freed_memory()

    def __getattr__(self, name: str) -> Any:
        # Reached only for attributes not set: the tokenizer once set aside.
        if name == "tokenizer" and self.__dict__.get("tokenizer_loader") is not None:
            self.tokenizer = self.tokenizer_loader()
            return self.tokenizer
        raise AttributeError(f"{type(self).__name__!r} object has no attribute {name!r}")

    @property
    def input_device(self) -> torch.device:
        """Where token ids must go: the embedding's device (blocks may sit elsewhere with device_map)."""
        if self.streamed is not None:
            return self.streamed.device
        return self.model.get_submodule(self.adapter.embed).weight.device

    @property
    def n_blocks(self) -> int:
        return len(self.model.get_submodule(self.adapter.blocks))

    def describe(self) -> dict:
        return {
            "source": self.source.display,
            "kind": self.source.kind,
            "model_type": self.model_type,
            "fingerprint": self.fingerprint,
            "n_blocks": self.n_blocks,
            "dtype": str(next(self.model.parameters()).dtype).removeprefix("torch."),
        } | ({"streaming": True} if self.streamed is not None else {})

    def require_in_memory(self, what: str) -> None:
        """Refuse work that changes weights outside a part's call, which streaming does not keep."""
        if self.streamed is not None:
            raise LayerwiseError(f"{what} does not run on a streamed model yet; load it without --streaming")


def resolve_source(source: str | os.PathLike, gguf_file: str | None = None) -> ModelSource:
    """Decide what `source` names, without loading anything."""
    path = Path(source)
    if path.is_file():
        if path.suffix.lower() != ".gguf":
            raise LayerwiseError(f"{path} is a file but not a .gguf; pass a model folder, a .gguf file or a hub id")
        return ModelSource("gguf", str(path.parent), path.name)
    if path.is_dir():
        if gguf_file:
            if not (path / gguf_file).is_file():
                raise LayerwiseError(f"GGUF file {gguf_file!r} not found in {path}")
            return ModelSource("gguf", str(path), gguf_file)
        if (path / "config.json").is_file():
            return ModelSource("folder", str(path))
        ggufs = sorted(p.name for p in path.glob("*.gguf"))
        if len(ggufs) == 1:
            return ModelSource("gguf", str(path), ggufs[0])
        if len(ggufs) > 1:
            raise LayerwiseError(f"{path} holds several GGUF files ({', '.join(ggufs)}); pass one of them")
        raise LayerwiseError(f"{path} is not a model folder: it has no config.json and no .gguf file")
    text = str(source)
    looks_local = text.startswith((".", "/", "~")) or text.lower().endswith(".gguf") or text.count("/") > 1
    if looks_local or not _HUB_ID.match(text):
        raise LayerwiseError(f"model path {text} does not exist")
    return ModelSource("hub", text, gguf_file)


def _pick_device(device: str) -> str:
    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise LayerwiseError(f"device {device!r} asked for, but torch sees no CUDA GPU")
    return device


def _pick_dtype(dtype: str, device: str) -> torch.dtype:
    if dtype == "auto":
        return torch.float32 if device == "cpu" else torch.bfloat16
    if dtype not in DTYPES:
        raise LayerwiseError(f"unknown dtype {dtype!r}; choose one of auto, {', '.join(DTYPES)}")
    return DTYPES[dtype]


def _hub_error(source: ModelSource, error: Exception) -> LayerwiseError:
    reason = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
    return LayerwiseError(
        f"could not load {source.location!r} from the Hugging Face hub ({reason}); "
        "check the id and the network, or pass a local folder or .gguf file"
    )


def check_files(source: ModelSource) -> None:
    """Validate local weight files with bounded reads before a third-party loader parses them."""
    if source.kind == "gguf":
        check_gguf(Path(source.location) / source.gguf_file)
    elif source.kind == "folder":
        check_weight_files(source.location)


def load_config(source: ModelSource, trust_remote_code: bool = False) -> Any:
    from transformers import AutoConfig

    check_files(source)
    location, kwargs = source.from_pretrained_args()
    try:
        return AutoConfig.from_pretrained(location, trust_remote_code=trust_remote_code, **kwargs)
    except Exception as error:  # a corrupt file can raise anything inside the parser
        raise _load_error(source, "the model config", error) from error


def _load_error(source: ModelSource, what: str, error: Exception) -> LayerwiseError:
    if source.kind == "hub":
        return _hub_error(source, error)
    lines = [line.strip() for line in str(error).strip().splitlines() if line.strip()]
    return LayerwiseError(f"cannot load {what} from {source.display}: {lines[0] if lines else type(error).__name__}")


def load_tokenizer(source: str | os.PathLike | ModelSource, trust_remote_code: bool = False) -> Any:
    """The tokenizer alone: cheap, so that text can be checked before weights are loaded."""
    from transformers import AutoTokenizer

    resolved = source if isinstance(source, ModelSource) else resolve_source(source)
    check_files(resolved)
    location, kwargs = resolved.from_pretrained_args()
    try:
        tokenizer = AutoTokenizer.from_pretrained(location, trust_remote_code=trust_remote_code, **kwargs)
    except Exception as error:  # a corrupt file can raise anything inside the parser
        raise _load_error(resolved, "the tokenizer", error) from error
    # Parsing tokenizer.json leaves tens of MB of freed Python objects in the heap (SmolLM2: 29 MB).
    trim_freed_memory()
    return tokenizer


def load_model(
    source: str | os.PathLike,
    *,
    dtype: str = "auto",
    device: str = "cpu",
    device_map: str | None = None,
    gguf_file: str | None = None,
    trust_remote_code: bool = False,
    tokenizer: Any = None,
    streaming: bool | None = False,
) -> LoadedModel:
    """Load a causal LM and its tokenizer from a local folder, a .gguf file or a hub id.

    `device_map="auto"` hands placement to accelerate (models that need several GPUs); otherwise
    the whole model goes to `device`. A local safetensors folder is read a block at a time straight
    into `dtype` on `device` (`layerwise.models.checkpoint.read_model`: the model's own size in
    memory, not half as much again), unless it needs transformers' loader, which reads the rest;
    GGUF files go through transformers' GGUF loader, which dequantizes to `dtype`. A tokenizer
    already loaded with `load_tokenizer` can be passed in.
    With `streaming`, only the norms and buffers outside the blocks are loaded now; each block, the
    embedding and the head are read from the safetensors or GGUF file when called and let go after
    (`layerwise.models.streaming`), so memory holds one of them at a time. `streaming=None`
    streams when the weights would not fit (`too_large_to_load`), and says so on stderr.
    """
    from transformers import AutoModelForCausalLM

    resolved = resolve_source(source, gguf_file)
    config = load_config(resolved, trust_remote_code)
    adapter = get_adapter(config.model_type, config)
    device = _pick_device(device)
    torch_dtype = _pick_dtype(dtype, device)
    if tokenizer is None:
        tokenizer = load_tokenizer(resolved, trust_remote_code)
    if streaming is None:
        reason = (None if device_map or adapter.experts or adapter.fold
                  else too_large_to_load(resolved, torch_dtype, device))
        if reason:
            print(f"layerwise: {reason}: streaming it, one block at a time (--streaming)", file=sys.stderr)
        streaming = reason is not None
    if streaming:
        if device_map:
            raise LayerwiseError("--streaming loads one block at a time onto --device; "
                                 "it does not combine with --device-map")
        if adapter.experts or adapter.fold:
            kind = "mixture-of-experts models" if adapter.experts else "models whose multipliers are folded on load"
            raise LayerwiseError(f"--streaming does not support {kind} ({config.model_type}) yet; "
                                 "load the whole model (--device-map auto spreads it over devices)")
        return _load_streaming(resolved, config, adapter, torch_dtype, device, tokenizer, trust_remote_code)
    if resolved.kind == "folder" and not device_map:
        try:
            model = read_model(config, Path(resolved.location), torch_dtype, device, trust_remote_code)
        except LayerwiseError:
            raise
        except Exception as error:  # a corrupt file can raise anything inside the readers
            raise _load_error(resolved, "model weights", error) from error
        if model is not None:
            return LoadedModel(model, tokenizer, adapter, resolved, resolved.fingerprint(config),
                               tokenizer_loader=functools.partial(load_tokenizer, resolved, trust_remote_code))
    location, kwargs = resolved.from_pretrained_args()
    if device_map:
        kwargs["device_map"] = device_map
    try:
        # transformers warns about every GGUF tensor it converts; keep the terminal readable.
        logging.getLogger("transformers").setLevel(logging.ERROR)
        model = AutoModelForCausalLM.from_pretrained(
            location, dtype=torch_dtype, trust_remote_code=trust_remote_code, **kwargs
        )
    except Exception as error:  # a corrupt file can raise anything inside the loader
        raise _load_error(resolved, "model weights", error) from error
    check_finite(model, resolved.display)
    if not device_map:
        model.to(device)
    model.eval()
    return LoadedModel(model, tokenizer, adapter, resolved, resolved.fingerprint(config),
                       tokenizer_loader=functools.partial(load_tokenizer, resolved, trust_remote_code))


# A model is streamed on its own (streaming=None) when its weights would take more than this
# share of the memory free on the device: the rest is the commands' working memory.
AUTO_STREAM_SHARE = 0.8


def too_large_to_load(source: ModelSource, dtype: torch.dtype, device: str) -> str | None:
    """Why the model should be streamed (its weights in `dtype` against the memory free on
    `device`), or None when it fits or its size cannot be told without downloading it."""
    size = weights_bytes(source, dtype)
    if size is None:
        return None
    free = free_memory(device)
    if size <= AUTO_STREAM_SHARE * free:
        return None
    return (f"{source.display} takes {size / 2**30:.1f} GiB as {str(dtype).removeprefix('torch.')}, more than "
            f"{AUTO_STREAM_SHARE:.0%} of the {free / 2**30:.1f} GiB free on {device}")


def weights_bytes(source: ModelSource, dtype: torch.dtype) -> int | None:
    """The checkpoint's tensors' size in `dtype`, from their shapes alone (no weight is read);
    None for a hub id or pickled weights."""
    elements = 0
    if source.kind == "gguf":
        table = check_gguf(Path(source.location) / source.gguf_file)["tensor_table"]
        elements = sum(tensor.elements for tensor in table.values())
    elif source.kind == "folder":
        folder = Path(source.location)
        if not any(folder.glob("*.safetensors")):
            return None
        elements = SafetensorsTensors(folder).elements()  # the shards its index names, if it has one
    else:
        return None
    return elements * torch.finfo(dtype).bits // 8


def free_memory(device: str) -> int:
    """Bytes free on `device`: the GPU's free memory, or the memory the system has available."""
    if device.startswith("cuda"):
        return int(torch.cuda.mem_get_info(torch.device(device))[0])
    import psutil

    return int(psutil.virtual_memory().available)


def _load_streaming(source: ModelSource, config: Any, adapter: Adapter, dtype: torch.dtype, device: str,
                    tokenizer: Any, trust_remote_code: bool) -> LoadedModel:
    folder = Path(source.location)
    if source.kind == "hub":
        from huggingface_hub import snapshot_download

        try:
            folder = Path(snapshot_download(source.location, allow_patterns=["*.json", "*.safetensors"]))
        except Exception as error:  # network, auth, missing repo: all end the same way for a user
            raise _hub_error(source, error) from error
    try:
        model, streamed = stream_model(config, adapter, folder, source.gguf_file, dtype, device, trust_remote_code)
    except LayerwiseError:
        raise
    except Exception as error:  # a corrupt file can raise anything inside the readers
        raise _load_error(source, "model weights", error) from error
    return LoadedModel(model, tokenizer, adapter, source, source.fingerprint(config), streamed=streamed,
                       tokenizer_loader=functools.partial(load_tokenizer, source, trust_remote_code))


def wrap_model(model: nn.Module, tokenizer: Any, name: str = "<in-memory>") -> LoadedModel:
    """Use a model that is already in memory (built from a config, fine-tuned, ...)."""
    adapter = get_adapter(model.config.model_type, model.config)
    model.eval()
    return LoadedModel(model, tokenizer, adapter, ModelSource("memory", name), "in-memory")
