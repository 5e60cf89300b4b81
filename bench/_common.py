"""What the bench scripts share: the shared models and texts, and writing results."""
from __future__ import annotations

import json
import platform
import sys
from pathlib import Path

import torch

import layerwise
from layerwise.util.files import write_text_atomic

ROOT = Path(__file__).resolve().parent.parent
SHARED = ROOT.parent / "shared"
SMOLLM2 = SHARED / "models" / "smollm2-135m-instruct" / "SmolLM2-135M-Instruct.Q4_1.gguf"
STORIES = SHARED / "models" / "stories260K"
CALIBRATION_TEXT = SHARED / "data" / "wikitext-2" / "valid.txt"
EVALUATION_TEXT = SHARED / "data" / "wikitext-2-raw" / "wiki.test.raw"
RESULTS = Path(__file__).resolve().parent / "results"


def machine() -> dict:
    return {"platform": platform.platform(), "processor": platform.processor(), "torch": torch.__version__,
            "threads": torch.get_num_threads(), "layerwise": layerwise.__version__}


def write_results(name: str, payload: dict) -> Path:
    path = RESULTS / f"{name}.json"
    command = "python " + " ".join([str(Path(sys.argv[0]).relative_to(ROOT)) if Path(sys.argv[0]).is_absolute()
                                    and Path(sys.argv[0]).is_relative_to(ROOT) else sys.argv[0], *sys.argv[1:]])
    write_text_atomic(path, json.dumps({"command": command} | payload | {"machine": machine()}, indent=1) + "\n")
    return path
