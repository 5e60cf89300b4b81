"""Train a small Mixtral-style mixture-of-experts model here, so MoE work is measured on trained
weights (none ships in ../shared): 6 blocks, 8 routed experts, 2 per token, hidden 128, the
stories260K tokenizer (vocabulary 512), on WikiText-2 valid text (the only WikiText split here
besides test, which stays for evaluation). Deterministic for a given torch build and thread count
(seeded, two threads); takes about 15 minutes on 2 CPU cores (29 when sharing them).

    python bench/train_tiny_moe.py            # writes bench/out/tiny-moe (a plain HF folder)

`tiny_moe()` returns the folder, training it first if it is missing. It is a small model trained
here, not a published one: quality claims on it are about this model only.
"""
from __future__ import annotations

import argparse
import json
import math
import shutil
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import CALIBRATION_TEXT, STORIES, machine, write_results  # noqa: E402

OUT = Path(__file__).resolve().parent / "out" / "tiny-moe"
SEED = 20261205
SEQ_LEN, BATCH, STEPS, LR = 256, 16, 500, 3e-3
ARCHITECTURE = dict(hidden_size=128, intermediate_size=256, num_hidden_layers=6, num_attention_heads=4,
                    num_key_value_heads=2, num_local_experts=8, num_experts_per_tok=2, vocab_size=512,
                    max_position_embeddings=512, router_aux_loss_coef=0.02, tie_word_embeddings=False,
                    bos_token_id=1, eos_token_id=2, pad_token_id=0)


def _token_stream(tokenizer) -> torch.Tensor:
    lines = [line.strip() for line in CALIBRATION_TEXT.read_text(encoding="utf-8").splitlines()]
    ids = tokenizer("\n".join(line for line in lines if line), add_special_tokens=False)["input_ids"]
    return torch.tensor(ids, dtype=torch.long)


def train(out: Path = OUT, steps: int = STEPS) -> dict:
    from transformers import AutoTokenizer, MixtralConfig, MixtralForCausalLM

    torch.manual_seed(SEED)
    torch.set_num_threads(2)
    tokenizer = AutoTokenizer.from_pretrained(STORIES)
    stream = _token_stream(tokenizer)
    held_out = stream[-SEQ_LEN * 16:]  # the last 16 windows: a loss check on text not trained on
    stream = stream[:-SEQ_LEN * 16]
    config = MixtralConfig(**ARCHITECTURE, output_router_logits=True)
    model = MixtralForCausalLM(config).train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=LR, weight_decay=0.1, betas=(0.9, 0.95))
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: min(1.0, (step + 1) / 50) * 0.5 * (1 + math.cos(math.pi * step / steps)))
    generator = torch.Generator().manual_seed(SEED)
    bos = torch.full((BATCH, 1), tokenizer.bos_token_id or 1)
    start, log = time.perf_counter(), []
    for step in range(steps):
        offsets = torch.randint(0, len(stream) - SEQ_LEN, (BATCH,), generator=generator)
        ids = torch.cat([bos, torch.stack([stream[o:o + SEQ_LEN - 1] for o in offsets.tolist()])], dim=1)
        output = model(input_ids=ids, labels=ids)
        output.loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        schedule.step()
        optimizer.zero_grad(set_to_none=True)
        if step % 50 == 0 or step == steps - 1:
            log.append({"step": step, "loss": round(output.loss.item(), 4), "s": round(time.perf_counter() - start, 1)})
            print(log[-1], flush=True)
    model.eval()
    model.config.output_router_logits = False
    windows = held_out.view(16, SEQ_LEN)
    with torch.no_grad():
        held_out_loss = model(input_ids=windows, labels=windows).loss.item()
    scratch = out.with_name(out.name + ".partial")
    shutil.rmtree(scratch, ignore_errors=True)
    model.save_pretrained(scratch)
    tokenizer.save_pretrained(scratch)
    shutil.rmtree(out, ignore_errors=True)
    scratch.rename(out)
    summary = {"architecture": ARCHITECTURE, "seed": SEED, "steps": steps, "seq_len": SEQ_LEN, "batch": BATCH,
               "lr": LR, "train_tokens": steps * BATCH * SEQ_LEN, "text": str(CALIBRATION_TEXT.name),
               "parameters": sum(p.numel() for p in model.parameters()),
               "held_out_loss": round(held_out_loss, 4), "held_out_perplexity": round(math.exp(held_out_loss), 2),
               "seconds": round(time.perf_counter() - start, 1), "log": log, "machine": machine()}
    (out / "training.json").write_text(json.dumps(summary, indent=2) + "\n", encoding="utf-8")
    return summary


def tiny_moe() -> Path:
    """The trained model's folder, trained first if missing."""
    if not (OUT / "training.json").exists():
        train()
    return OUT


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=OUT)
    parser.add_argument("--steps", type=int, default=STEPS)
    args = parser.parse_args()
    summary = train(args.out, args.steps)
    write_results("tiny_moe_train", {key: value for key, value in summary.items()})
    print(f"held-out loss {summary['held_out_loss']} (perplexity {summary['held_out_perplexity']}) "
          f"after {summary['seconds']} s; saved to {args.out}")


if __name__ == "__main__":
    main()
