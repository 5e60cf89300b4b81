"""Hugging Face folder -> GGUF by llama.cpp's own converter, `convert_hf_to_gguf.py`.

GGUF export copies metadata and the tokenizer from a GGUF source. For a Hugging Face model that
source is made by the standard conversion route rather than by a converter of our own: tokenizer
conversion (SentencePiece, BPE pre-tokenizer detection, special tokens, chat templates) is what
llama.cpp keeps up to date, and a file it made is one llama.cpp runs. The converter is not on
PyPI as a package; it ships in llama.cpp's sources (also inside the llama-cpp-python sdist),
so the user points us at it: `--converter PATH` or LAYERWISE_CONVERT_HF_TO_GGUF.

The converted file keeps the model's own float type (f32, f16 or bf16), so every tensor the plan
leaves alone is stored exactly as our evaluation used it.
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

from layerwise.errors import LayerwiseError
from layerwise.models.loading import ModelSource

CONVERTER_ENV = "LAYERWISE_CONVERT_HF_TO_GGUF"
CONVERTER_NAME = "convert_hf_to_gguf.py"
# The converter's --outtype that keeps each float type exactly.
_OUTTYPES = {torch.float32: "f32", torch.float16: "f16", torch.bfloat16: "bf16"}

HOW_TO_GET = (
    "llama.cpp's convert_hf_to_gguf.py is needed to turn a Hugging Face model into a GGUF; get llama.cpp's sources "
    "(e.g. `pip download --no-deps --no-binary :all: llama-cpp-python` and unpack it: vendor/llama.cpp) and pass "
    f"--converter PATH/TO/llama.cpp (or set {CONVERTER_ENV}); it also needs `pip install sentencepiece` for "
    "SentencePiece tokenizers"
)


def find_converter(converter: str | os.PathLike | None = None) -> Path:
    """The converter script: `converter` (the script or a llama.cpp folder holding it), else the
    environment variable, else one on PATH."""
    given = converter if converter is not None else os.environ.get(CONVERTER_ENV)
    if given:
        path = Path(given).expanduser()
        if path.is_dir():
            path = path / CONVERTER_NAME
        if not path.is_file():
            raise LayerwiseError(f"converter {given} not found: expected {CONVERTER_NAME} or a llama.cpp folder "
                                 f"holding it ({HOW_TO_GET})")
        return path.resolve()
    on_path = shutil.which(CONVERTER_NAME)
    if on_path:
        return Path(on_path).resolve()
    raise LayerwiseError(f"no GGUF converter found; {HOW_TO_GET}")


def local_folder(source: ModelSource) -> Path:
    """The Hugging Face folder to convert: the folder itself, or the hub snapshot (downloaded by
    huggingface_hub, as transformers does)."""
    if source.kind == "folder":
        return Path(source.location)
    if source.kind == "hub":
        from huggingface_hub import snapshot_download

        try:
            return Path(snapshot_download(source.location, allow_patterns=["*.json", "*.safetensors", "*.model",
                                                                           "*.txt", "*.tiktoken"]))
        except Exception as error:  # network, missing repo, gated model: one line for the user
            raise LayerwiseError(f"could not fetch {source.location} from the hub to convert it: "
                                 f"{type(error).__name__}: {str(error).splitlines()[0] if str(error) else ''}") from None
    raise LayerwiseError(f"{source.display} is already a GGUF; nothing to convert")


def stored_float_type(folder: Path, loaded_dtype: torch.dtype) -> str:
    """The --outtype that holds exactly the values we evaluated: the loaded type when it is a
    16-bit one (float32 weights rounded on loading), else the checkpoint's own type (float32
    loaded from a 16-bit checkpoint holds 16-bit values)."""
    if loaded_dtype in (torch.float16, torch.bfloat16):
        return _OUTTYPES[loaded_dtype]
    if loaded_dtype != torch.float32:
        raise LayerwiseError(f"no GGUF float type for {loaded_dtype}; load the model as float32, float16 or bfloat16")
    try:
        config = json.loads((folder / "config.json").read_text())
    except (OSError, ValueError):
        config = {}
    stored = str(config.get("dtype") or config.get("torch_dtype") or "float32")
    return _OUTTYPES.get(getattr(torch, stored, None), "f32")


def convert_to_gguf(source: ModelSource, out: str | Path, loaded_dtype: torch.dtype,
                    converter: str | os.PathLike | None = None, extra_args: tuple[str, ...] = ()) -> Path:
    """Write `out`, the GGUF llama.cpp's converter makes of `source`, in the float type that keeps
    the weights of a model loaded as `loaded_dtype` exactly (`extra_args`: the family's own
    converter options, from its adapter)."""
    script = find_converter(converter)
    folder = local_folder(source)
    outtype = stored_float_type(folder, loaded_dtype)
    with tempfile.TemporaryDirectory(prefix="layerwise-convert-") as scratch:
        readable = _without_gguf_origin(folder, Path(scratch))
        command = [sys.executable, str(script), str(readable), "--outfile", str(out), "--outtype", outtype, *extra_args]
        done = subprocess.run(command, capture_output=True, text=True)
    if done.returncode != 0 or not Path(out).is_file():
        lines = [line for line in (done.stderr + done.stdout).splitlines() if line.strip()]
        last = lines[-1] if lines else f"exit status {done.returncode}"
        raise LayerwiseError(f"{script.name} could not convert {folder}: {last}")
    return Path(out)


def _without_gguf_origin(folder: Path, scratch: Path) -> Path:
    """`folder`, or a view of it the converter can read. A model that transformers loaded from a
    GGUF and saved again keeps `quantization_config: {quant_method: gguf}` in its config, although
    its weights were dequantized on loading and are stored as plain floats; the converter refuses
    that quant method. The view links every file and drops that entry from config.json."""
    try:
        config = json.loads((folder / "config.json").read_text())
    except (OSError, ValueError):
        return folder
    if (config.get("quantization_config") or {}).get("quant_method") != "gguf":
        return folder
    config.pop("quantization_config")
    view = scratch / folder.resolve().name  # the converter names the model after its folder
    view.mkdir()
    for path in folder.iterdir():
        if path.name != "config.json":
            (view / path.name).symlink_to(path.resolve())
    (view / "config.json").write_text(json.dumps(config, indent=2))
    return view
