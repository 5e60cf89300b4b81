"""Our GGUF files against llama.cpp's own, each ours no larger than the stock file it is set against.

On the off-grid ("dithered") SmolLM2 of ../shared/README.md (the shared GGUF's weights sit on a
Q4_1 grid, which would flatter every stock type that contains it):

- source: llama.cpp's convert_hf_to_gguf.py of the dithered folder (f16, as the folder stores it);
- stock: `llama-quantize` Q3_K_S, Q3_K_M, Q4_0, Q4_K_S, Q4_K_M, Q5_K_M, each with an importance
  matrix from `llama-imatrix` on WikiText-2 valid (100 chunks of 512 tokens), and Q4_K_M without;
- ours: for each stock file, `layerwise plan --budget-like STOCK` with the default allocator
  (exact) and the default calibration (the shipped mix of prose, code, verse and tables; 2048
  tokens for the table and 2048 for the never-worse check, half the defaults, for time), units per
  tensor (`--granularity tensor`: q, k, v, o, gate, up, down each on its own, as llama-quantize
  chooses; `--granularity linear` keeps q/k/v and gate/up together) plus the token embedding (tied
  to the output head), options GPTQ onto Q4_0, Q5_0 and Q5_1 grids, Q8_0, and the K-quants
  Q3_K..Q6_K (rows of 256 only: the down projections) rounded with our importance matrix
  (`layerwise imatrix --process-output`, same text and chunking as llama-imatrix's, plus the head's
  entry, which weights the tied embedding's rounding);
  GPTQ options are fitted, in the table and the check, on 16384 tokens of the mix that neither
  uses; the table and the check measure quantized units as the float model computes them
  (`--emulate float`; `--emulate llama-cpu` rounds every quantized unit's inputs as llama.cpp's
  CPU backend does, `layerwise.quant.activations`, which at Q5_K_M's size made no better file:
  README, "Against llama-quantize"); then `layerwise export` (GPTQ fitted on 65536 tokens,
  `layerwise.apply.run.QUANTIZE_TOKENS`, of the shipped mix with WikiText-2 valid's first half as
  a fifth domain, `--calib`: the text both importance matrices read, which stock's imatrix is
  made from too; `--gptq-text mix` is export's own default, the mix alone, which made every file
  of ours until session 34; files already made are not remade while they exist).
  The embedding and head are rounded to nearest, as llama-quantize rounds them (but weighted by the
  head's importance, which llama-quantize does not do for a tied embedding);
  `--tail-weight W` prices every table entry at its KL plus W times its tail KL; the default,
  `--tail-weight auto`, makes a plan with each of AUTO_TAIL_WEIGHTS and keeps the one whose KL on
  the never-worse check's held-out calibration windows is lower (its rows say which,
  `tail_weight`; since session 35);
- judged by llama.cpp alone: `llama-perplexity --kl-divergence` against the f16 source on
  WikiText-2 test (the first 40 chunks of 512 tokens) and on Python code (the interpreter's
  standard library modules except the five in the shipped calibration, in a seeded order, first 40
  chunks): mean KLD with llama.cpp's +-, 99th and 99.9th percentile KLD, same-top-token share,
  perplexity, file bytes. `--domains wikitext2-valid-2nd-half` judges on the second half of
  WikiText-2 valid instead (text no step here fits on): the place to choose settings, never a
  result. `--domains wikitext2-test-after-160,python-stdlib-after-160` judges the two test domains
  past their first 160 chunks, which no run here had judged before session 34: where a setting
  chosen after seeing the first chunks is confirmed.

Writes bench/results/vs_llama_cpp.json (one row per reference file and domain; rewritten after
every reference, with the references still to come under "unfinished") and
bench/results/vs_llama_cpp.png. Needs llama.cpp's tools (bash .ci/llama_cpp_tools DIR; set
LAYERWISE_LLAMA_CPP_BIN=DIR/bin) and converter (LAYERWISE_CONVERT_HF_TO_GGUF). About 2 hours on
2 cores (the table per tensor, 1688 entries, about 50-80 minutes of it); every step's output is
kept under bench/out/vs_llama_cpp and reused when run again (files of ours named by granularity and
emulation).

    python bench/vs_llama_cpp.py [--references Q4_K_M+imatrix,Q4_0+imatrix] [--chunks 40] [--domains ...]
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import random
import re
import subprocess
import sys
import time
from pathlib import Path
from typing import Callable

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import CALIBRATION_TEXT, CODE_SEED, EVALUATION_TEXT, dithered_smollm2, write_results  # noqa: E402

from layerwise import load_model  # noqa: E402
from layerwise.data.domains import SHIPPED_MIX  # noqa: E402
from layerwise.export.convert import convert_to_gguf  # noqa: E402
from layerwise.apply.run import QUANTIZE_TOKENS  # noqa: E402
from layerwise.export.run import run_export  # noqa: E402
from layerwise.measure.run import run_plan  # noqa: E402
from layerwise.models.loading import resolve_source  # noqa: E402
from layerwise.plan.objectives import DEFAULT_OBJECTIVE, OBJECTIVES  # noqa: E402
from layerwise.quant.imatrix import run_imatrix  # noqa: E402

OUT = Path(__file__).resolve().parent / "out" / "vs_llama_cpp"
STOCK = ("Q3_K_S", "Q3_K_M", "Q4_0", "Q4_K_S", "Q4_K_M", "Q5_K_M")
REFERENCES = [f"{name}+imatrix" for name in STOCK] + ["Q4_K_M"]
OPTIONS = "gptq:q4_0,gptq:q5_0,gptq:q5_1,q8_0,q3_k,q4_k,q5_k,q6_k"
# The modules of the shipped calibration's code domain (src/layerwise/data/calibration/LICENSE):
# left out of the code we judge on.
CALIBRATION_MODULES = {"textwrap.py", "heapq.py", "shlex.py", "glob.py", "fnmatch.py"}
IMATRIX_CHUNKS = 100
EVALUATION_CHUNKS = 40
DOMAINS = ("wikitext2-test", "python-stdlib")
VALID_FIRST_LINE = 1880
# The most chunks of a test domain any run here has judged: `after_judged` starts past them.
JUDGED_CHUNKS = 160
# --gptq-text: what export fits GPTQ on, given the file of WikiText-2 valid's first half.
GPTQ_TEXTS = {"mix+wikitext2-valid-1st-half": lambda half: [SHIPPED_MIX, half],
              "mix": lambda half: None, "wikitext2-valid-1st-half": lambda half: half}
DEFAULT_GPTQ_TEXT = "mix+wikitext2-valid-1st-half"
# --tail-weight auto: no tail term, and the weight that won at Q4_K_M's size on held-out text
# (it lost at Q5_K_M's, where the check's KL rose with it; README, "Against llama-quantize").
AUTO_TAIL_WEIGHTS = (0.0, 0.1)


def tail_weights(text: str) -> tuple[float, ...]:
    """--tail-weight: one weight, or "auto" for every weight the check chooses among."""
    if text == "auto":
        return AUTO_TAIL_WEIGHTS
    try:
        return (float(text),)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is neither a number nor auto") from None


def describe_tail_weights(weights: tuple[float, ...]) -> str:
    return f"{weights[0]:g}" if len(weights) == 1 else "auto (" + " or ".join(f"{w:g}" for w in weights) + \
        ", the lower KL on the check's windows)"


def chunk_tag(chunks: int) -> str:
    """Part of the base logits' and judgements' file names: other chunk counts keep files of their own."""
    return "" if chunks == EVALUATION_CHUNKS else f"-{chunks}chunks"


def tool(name: str) -> str:
    folder = os.environ.get("LAYERWISE_LLAMA_CPP_BIN")
    if not folder or not (Path(folder) / name).is_file():
        sys.exit(f"{name} not found: set LAYERWISE_LLAMA_CPP_BIN to the folder bash .ci/llama_cpp_tools DIR builds "
                 "(DIR/bin)")
    return str(Path(folder) / name)


def run(command: list[str], log: Path) -> str:
    done = subprocess.run(command, capture_output=True, text=True)
    log.write_text(done.stdout + done.stderr)
    if done.returncode != 0:
        sys.exit(f"{Path(command[0]).name} failed (exit {done.returncode}); see {log}")
    return done.stdout + done.stderr


def cached(path: Path, make) -> Path:
    """`path`, made by `make(tmp)` into a temporary name first, unless it exists already."""
    if not path.exists():
        tmp = path.with_name(path.name + ".partial")
        tmp.unlink(missing_ok=True)
        make(tmp)
        tmp.rename(path)
    return path


def code_text() -> str:
    """The standard library's public top-level modules, minus the calibration's five, in a seeded order."""
    import sysconfig

    folder = Path(sysconfig.get_paths()["stdlib"])
    files = sorted(path for path in folder.glob("*.py")
                   if not path.name.startswith("_") and path.name not in CALIBRATION_MODULES)
    random.Random(CODE_SEED).shuffle(files)
    return "\n\n".join(f"# {path.name}\n{path.read_text(encoding='utf-8', errors='replace')}" for path in files)


def valid_lines() -> list[str]:
    """WikiText-2 valid's lines, ends kept: the two halves below split them at VALID_FIRST_LINE."""
    return CALIBRATION_TEXT.read_text(encoding="utf-8").splitlines(keepends=True)


def valid_second_half() -> str:
    """WikiText-2 valid from its line 1880 of 3760: text no step here fits on (llama-imatrix reads
    the first 100 chunks, the shipped calibration an excerpt of the start), to choose settings on."""
    return "".join(valid_lines()[VALID_FIRST_LINE - 1:])


def valid_first_half() -> str:
    """WikiText-2 valid up to its line 1880: the part llama-imatrix reads (its first 100 chunks of
    512 tokens), for `--gptq-text wikitext2-valid-1st-half`."""
    return "".join(valid_lines()[:VALID_FIRST_LINE - 1])


def after_judged(text: str) -> str:
    """`text` from its token JUDGED_CHUNKS x 512 on (by the model's tokenizer, which llama.cpp's
    matches): the part of a test domain that no run of this bench has judged (the most any judged
    is 160 chunks), to confirm a setting chosen after seeing the first chunks."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(dithered_smollm2()))
    offsets = tokenizer(text, return_offsets_mapping=True, add_special_tokens=False)["offset_mapping"]
    return text[offsets[JUDGED_CHUNKS * 512][0]:]


def judged_texts(domains: list[str]) -> dict[str, Path]:
    """The text file of each judged domain, written under OUT the first time."""
    makers = {"wikitext2-test": None, "python-stdlib": code_text, "wikitext2-valid-2nd-half": valid_second_half,
              f"wikitext2-test-after-{JUDGED_CHUNKS}": lambda: after_judged(EVALUATION_TEXT.read_text(encoding="utf-8")),
              f"python-stdlib-after-{JUDGED_CHUNKS}": lambda: after_judged(code_text())}
    unknown = sorted(set(domains) - set(makers))
    if unknown:
        sys.exit(f"unknown domain(s) {unknown}; choose from {', '.join(makers)}")
    return {domain: EVALUATION_TEXT if makers[domain] is None else cached(
        OUT / f"{domain}.txt", lambda tmp, make=makers[domain]: tmp.write_text(make(), encoding="utf-8"))
        for domain in domains}


HELD_OUT = "wikitext2-valid-2nd-half"
HELD_OUT_CHUNKS = 80


def held_out_judge(needed: list[Path], reference: str) -> Callable[[Path, str], dict]:
    """For scripts that choose a setting on text no step here fits on: once the f16 source and the
    cached files `needed` exist (else exit, naming this script's --references run that makes them),
    a function that judges a GGUF file on WikiText-2 valid's second half (80 chunks, against the f16
    source; logs named as `--domains wikitext2-valid-2nd-half` names them), prints one line under
    `label` and returns llama-perplexity's statistics."""
    source = OUT / "source-f16.gguf"
    missing = [path.name for path in (source, *needed) if not path.exists()]
    if missing:
        sys.exit(f"{', '.join(missing)} missing from {OUT}: run bench/vs_llama_cpp.py --references {reference} first")
    text = judged_texts([HELD_OUT])[HELD_OUT]
    judged = f"{HELD_OUT}{chunk_tag(HELD_OUT_CHUNKS)}"
    base = log_probs(source, text, HELD_OUT_CHUNKS, OUT / f"base-{judged}.kld", OUT / f"base-{judged}.log")

    def judge(model: Path, label: str) -> dict:
        found = kl_divergence(model, base, text, HELD_OUT_CHUNKS, OUT / f"kld-{model.stem}-{judged}.log")
        print(f"{label:>8}: mean KLD {found['mean_kld']:.5f} ± {found['mean_kld_pm']:.5f}  p99 {found['kld_p99']:.4f}"
              f"  p99.9 {found['kld_p999']:.4f}", flush=True)
        return found
    return judge


def log_probs(model: Path, text: Path, chunks: int, out: Path, log: Path) -> Path:
    """`out`: llama-perplexity's log-probabilities of `model` on the first `chunks` chunks of 512 of
    `text` (what `--kl-divergence` judges another file against), unless it exists."""
    return cached(out, lambda tmp: run(
        [tool("llama-perplexity"), "-m", str(model), "-f", str(text), "--chunks", str(chunks), "-c", "512", "-t", "2",
         "--kl-divergence-base", str(tmp)], log))


def stock_file(name: str, source: Path, imatrix: Path) -> Path:
    qtype, _, with_imatrix = name.partition("+")
    args = ["--imatrix", str(imatrix)] if with_imatrix else []
    return cached(OUT / f"stock-{name}.gguf", lambda tmp: run(
        [tool("llama-quantize"), *args, str(source), str(tmp), qtype, "2"], OUT / f"stock-{name}.log"))


# llama-perplexity --kl-divergence's summary lines, e.g. "Mean    KLD:   0.012345 ±   0.000123".
_STATS = {
    "mean_kld": r"Mean\s+KLD:\s+([-\d.e]+)\s+±\s+([-\d.e]+)",
    "kld_p99": r"99\.0%\s+KLD:\s+([-\d.e]+)",
    "kld_p999": r"99\.9%\s+KLD:\s+([-\d.e]+)",
    "same_top": r"Same top p:\s+([-\d.e]+)\s+±\s+([-\d.e]+)",
    "perplexity": r"Mean PPL\(Q\)\s+:\s+([-\d.e]+)\s+±\s+([-\d.e]+)",
}


def kl_divergence(model: Path, base: Path, text: Path, chunks: int, log: Path) -> dict:
    """llama-perplexity's KL divergence of `model` from the base logits, parsed (from `log` when an
    earlier run on the same file left a complete one). Its log is written by an asynchronous
    logger that now and then loses the last lines: then it is run again."""
    for attempt in range(3):
        if attempt == 0 and log.exists() and log.stat().st_mtime > model.stat().st_mtime:
            output = log.read_text(errors="replace")
        else:
            output = run([tool("llama-perplexity"), "-m", str(model), "-f", str(text), "--chunks", str(chunks),
                          "-c", "512", "-t", "2", "--kl-divergence-base", str(base), "--kl-divergence"], log)
        found = {key: re.search(pattern, output) for key, pattern in _STATS.items()}
        if all(found.values()):
            row = {key: float(match.group(1)) for key, match in found.items()}
            row["mean_kld_pm"] = float(found["mean_kld"].group(2))
            row["perplexity_pm"] = float(found["perplexity"].group(2))
            row["same_top_pm"] = float(found["same_top"].group(2))
            return row
    sys.exit(f"could not read llama-perplexity's KL summary from {log}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--references", default=",".join(REFERENCES))
    parser.add_argument("--chunks", type=int, default=EVALUATION_CHUNKS, help="evaluation chunks of 512 tokens per domain")
    parser.add_argument("--options", default=OPTIONS)
    parser.add_argument("--tokens", type=int, default=2048,
                        help="calibration tokens for the sensitivity table and for the never-worse check each "
                             "(layerwise plan's default is 4096; 2048 halves the table's ~45 minutes here)")
    parser.add_argument("--granularity", default="tensor", choices=["linear", "tensor"],
                        help="the plan's units: linear groups (q/k/v, gate/up together) or every tensor on its own")
    parser.add_argument("--emulate", default="float", choices=["float", "llama-cpu"],
                        help="how the plan measures quantized models: in float, or with their inputs rounded as "
                             "llama.cpp's CPU backend rounds them (llama-cpu, what llama-perplexity then shows)")
    parser.add_argument("--objective", default=DEFAULT_OBJECTIVE, choices=list(OBJECTIVES),
                        help="how the plan combines the calibration's domains (layerwise plan --objective)")
    parser.add_argument("--tail-weight", default="auto", type=tail_weights,
                        help="layerwise plan --tail-weight: every entry priced at its KL plus this times its tail KL; "
                             f"or auto: a plan for each of {', '.join(f'{w:g}' for w in AUTO_TAIL_WEIGHTS)}, keeping "
                             "the one whose KL on the never-worse check's held-out calibration windows is lower (the default)")
    parser.add_argument("--domains", default=",".join(DOMAINS),
                        help="judged texts: wikitext2-test, python-stdlib, and wikitext2-valid-2nd-half (held-out "
                             "text to choose settings on, never a result); wikitext2-test-after-160 and "
                             "python-stdlib-after-160 are those two past the chunks any run here has judged")
    parser.add_argument("--gptq-text", default=DEFAULT_GPTQ_TEXT, choices=list(GPTQ_TEXTS),
                        help="what export fits GPTQ on: the shipped calibration mix with WikiText-2 valid's first half "
                             "(the text both importance matrices come from) as a fifth domain, the mix alone "
                             "(layerwise export's default), or that half alone")
    parser.add_argument("--name", default="vs_llama_cpp")
    args = parser.parse_args()
    references = args.references.split(",")
    unknown = sorted(set(references) - set(REFERENCES))
    if unknown:
        sys.exit(f"unknown reference(s) {unknown}; choose from {', '.join(REFERENCES)}")
    OUT.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()

    folder = dithered_smollm2()
    # A float32 load of the f16 folder: the converter keeps the folder's own f16.
    source = cached(OUT / "source-f16.gguf", lambda tmp: convert_to_gguf(resolve_source(folder), tmp, torch.float32))
    stock_imatrix = cached(OUT / "imatrix-llama.gguf", lambda tmp: run(
        [tool("llama-imatrix"), "-m", str(source), "-f", str(CALIBRATION_TEXT), "-o", str(tmp), "--chunks",
         str(IMATRIX_CHUNKS), "-c", "512", "-t", "2"], OUT / "imatrix-llama.log"))
    texts = judged_texts(args.domains.split(","))
    judged = chunk_tag(args.chunks)
    bases = {domain: log_probs(source, text, args.chunks, OUT / f"base-{domain}{judged}.kld",
                               OUT / f"base-{domain}{judged}.log") for domain, text in texts.items()}
    print(f"source, importance matrix and base logits ready ({time.perf_counter() - started:.0f} s)", flush=True)

    loaded = load_model(folder)
    ours_imatrix = OUT / "imatrix-ours-output.gguf"  # with the head's entry (weights the tied embedding)
    if not ours_imatrix.exists():
        run_imatrix(loaded, data=CALIBRATION_TEXT, out=ours_imatrix, chunks=IMATRIX_CHUNKS, include_output=True,
                    progress=False)
    # Files of ours carry the granularity: plans per linear group and per tensor share the cache.
    tag = "" if args.granularity == "linear" else f"{args.granularity}-"
    if args.emulate != "float":  # and so do files measured with an emulation
        tag += f"{args.emulate}-"
    table = OUT / f"table-{tag.rstrip('-')}.json" if tag else OUT / "table.json"
    if args.objective != DEFAULT_OBJECTIVE:  # plans of other objectives share the table, not the files
        tag += f"{args.objective}-"
    # Plans with a tail weight share the table too, and so do plans with other options (the table
    # grows by the options it lacks).
    options_tag = f"options{hashlib.sha256(args.options.encode()).hexdigest()[:8]}-" if args.options != OPTIONS else ""

    def plan_tag(weight: float) -> str:
        return tag + (f"tail{weight:g}-" if weight else "") + options_tag

    def file_tag(weight: float) -> str:
        """The export's GPTQ text changes our files, not the plan."""
        return plan_tag(weight) + ("" if args.gptq_text == "mix" else f"gptq-{args.gptq_text}-")
    gptq_text = GPTQ_TEXTS[args.gptq_text](cached(OUT / "wikitext2-valid-1st-half.txt",
                                                 lambda tmp: tmp.write_text(valid_first_half(), encoding="utf-8")))

    def save(unfinished: list[str]) -> None:
        """The results so far, written after every reference so that a stopped run keeps what it judged."""
        plot(rows, Path(__file__).resolve().parent / "results" / f"{args.name}.png")
        write_results(args.name, {
            "model": "dithered SmolLM2-135M-Instruct (../shared/models/dither_smollm2.py), f16 GGUF by convert_hf_to_gguf.py",
            "stock": "llama-quantize (llama.cpp of llama-cpp-python 0.3.36) with llama-imatrix on WikiText-2 valid, "
                     f"{IMATRIX_CHUNKS} chunks of 512",
            "ours": f"layerwise plan --budget-like STOCK --options {args.options} --granularity {args.granularity} --tokens "
                    f"{args.tokens} --check-tokens {args.tokens} --emulate {args.emulate} --objective {args.objective} "
                    f"--tail-weight {describe_tail_weights(args.tail_weight)} "
                    "--imatrix (layerwise imatrix --process-output, same text and chunks); layerwise export (GPTQ on "
                    f"{QUANTIZE_TOKENS} tokens of {'the shipped mix' if args.gptq_text == 'mix' else args.gptq_text})",
            "judge": f"llama-perplexity --kl-divergence, {args.chunks} chunks of 512 tokens per domain",
            "seconds": time.perf_counter() - started, "rows": rows} | ({"unfinished": unfinished} if unfinished else {}))

    rows, files = [], {}
    for reference in references:
        stock = stock_file(reference, source, stock_imatrix)
        plans, check_kl = {}, {}
        for weight in args.tail_weight:
            plan_path = plans[weight] = OUT / f"plan-{plan_tag(weight)}{reference}.json"
            if not plan_path.exists():
                outcome = run_plan(loaded, budget_like=stock, options=args.options, granularity=args.granularity,
                                   table=table, tokens=args.tokens, check_tokens=args.tokens, imatrix=ours_imatrix,
                                   out=plan_path, emulate=args.emulate, objective=args.objective, tail_weight=weight,
                                   progress=True)
                print(f"{reference}: plan {outcome.report['returned']}, {outcome.report['planned_bytes']:,} planned "
                      f"bytes (budget {outcome.report['budget_like']['budget_bytes']:,})", flush=True)
            check_kl[weight] = json.loads(plan_path.with_suffix(".report.json").read_text())["calibration_kl"]
        # Every candidate was measured on the same held-out calibration windows: the lower KL there wins.
        weight = min(check_kl, key=lambda candidate: (check_kl[candidate], candidate))
        if len(check_kl) > 1:
            print(f"{reference}: tail weight {weight:g} (check KL "
                  + ", ".join(f"{w:g}: {kl:.5f}" for w, kl in check_kl.items()) + ")", flush=True)
        ours = OUT / f"ours-{file_tag(weight)}{reference}.gguf"
        if not ours.exists():
            run_export(folder, plan=plans[weight], out=ours, calib=gptq_text, progress=False)
        files[reference] = {"stock": stock, "ours": ours}
        for domain, text in texts.items():
            measured = {side: kl_divergence(path, bases[domain], text, args.chunks, OUT / (
                f"kld-{side}-{file_tag(weight) if side == 'ours' else ''}{reference}-{domain}{judged}.log"))
                for side, path in files[reference].items()}
            row = {"reference": reference, "domain": domain,
                   "stock_bytes": stock.stat().st_size, "ours_bytes": ours.stat().st_size, "tail_weight": weight}
            if len(check_kl) > 1:
                row["check_kl_by_tail_weight"] = {f"{w:g}": kl for w, kl in check_kl.items()}
            for side in ("stock", "ours"):
                row |= {f"{side}_{key}": value for key, value in measured[side].items()}
            row["ratio_mean_kld"] = row["ours_mean_kld"] / row["stock_mean_kld"]
            rows.append(row)
            print(f"{reference:15s} {domain:15s} bytes {row['stock_bytes']:>11,} / {row['ours_bytes']:>11,}  "
                  f"mean KLD {row['stock_mean_kld']:.5f} / {row['ours_mean_kld']:.5f} (x{row['ratio_mean_kld']:.3f})  "
                  f"p99.9 {row['stock_kld_p999']:.4f} / {row['ours_kld_p999']:.4f}  "
                  f"ppl {row['stock_perplexity']:.3f} / {row['ours_perplexity']:.3f}", flush=True)
        save(references[references.index(reference) + 1:])


def plot(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    domains = list(dict.fromkeys(row["domain"] for row in rows))
    figure, axes = plt.subplots(1, len(domains), figsize=(5.5 * len(domains), 4.2), squeeze=False)
    for axis, domain in zip(axes[0], domains):
        mine = sorted((row for row in rows if row["domain"] == domain), key=lambda row: row["stock_bytes"])
        for side, marker in (("stock", "o"), ("ours", "s")):
            xs = [row[f"{side}_bytes"] / 1e6 for row in mine]
            ys = [row[f"{side}_mean_kld"] for row in mine]
            axis.plot(xs, ys, marker=marker, linestyle="none",
                      label="llama-quantize" if side == "stock" else "layerwise plan, no larger")
        for row in mine:
            axis.annotate(row["reference"], (row["stock_bytes"] / 1e6, row["stock_mean_kld"]), fontsize=7,
                          xytext=(4, 4), textcoords="offset points")
        axis.set_yscale("log")
        axis.set_xlabel("file size (MB)")
        axis.set_ylabel("mean KLD to f16 (llama-perplexity)")
        axis.set_title(domain)
        axis.legend(fontsize=8)
    figure.suptitle("dithered SmolLM2-135M: ours vs llama-quantize at the same file size", fontsize=10)
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)


if __name__ == "__main__":
    main()
