"""Cost of one profiling pass (no ablation) relative to a bare forward pass over the same tokens.

    python bench/profile_overhead.py [--model PATH] [--tokens 4096] [--repeats 3]

Both are timed in the same run, alternating, and the ratio of medians is reported (target <= 1.5).
Weight statistics are data-free and timed separately; ablation is optional and not included.
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time

import torch
from rich.console import Console
from rich.table import Table

sys.path.insert(0, str(__import__("pathlib").Path(__file__).resolve().parent))
from _common import CALIBRATION_TEXT, SMOLLM2, write_results  # noqa: E402

from layerwise import load_model, token_windows  # noqa: E402
from layerwise.profile import profile_model  # noqa: E402


@torch.no_grad()
def bare_forward(loaded, windows, batch_size: int) -> None:
    for batch in windows.batches(batch_size):
        loaded.model(input_ids=batch, use_cache=False)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=str(SMOLLM2))
    parser.add_argument("--tokens", type=int, default=4096)
    parser.add_argument("--batch-size", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()

    loaded = load_model(args.model)
    windows = token_windows(loaded.tokenizer, CALIBRATION_TEXT, tokens=args.tokens, seed=0)
    bare_forward(loaded, token_windows(loaded.tokenizer, CALIBRATION_TEXT, tokens=512, seed=1), 1)  # warm-up

    forward_s, profile_s = [], []
    for _ in range(args.repeats):
        start = time.perf_counter()
        bare_forward(loaded, windows, args.batch_size)
        forward_s.append(time.perf_counter() - start)
        start = time.perf_counter()
        profile_model(loaded, windows, batch_size=args.batch_size, weights=False, progress=False)
        profile_s.append(time.perf_counter() - start)
    start = time.perf_counter()
    result = profile_model(loaded, windows, batch_size=args.batch_size, weights=True, progress=False)
    weights_s = result.meta["timings"]["weights_s"]
    del start

    ratio = statistics.median(profile_s) / statistics.median(forward_s)
    table = Table(title=f"profiling overhead: {loaded.source.display}, {windows.n_tokens} tokens")
    for column in ("pass", "median s", "runs s", "ratio to forward"):
        table.add_column(column, justify="right")
    table.add_row("bare forward", f"{statistics.median(forward_s):.2f}", " ".join(f"{t:.2f}" for t in forward_s), "1.00")
    table.add_row("profile (no ablation)", f"{statistics.median(profile_s):.2f}", " ".join(f"{t:.2f}" for t in profile_s), f"{ratio:.2f}")
    table.add_row("weight statistics (once)", f"{weights_s:.2f}", "", "")
    Console(width=120).print(table)
    path = write_results("profile_overhead", {
        "model": loaded.describe(), "data": windows.describe(), "batch_size": args.batch_size,
        "forward_s": forward_s, "profile_s": profile_s, "weights_s": weights_s,
        "ratio_profile_to_forward": ratio, "target": 1.5, "meets_target": ratio <= 1.5,
        "logit_lens_positions_per_window": result.meta["settings"]["logit_lens_positions_per_window"],
    })
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
