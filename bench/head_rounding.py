"""What rounding the tied embedding/head costs, and how much of it weighting by the head's
importance (or GPTQ with the head's Hessian) removes: the dithered SmolLM2 (../shared/README.md),
only its tied embedding/head quantized, per GGUF type that fits its 576-wide rows.

- statistics: the head's inputs (the final norm's outputs) on 4096 tokens of the shipped
  calibration mix: their mean square per column (the importance matrix's entry for the head,
  `layerwise imatrix --process-output`) and their Hessian for GPTQ;
- judged: KL to the float model per token on 8192 tokens of WikiText-2 valid after its first
  600,000 bytes (none of it in the mix's prose excerpt or in the 100 imatrix chunks of
  bench/vs_llama_cpp.py): mean and 99.9th percentile.

Writes bench/results/head_rounding.json. About 8 minutes on 2 cores.

    python bench/head_rounding.py
"""
from __future__ import annotations

import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import CALIBRATION_TEXT, dithered_smollm2, write_results  # noqa: E402

from layerwise import load_model  # noqa: E402
from layerwise.data.domains import calibration_windows  # noqa: E402
from layerwise.data.windows import token_windows  # noqa: E402
from layerwise.engine.divergence import Reference, kl_per_token  # noqa: E402
from layerwise.quant import gguf_blocks  # noqa: E402
from layerwise.quant.config import QuantConfig  # noqa: E402
from layerwise.quant.gptq import gptq_gguf  # noqa: E402

HELD_OUT_FROM_BYTE = 600_000
TYPES = ("Q4_0", "Q5_0", "Q5_1", "Q8_0")


@torch.no_grad()
def main() -> None:
    started = time.perf_counter()
    loaded = load_model(dithered_smollm2())
    model = loaded.model
    head = model.get_submodule(loaded.adapter.lm_head)
    original = head.weight.detach().clone()
    calibration = calibration_windows(loaded.tokenizer, None, tokens=4096)
    text = CALIBRATION_TEXT.read_text(encoding="utf-8")
    held_out = text[text.index("\n", HELD_OUT_FROM_BYTE) + 1:]
    judged = token_windows(loaded.tokenizer, [held_out], tokens=8192, seq_len=512, seed=None)

    hessian = torch.zeros(original.shape[1], original.shape[1], dtype=torch.float64)
    count = 0

    def gather(module, args) -> None:
        nonlocal hessian, count
        x = args[0].reshape(-1, args[0].shape[-1]).double()
        hessian += x.t() @ x
        count += len(x)

    handle = head.register_forward_pre_hook(gather)
    for batch in calibration.batches(4):
        model(input_ids=batch, use_cache=False)
    handle.remove()
    hessian = (hessian / count).float()
    importance = torch.diagonal(hessian).numpy()
    references = [Reference.from_logits(model(input_ids=batch, use_cache=False).logits[:, :-1])
                  for batch in judged.batches(4)]

    def judge(weight: torch.Tensor) -> dict:
        head.weight.data.copy_(weight)  # tied: the embedding changes with it
        try:
            per_token = torch.cat([kl_per_token(reference, model(input_ids=batch, use_cache=False).logits[:, :-1]).flatten()
                                   for batch, reference in zip(judged.batches(4), references)])
        finally:
            head.weight.data.copy_(original)
        values = per_token.numpy()
        return {"mean_kl": float(values.mean()), "kl_p999": float(np.percentile(values, 99.9))}

    rows = []
    for qtype in TYPES:
        plain = gguf_blocks.dequantize(gguf_blocks.quantize(original.numpy(), qtype), qtype, original.shape)
        weighted = gguf_blocks.dequantize(gguf_blocks.quantize(original.numpy(), qtype, importance), qtype,
                                          original.shape)
        gptq = gptq_gguf(original, 2 * hessian, QuantConfig(format=qtype.lower(), algorithm="gptq")).dequantize()
        for method, weight in (("rtn", plain), ("rtn+head importance", weighted), ("gptq", gptq)):
            rows.append({"type": qtype, "method": method} | judge(weight))
            print(f"{qtype:5s} {method:20s} mean KL {rows[-1]['mean_kl']:.5f}  p99.9 {rows[-1]['kl_p999']:.4f}",
                  flush=True)
    write_results("head_rounding", {
        "model": "dithered SmolLM2-135M-Instruct, only the tied embedding/head quantized",
        "statistics": calibration.describe(), "judged": judged.describe(),
        "seconds": time.perf_counter() - started, "rows": rows})


if __name__ == "__main__":
    main()
