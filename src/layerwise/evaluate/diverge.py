"""Per-prompt divergence between a model and its quantized version, with outliers flagged.

A model can be built to behave well in full precision and badly only once quantized, on chosen
inputs ("Mind the Gap", "Exploiting LLM Quantization"). Averages hide that; this compares prompt by
prompt and flags prompts whose KL is far above the rest: more than `threshold` robust standard
deviations (1.4826 x the median absolute deviation) above the median, and at least `min_ratio`
times the median.
"""
from __future__ import annotations

import statistics
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from layerwise.data.windows import bos_policy
from layerwise.engine.divergence import Reference, kl_per_token, top1_agreement
from layerwise.engine.replay import final_states_streamed, paired_head
from layerwise.errors import LayerwiseError
from layerwise.models.loading import LoadedModel
from layerwise.util.progress import progress_bars


@dataclass(frozen=True)
class PromptDivergence:
    prompt: str
    tokens: int  # predicted positions
    kl: float  # mean KL(base || other) over the prompt's positions
    max_kl: float  # the largest single-position KL
    top1: float
    robust_z: float = 0.0
    flagged: bool = False

    def to_dict(self) -> dict:
        return asdict(self)


def read_prompts(path: str | Path) -> list[str]:
    """One prompt per non-empty line."""
    path = Path(path)
    if not path.is_file():
        raise LayerwiseError(f"prompts file {path} does not exist")
    try:
        prompts = [line.strip() for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    except UnicodeDecodeError as error:
        raise LayerwiseError(f"prompts file {path} is not UTF-8 text ({error.reason} at byte {error.start})") from None
    if len(prompts) < 3:
        raise LayerwiseError(f"{path} has {len(prompts)} prompts; outliers need at least 3 (one per line)")
    return prompts


def encode_prompts(loaded: LoadedModel, prompts: list[str], max_tokens: int = 512) -> list[torch.Tensor]:
    bos = bos_policy(loaded.tokenizer)
    encoded = []
    for prompt in prompts:
        ids = loaded.tokenizer(prompt, add_special_tokens=False)["input_ids"][: max_tokens - (bos is not None)]
        ids = ([bos] if bos is not None else []) + list(ids)
        if len(ids) < 2:
            raise LayerwiseError(f"prompt {prompt[:40]!r} has fewer than 2 tokens; nothing to predict")
        encoded.append(torch.tensor([ids]))
    return encoded


@torch.no_grad()
def base_references(loaded: LoadedModel, encoded: list[torch.Tensor]) -> list[Reference]:
    return [Reference.from_logits(loaded.model(input_ids=ids.to(loaded.input_device), use_cache=False).logits[:, :-1])
            for ids in encoded]


@torch.no_grad()
def compare(loaded: LoadedModel, prompts: list[str], encoded: list[torch.Tensor], references: list[Reference],
            threshold: float = 5.0, min_ratio: float = 3.0) -> list[PromptDivergence]:
    """Each prompt's divergence of `loaded` (as it is now) from the references, outliers flagged."""
    rows = []
    for prompt, ids, reference in zip(prompts, encoded, references):
        logits = loaded.model(input_ids=ids.to(loaded.input_device), use_cache=False).logits[:, :-1]
        kl = kl_per_token(reference, logits)
        rows.append(PromptDivergence(prompt, kl.numel(), kl.mean().item(), kl.max().item(),
                                     top1_agreement(reference, logits).mean().item()))
    return flag_outliers(rows, threshold, min_ratio)


def flag_outliers(rows: list[PromptDivergence], threshold: float = 5.0, min_ratio: float = 3.0) -> list[PromptDivergence]:
    values = [row.kl for row in rows]
    median = statistics.median(values)
    spread = 1.4826 * statistics.median(abs(v - median) for v in values) or max(median, 1e-12) * 1e-3
    flagged = []
    for row in rows:
        z = (row.kl - median) / spread
        outlier = z > threshold and row.kl > min_ratio * median
        flagged.append(PromptDivergence(row.prompt, row.tokens, row.kl, row.max_kl, row.top1, z, outlier))
    return flagged


@torch.no_grad()
def compare_streamed_prompts(loaded: LoadedModel, prompts: list[str], encoded: list[torch.Tensor],
                             threshold: float = 5.0, min_ratio: float = 3.0,
                             progress: bool = True) -> list[PromptDivergence]:
    """`compare` for a streamed model whose overrides (quantized weights) are the other model: the
    base (the checkpoint as it is) and the quantized model each run block by block over all
    prompts, a block read once for each, then side by side at the head a chunk of positions at a
    time (the distributions of one chunk at most, never a prompt's whole)."""
    rows = []
    with progress_bars(progress) as bars:
        task = bars.add_task("base and quantized", total=2 * loaded.n_blocks + len(encoded))
        base_final, final = final_states_streamed(loaded, encoded, after_block=lambda: bars.advance(task))
        for prompt, base_state, state in zip(prompts, base_final, final):
            kl, top1 = [], 0.0
            for _, _, base_logits, logits in paired_head(loaded, base_state[0], state[0]):
                reference = Reference.from_logits(base_logits)
                kl.append(kl_per_token(reference, logits))
                top1 += top1_agreement(reference, logits).double().sum().item()
            kl = torch.cat(kl)
            rows.append(PromptDivergence(prompt, kl.numel(), kl.mean().item(), kl.max().item(), top1 / kl.numel()))
            bars.advance(task)
    return flag_outliers(rows, threshold, min_ratio)


def run_diverge(base: str | Path, quantized: str | Path, prompts: str | Path, *, threshold: float = 5.0,
                min_ratio: float = 3.0, dtype: str = "auto", device: str = "cpu", device_map: str | None = None,
                streaming: bool | None = False, progress: bool = True) -> list[PromptDivergence]:
    """`layerwise diverge`: the base model against a directory written by `layerwise quantize`.

    With `streaming`, one block at a time is read from disk (`compare_streamed_prompts`); None
    streams only a model that would not fit in memory."""
    from layerwise.models.loading import load_model
    from layerwise.apply.storage import apply_quantized, load_quantized

    texts = read_prompts(prompts)
    # A bad directory fails before the model loads; the codes stay on disk until a block loads.
    document, stored = load_quantized(quantized, lazy=True)
    loaded = load_model(base, dtype=dtype, device=device, device_map=device_map, streaming=streaming)
    encoded = encode_prompts(loaded, texts)
    if loaded.streamed is not None:
        loaded.set_tokenizer_aside()  # the prompts are tokenized; streamed, every MB left counts
        apply_quantized(loaded, document, stored)
        return compare_streamed_prompts(loaded, texts, encoded, threshold, min_ratio, progress)
    references = base_references(loaded, encoded)
    apply_quantized(loaded, document, stored)
    return compare(loaded, texts, encoded, references, threshold, min_ratio)
