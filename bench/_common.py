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


# A second kind of text that every machine has without downloads: the Python standard library's
# own source files (code), for judging whether plans fitted on WikiText prose hold elsewhere.
CODE_SEED = 20261203


def stdlib_code_text() -> str:
    """The public top-level modules of this interpreter's standard library, in name order."""
    import sysconfig

    folder = Path(sysconfig.get_paths()["stdlib"])
    files = sorted(path for path in folder.glob("*.py") if not path.name.startswith("_"))
    return "\n\n".join(f"# {path.name}\n{path.read_text(encoding='utf-8', errors='replace')}" for path in files)


def evaluation_domains(tokenizer, tokens: int) -> dict:
    """name -> TokenWindows: WikiText-2 test (the first windows, the standard), and Python code
    (windows drawn with a fixed seed across the whole library, so no one module dominates)."""
    from layerwise import token_windows

    return {"wikitext2-test": token_windows(tokenizer, EVALUATION_TEXT, tokens=tokens, seed=None),
            "python-stdlib": token_windows(tokenizer, [stdlib_code_text()], tokens=tokens, seed=CODE_SEED)}


def quality_row(quality) -> dict:
    """What a bench row keeps of an evaluation: point values, 95% intervals over windows, and the
    per-window KL for paired ratios against other rows on the same windows."""
    return {"perplexity": quality.perplexity, "perplexity_ci": quality.perplexity_ci, "kl": quality.kl,
            "kl_ci": quality.kl_ci, "top1": quality.top1, "window_kl": list(quality.window_kl)}


def paired_ratio(row: dict, baseline: dict) -> tuple[float, list[float]]:
    """KL of `row` over KL of `baseline`, evaluated on the same windows, with its 95% interval."""
    from layerwise.util.intervals import paired_ratio_ci

    return row["kl"] / baseline["kl"], paired_ratio_ci(row["window_kl"], baseline["window_kl"])


DITHERED_SMOLLM2 = ROOT / "bench" / "out" / "smollm2-dithered"


def dithered_smollm2() -> Path:
    """The off-grid copy of SmolLM2 (../shared/README.md): written once by the shared script, then reused."""
    if not (DITHERED_SMOLLM2 / "model.safetensors").exists():
        import subprocess

        subprocess.run([sys.executable, str(SHARED / "models" / "dither_smollm2.py"), str(DITHERED_SMOLLM2)],
                       check=True)
    return DITHERED_SMOLLM2
