"""Where SmolLM2's 8-bit KL comes from: int8 (groups of 64) on parts of the model, and bf16
rounding of the weights as a floor, judged on the first 8 x 512 tokens of wiki.test.raw.

    python bench/int8_breakdown.py      # writes bench/results/int8_breakdown.json

If the KL of the whole model is about the sum of its parts' and no part dominates, the KL is the
model's sensitivity to 8-bit rounding noise rather than a fault of one module or of the pipeline.
"""
from __future__ import annotations

import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import EVALUATION_TEXT, SMOLLM2, write_results  # noqa: E402

from layerwise import load_model, token_windows  # noqa: E402
from layerwise.evaluate import base_outputs, evaluate  # noqa: E402
from layerwise.models.layout import block_linears, linear_weight, set_linear_weight  # noqa: E402
from layerwise.plan import Plan  # noqa: E402
from layerwise.apply import quantize_  # noqa: E402
from layerwise.quant import QuantConfig  # noqa: E402

PARTS = {
    "all block linears": None,
    "attention only": r"re:.*self_attn\..*",
    "MLP only": r"re:.*mlp\..*",
    "down_proj only": r"re:.*down_proj",
    "block 0 only": r"re:.*layers\.0\..*",
    "blocks 11-29 only (massive activations)": r"re:.*layers\.(1[1-9]|2[0-9])\..*",
}


def main() -> None:
    loaded = load_model(SMOLLM2)
    windows = token_windows(loaded.tokenizer, EVALUATION_TEXT, tokens=4096, seed=None)
    base = base_outputs(loaded, windows, progress=False)
    linears = {name: module for _, name, module in block_linears(loaded.model, loaded.adapter)}
    original = {name: linear_weight(module).detach().clone() for name, module in linears.items()}
    int8 = QuantConfig("int", 8, 64)
    rows = []
    for label, pattern in PARTS.items():
        plan = Plan(int8) if pattern is None else Plan(None, ((pattern, int8),))
        quantize_(loaded, plan, progress=False)
        rows.append({"label": f"int8 g64 sym, {label}", **evaluate(loaded, base, progress=False).to_dict()})
        for name, module in linears.items():
            set_linear_weight(module, original[name])
        print(rows[-1], flush=True)
    for name, module in linears.items():
        set_linear_weight(module, original[name].bfloat16().float())
    rows.append({"label": "bf16-rounded block linears", **evaluate(loaded, base, progress=False).to_dict()})
    print(rows[-1])
    write_results("int8_breakdown", {"model": str(SMOLLM2), "evaluation": windows.describe(), "rows": rows})


if __name__ == "__main__":
    with torch.no_grad():
        main()
