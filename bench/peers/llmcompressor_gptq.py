"""llm-compressor's GPTQ (vLLM project, PyPI `llmcompressor`) on a plain Hugging Face folder, on CPU.

Runs in its own environment (see bench/peer_quantizers.md: llm-compressor pins its own
transformers), reads the calibration windows layerwise used (a .npy of token ids, so both see
the same tokens), and writes the dequantized float32 weight of every quantized Linear
(module name -> tensor) to a safetensors file, to be judged by layerwise's evaluation.
llm-compressor's defaults are kept (activation order "static", damping 0.01, block 128).
"""
from __future__ import annotations

import argparse
import time

import numpy as np
import torch
from compressed_tensors.quantization import QuantizationArgs, QuantizationScheme
from datasets import Dataset
from llmcompressor import oneshot
from llmcompressor.modifiers.gptq import GPTQModifier
from safetensors.torch import save_file
from transformers import AutoModelForCausalLM


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", required=True, help="plain Hugging Face folder")
    parser.add_argument("--windows", required=True, help=".npy of calibration token ids [n, seq_len]")
    parser.add_argument("--bits", type=int, default=3)
    parser.add_argument("--group-size", type=int, default=64, help="<= 0: one scale per output channel")
    parser.add_argument("--out", required=True)
    args = parser.parse_args()
    start = time.time()
    torch.set_num_threads(2)
    model = AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.float32).eval()
    ids = np.load(args.windows)
    dataset = Dataset.from_dict({"input_ids": ids.tolist(), "attention_mask": np.ones_like(ids).tolist()})
    strategy = {"strategy": "group", "group_size": args.group_size} if args.group_size > 0 else {"strategy": "channel"}
    scheme = QuantizationScheme(targets=["Linear"],
                                weights=QuantizationArgs(num_bits=args.bits, type="int", symmetric=True, **strategy))
    recipe = GPTQModifier(config_groups={"group_0": scheme}, ignore=["lm_head"])
    oneshot(model=model, dataset=dataset, recipe=recipe, num_calibration_samples=len(ids),
            max_seq_length=ids.shape[1], shuffle_calibration_samples=False)
    # After oneshot each quantized Linear's weight holds its quantize-dequantize values.
    weights = {name: module.weight.detach().float().contiguous().clone()
               for name, module in model.named_modules()
               if isinstance(module, torch.nn.Linear) and hasattr(module, "weight_scale")}
    save_file(weights, args.out)
    print(f"llm-compressor GPTQ: {len(weights)} linears, {len(ids)}x{ids.shape[1]} tokens, {time.time() - start:.0f} s")


if __name__ == "__main__":
    main()
