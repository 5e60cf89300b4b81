"""`layerwise quantize` from Python: load, calibrate if needed, quantize, size, save."""
from __future__ import annotations

import sys
from pathlib import Path
from typing import Any, Mapping

from layerwise.apply.quantize import plan_dropped, plan_fallbacks, plan_targets, quantize_
from layerwise.apply.storage import StoredModules, save_quantized
from layerwise.data.domains import Calibration, calibration_domains, calibration_windows
from layerwise.data.windows import TokenWindows
from layerwise.errors import LayerwiseError
from layerwise.models.loading import LoadedModel, load_model
from layerwise.plan.plan import Plan
from layerwise.quant.imatrix import Imatrix, collect_imatrix, imatrix_applies, importance_for
from layerwise.quant.qtensor import QTensor
from layerwise.quant.size import size_report
from layerwise.util.files import check_output
from layerwise.util.meta import file_fingerprint, run_metadata

# Calibration tokens GPTQ and AWQ fit on by default (128 windows of 512; fewer when the text holds
# fewer). Chosen on held-out text (README, "Against llama-quantize"): against 16384 tokens, GPTQ onto
# GGUF grids fitted on 65536 of the shipped mix lowered SmolLM2's held-out KL at every percentile.
QUANTIZE_TOKENS = 65536


def run_quantize(
    model: str | Path | LoadedModel,
    plan: Plan | str | Path,
    *,
    calib: Calibration = None,
    tokens: int | None = None,
    seq_len: int = 512,
    seed: int = 0,
    out: str | Path | None = None,
    overwrite: bool = False,
    imatrix: str | Path | Imatrix | None = None,
    dtype: str = "auto",
    device: str = "cpu",
    device_map: str | None = None,
    streaming: bool | None = False,
    progress: bool = True,
) -> tuple[LoadedModel, Mapping[str, QTensor], dict]:
    """Quantize `model` by `plan` (a Plan or a plan.json path). Returns the quantized model, the
    stored form of each module and the size report; with `out`, writes them there. `imatrix` (a
    file llama-imatrix or `layerwise imatrix` wrote) weights the GGUF types' rounding by each
    input column's mean square, as `llama-quantize --imatrix` does; without one (given or recorded
    in the plan), one is collected on the calibration windows before quantizing, when `calib` is
    given or GPTQ/AWQ draw windows anyway. `calib`: one file, several (one domain each), or None
    for the shipped mix of prose, code, verse and tables that `plan` calibrates on by default;
    GPTQ and AWQ fit on `tokens` of it. `streaming` reads one block at a time from disk (the model
    returned then holds the quantized weights as overrides, decoded as each block loads, and the
    stored forms are a `StoredModules` that reads them from a scratch file; None: only when the
    model would not fit in memory)."""
    if out is not None:
        check_output(out, overwrite, directory=True)
    if not isinstance(plan, Plan):
        plan = Plan.load(plan)
    loaded = model if isinstance(model, LoadedModel) else load_model(model, dtype=dtype, device=device,
                                                                      device_map=device_map, streaming=streaming)
    if plan.model_fingerprint and plan.model_fingerprint != loaded.fingerprint:
        raise LayerwiseError(f"the plan was made for a model with fingerprint {plan.model_fingerprint[:16]}..., "
                             f"not {loaded.source.display}")
    targets = plan_targets(loaded, plan)
    dropped = plan_dropped(loaded, plan)
    windows = None
    if needs_calibration(targets):
        windows = quantize_windows(loaded.tokenizer, calib, tokens, seq_len=seq_len, seed=seed, progress=progress)
    else:
        # Validate every module's shape before any work (group sizes, GGUF block sizes).
        size_report(loaded, targets, dropped)
    if imatrix is None and _planned(plan) is None and (calib is not None or windows is not None) and \
            any(imatrix_applies(config) for config in targets.values()):
        # Calibration text and GGUF types rounded to nearest: weight them by an importance matrix
        # of that text, as llama-quantize --imatrix would (llama.cpp users always make one).
        windows_for_imatrix = windows or quantize_windows(loaded.tokenizer, calib, tokens, seq_len=seq_len, seed=seed,
                                                          progress=progress)
        imatrix = collect_imatrix(loaded, windows_for_imatrix, include_output=True, progress=progress)
        imatrix.datasets = [str(text) for text in calibration_domains(calib).values()]
    importance, imatrix_record = _importance(loaded, targets, imatrix, _planned(plan))
    if loaded.streamed is not None:
        loaded.set_tokenizer_aside()  # the text is tokenized; streamed, every MB left counts
    # Streamed, the stored forms wait on disk beside the output (the system's temporary folder without one).
    quantized = quantize_(loaded, plan, windows, importance=importance, progress=progress,
                          spill_to=None if out is None else Path(out).resolve().parent)
    sizes = size_report(loaded, quantized.configs() if isinstance(quantized, StoredModules) else quantized, dropped)
    meta = run_metadata() | {"model": loaded.describe(), "calibration": windows.describe() if windows else None,
                             "sizes": sizes, "drop": list(plan.drop), "dropped_modules": dropped,
                             "fallbacks": plan_fallbacks(loaded, plan), "imatrix": imatrix_record}
    if out is not None:
        save_quantized(out, plan, quantized, meta)
    return loaded, quantized, sizes


def quantize_windows(tokenizer: Any, calib: Calibration, tokens: int | None, *, seq_len: int = 512, seed: int = 0,
                     progress: bool = False) -> TokenWindows:
    """The windows GPTQ and AWQ fit on: `tokens` of the calibration text, or with None the default
    size (`QUANTIZE_TOKENS`), or all the text holds where that is less (said when `progress`)."""
    windows = calibration_windows(tokenizer, calib, tokens=tokens or QUANTIZE_TOKENS, seq_len=seq_len, seed=seed,
                                  at_most=tokens is None)
    taken = windows.input_ids.numel()
    if tokens is None and progress and taken < QUANTIZE_TOKENS:
        print(f"calibration: the text holds {taken:,} tokens in whole windows, fewer than the default "
              f"{QUANTIZE_TOKENS:,}; fitting on all of them", file=sys.stderr)
    return windows


def needs_calibration(targets: dict) -> bool:
    """Whether quantizing `targets` (module -> config) fits anything to calibration text (GPTQ, AWQ)."""
    return any(config.algorithm != "rtn" for config in targets.values())


def _importance(loaded: LoadedModel, targets: dict, imatrix: str | Path | Imatrix | None,
                planned: dict | None) -> tuple[dict, dict | None]:
    """Column weights for the plan's block linears in GGUF types rounded to nearest, and what the
    quantization record says of the importance matrix: `imatrix` as given, else the one the plan
    was measured with (`planned`, its record in the plan)."""
    if imatrix is None and planned is None:
        return {}, None
    from layerwise.models.layout import block_linears

    blocks = {name for _, name, _ in block_linears(loaded.model, loaded.adapter)}
    gguf_rtn = [name for name, config in targets.items() if imatrix_applies(config)]
    if not gguf_rtn:
        if imatrix is None:  # the plan's own importance matrix, which nothing in the plan as it now is uses
            return {}, {"file": planned.get("file"), "from_plan": True, "modules": 0}
        raise LayerwiseError("an importance matrix weights GGUF block types rounded to nearest (q4_k, q5_0, ...; GPTQ "
                             "options use their Hessians), and this plan quantizes no module that way")
    if imatrix is None:
        if not isinstance(planned.get("file"), str) or not isinstance(planned.get("sha256"), str):
            raise LayerwiseError("the plan's record of its importance matrix (meta.provenance.imatrix) lacks 'file' or "
                                 "'sha256'; pass --imatrix")
        imatrix = planned["file"]
        if not Path(imatrix).is_file():
            raise LayerwiseError(f"the plan was measured with the importance matrix {imatrix}, which is gone; pass "
                                 "--imatrix (the same file) to quantize as the plan was measured")
        if file_fingerprint(imatrix) != planned["sha256"]:
            raise LayerwiseError(f"the importance matrix {imatrix} changed since the plan was measured with it; pass "
                                 "--imatrix to quantize with another one")
    found = imatrix if isinstance(imatrix, Imatrix) else Imatrix.load(imatrix)
    # As llama-quantize: block linears need an entry. The output head (or the embedding tied to
    # it) is weighted by the head's entry where the file has one (llama-imatrix leaves it out
    # unless asked); an untied embedding is rounded without one.
    weighted = [name for name in gguf_rtn if name in blocks]
    importance = {name: values for name, values in importance_for(loaded, found, weighted, head=True).items()
                  if name in gguf_rtn}
    record = {"file": None if isinstance(imatrix, Imatrix) else str(imatrix), "datasets": found.datasets,
              "chunk_count": found.chunk_count, "chunk_size": found.chunk_size, "modules": len(importance),
              "from_plan": planned is not None and imatrix == planned.get("file")}
    return importance, record


def _planned(plan: Plan) -> dict | None:
    """The importance matrix a plan from `layerwise plan --imatrix` was measured with."""
    provenance = (plan.meta or {}).get("provenance") or {}
    return provenance.get("imatrix") if isinstance(provenance, dict) else None
