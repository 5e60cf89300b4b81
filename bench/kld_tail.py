"""How sure is a 99.9th-percentile KLD comparison? Per-token KL of our file and the stock file
against the f16 base, read from llama.cpp's own log-probability files, and a bootstrap over chunks.

`llama-perplexity --kl-divergence` prints percentiles but not the per-token values behind them,
so each file is run once more with `--kl-divergence-base OUT` (it then writes its own
log-probabilities in the base file's format: per scored token a scale and offset, and 16-bit
codes of the log-probabilities, clamped 16 nats below the top one) on the same text and chunks,
and the KL of every scored token is computed here as llama.cpp computes it (terms where the base
log-probability exceeds -16). The file's side is read back from 16 bits (llama.cpp uses its float
logits), which moves a token's KL by at most about 1e-4 nats; the mean and percentiles it gives
are printed beside llama-perplexity's for comparison.

Chunks, not tokens, are resampled (tokens of one chunk share their text), 2000 times with a fixed
seed: a 95% interval of ours' p99.9 over stock's, and how often ours is no higher.

Reuses bench/vs_llama_cpp.py's files (run it first for the reference and chunk count asked):

    python bench/kld_tail.py [--reference Q5_K_M+imatrix] [--domain wikitext2-test] [--chunks 40]
                             [--ours-tag tensor-]
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import write_results  # noqa: E402
from vs_llama_cpp import OUT, chunk_tag, judged_texts, kl_divergence, log_probs  # noqa: E402

RESAMPLES = 2000
SEED = 0
# Below this log-probability llama.cpp leaves a base token out of the KL sum.
FLOOR = -16.0


def read_log_probs(path: Path) -> tuple[int, int, np.ndarray]:
    """(n_ctx, n_vocab, rows) of a llama-perplexity log-probability file: rows [chunks, scored
    tokens, nv] of uint16, each row's first four being its float32 scale and offset."""
    with open(path, "rb") as handle:
        if handle.read(8) != b"_logits_":
            sys.exit(f"{path} is not a llama-perplexity log-probability file")
        n_ctx, n_vocab, n_chunk = (int(v) for v in np.frombuffer(handle.read(12), dtype=np.int32))
    nv = 2 * ((n_vocab + 1) // 2) + 4
    scored = n_ctx - 1 - n_ctx // 2
    offset = 8 + 12 + 4 * n_ctx * n_chunk
    rows = np.memmap(path, dtype=np.uint16, mode="r", offset=offset, shape=(n_chunk, scored, nv))
    return n_ctx, n_vocab, rows


def decoded(rows: np.ndarray, n_vocab: int) -> np.ndarray:
    """Log-probabilities (float32) of rows of one chunk."""
    head = np.ascontiguousarray(rows[:, :4]).view(np.float32)  # [tokens, 2]: scale, offset
    return head[:, :1] * rows[:, 4:4 + n_vocab].astype(np.float32) + head[:, 1:2]


def per_token_kl(base: Path, model: Path) -> np.ndarray:
    """[chunks, scored tokens] KL(base || model) per token."""
    ctx_b, vocab_b, base_rows = read_log_probs(base)
    ctx_m, vocab_m, model_rows = read_log_probs(model)
    if (ctx_b, vocab_b, base_rows.shape) != (ctx_m, vocab_m, model_rows.shape):
        sys.exit(f"{base} and {model} hold different chunks, contexts or vocabularies")
    out = np.empty(base_rows.shape[:2], dtype=np.float64)
    for chunk in range(base_rows.shape[0]):
        log_p = decoded(base_rows[chunk], vocab_b)
        log_q = decoded(model_rows[chunk], vocab_m)
        kept = log_p > FLOOR
        out[chunk] = np.sum(np.where(kept, np.exp(log_p) * (log_p - log_q), 0.0), axis=1)
    return out


def bootstrap(ours: np.ndarray, stock: np.ndarray, quantile: float) -> dict:
    """Chunks resampled with replacement: ours' quantile over stock's, its 95% interval, and the
    share of resamples where ours is no higher."""
    rng = np.random.default_rng(SEED)
    chunks = ours.shape[0]
    ratios = np.empty(RESAMPLES)
    for draw in range(RESAMPLES):
        picked = rng.integers(0, chunks, size=chunks)
        ratios[draw] = np.quantile(ours[picked], quantile) / np.quantile(stock[picked], quantile)
    return {"ratio": float(np.quantile(ours, quantile) / np.quantile(stock, quantile)),
            "ratio_95": [float(v) for v in np.quantile(ratios, [0.025, 0.975])],
            "share_ours_no_higher": float(np.mean(ratios <= 1.0))}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--reference", default="Q5_K_M+imatrix")
    parser.add_argument("--domain", default="wikitext2-test")
    parser.add_argument("--chunks", type=int, default=40)
    parser.add_argument("--ours-tag", default="tensor-",
                        help="the part of our file's name bench/vs_llama_cpp.py gives it after 'ours-' (e.g. "
                             "tensor-llama-cpu-cautious-)")
    parser.add_argument("--name", default=None)
    args = parser.parse_args()
    judged = chunk_tag(args.chunks)
    text = judged_texts([args.domain])[args.domain]
    base = OUT / f"base-{args.domain}{judged}.kld"
    files = {"stock": OUT / f"stock-{args.reference}.gguf", "ours": OUT / f"ours-{args.ours_tag}{args.reference}.gguf"}
    missing = [path.name for path in (base, *files.values()) if not path.exists()]
    if missing:
        sys.exit(f"{', '.join(missing)} missing from {OUT}: run bench/vs_llama_cpp.py for this reference, domain and "
                 "chunk count first")
    kl, printed = {}, {}
    for side, model in files.items():
        tag = args.ours_tag if side == "ours" else ""
        probs = OUT / f"logprobs-{side}-{tag}{args.reference}-{args.domain}{judged}.bin"
        log_probs(model, text, args.chunks, probs, probs.with_suffix(".bin.log"))
        kl[side] = per_token_kl(base, probs)
        printed[side] = kl_divergence(model, base, text, args.chunks,
                                      OUT / f"kld-{side}-{tag}{args.reference}-{args.domain}{judged}.log")
    rows = {}
    for side, values in kl.items():
        flat = values.reshape(-1)
        rows[side] = {"mean_kld": float(flat.mean()), "kld_p99": float(np.quantile(flat, 0.99)),
                      "kld_p999": float(np.quantile(flat, 0.999)), "tokens": int(flat.size),
                      "llama_perplexity": {key: printed[side][key] for key in ("mean_kld", "kld_p99", "kld_p999")}}
        print(f"{side:5s} mean KLD {rows[side]['mean_kld']:.5f} (llama-perplexity {printed[side]['mean_kld']:.5f})  "
              f"p99 {rows[side]['kld_p99']:.4f} ({printed[side]['kld_p99']:.4f})  "
              f"p99.9 {rows[side]['kld_p999']:.4f} ({printed[side]['kld_p999']:.4f})", flush=True)
    tails = {f"p{q * 100:g}": bootstrap(kl["ours"], kl["stock"], q) for q in (0.99, 0.999)}
    for name, found in tails.items():
        print(f"{name}: ours / stock {found['ratio']:.3f}, 95% interval over chunks [{found['ratio_95'][0]:.3f}, "
              f"{found['ratio_95'][1]:.3f}], ours no higher in {100 * found['share_ours_no_higher']:.1f}% of "
              f"{RESAMPLES} resamples", flush=True)
    name = args.name or f"kld_tail_{args.ours_tag}{args.reference}_{args.domain}{judged}".replace("+", "_")
    write_results(name, {"reference": args.reference, "domain": args.domain, "chunks": args.chunks,
                         "ours": files["ours"].name, "resamples": RESAMPLES, "seed": SEED, "files": rows,
                         "ours_over_stock": tails})


if __name__ == "__main__":
    main()
