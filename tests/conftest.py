from __future__ import annotations

from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parent.parent
SHARED = ROOT.parent / "shared"
STORIES = SHARED / "models" / "stories260K"
SMOLLM2 = SHARED / "models" / "smollm2-135m-instruct" / "SmolLM2-135M-Instruct.Q4_1.gguf"
CALIBRATION_TEXT = SHARED / "data" / "wikitext-2" / "valid.txt"
EVALUATION_TEXT = SHARED / "data" / "wikitext-2-raw" / "wiki.test.raw"


@pytest.fixture(autouse=True)
def _deterministic():
    torch.manual_seed(0)


@pytest.fixture(scope="session")
def stories():
    from layerwise import load_model

    return load_model(STORIES)


@pytest.fixture(scope="session")
def smollm2():
    from layerwise import load_model

    return load_model(SMOLLM2)
