"""`layerwise eval` from Python: quality of a quantized model against its base, on evaluation text."""
from __future__ import annotations

import contextlib
import sys
from pathlib import Path
from typing import Sequence

from layerwise.apply.storage import StoredModules, apply_quantized, load_quantized
from layerwise.data.domains import Calibration, calibration_domains
from layerwise.data.overlap import calibrations_of, check_held_out
from layerwise.data.windows import read_text, token_windows
from layerwise.errors import LayerwiseError
from layerwise.evaluate.quality import base_outputs, compare_streamed, evaluate
from layerwise.models.loading import load_model
from layerwise.plan.plan import Plan
from layerwise.quant.activations import check_emulation
from layerwise.quant.size import size_report
from layerwise.util.meta import run_metadata, sha256_text


def run_eval(
    model: str | Path,
    *,
    data: str | Path,
    quantized: str | Path | None = None,
    plan: Plan | str | Path | None = None,
    calib: Calibration = None,
    tokens: int = 40 * 512,
    seq_len: int = 512,
    dtype: str = "auto",
    device: str = "cpu",
    device_map: str | None = None,
    batch_size: int = 4,
    schedule: Sequence[int] | None = None,
    streaming: bool | None = False,
    emulate: str = "float",
    progress: bool = True,
) -> dict:
    """Perplexity of the base model and, with `quantized` (a directory written by `layerwise
    quantize`) or `plan` (quantized on the fly), its perplexity, KL and top-1 agreement.

    Evaluation uses the first `tokens` of `data` in non-overlapping windows; text used for
    calibration is refused. With `schedule` (block indices, skips and repeats allowed), the
    model runs its blocks in that order instead (no weights written), and is judged against
    the model as it is. With `streaming`, one block at a time is read from disk: the base and
    quantized models each run block by block over all windows, one window at a time
    (`batch_size` applies in memory only), then side by side at the head (`compare_streamed`);
    None streams only a model that would not fit in memory. `emulate` ("float" or "llama-cpu",
    `layerwise.quant.activations`): "llama-cpu" rounds the inputs of every GGUF-typed linear as
    llama.cpp's CPU backend does, so the KL is the one `llama-perplexity --kl-divergence` finds
    (in memory only)."""
    if quantized is not None and plan is not None:
        raise LayerwiseError("pass either --quantized or --plan, not both")
    check_emulation(emulate)
    if emulate != "float" and quantized is None and plan is None:
        raise LayerwiseError(f"--emulate {emulate} rounds the inputs of quantized linears: give --quantized or --plan")
    loaded = load_model(model, dtype=dtype, device=device, device_map=device_map, streaming=streaming)
    if emulate != "float" and loaded.streamed is not None:
        raise LayerwiseError(f"--emulate {emulate} is not supported for a streamed model yet; evaluate it in memory")
    windows = token_windows(loaded.tokenizer, data, tokens=tokens, seq_len=seq_len, seed=None)
    # Streamed, the codes stay on disk until their block loads.
    document, stored = (load_quantized(quantized, lazy=loaded.streamed is not None) if quantized is not None
                        else (None, None))
    if plan is not None and not isinstance(plan, Plan):
        plan = Plan.load(plan)
    plan_meta = plan.meta if plan is not None else None
    if quantized is not None and (Path(quantized) / "plan.json").is_file():
        plan_meta = Plan.load(Path(quantized) / "plan.json").meta
    calibrations = calibrations_of(plan_meta, (document or {}).get("meta"))
    from layerwise.apply.quantize import plan_targets
    from layerwise.apply.run import needs_calibration, quantize_windows

    if plan is not None and (calib is not None or needs_calibration(plan_targets(loaded, plan))):
        calibrations["quantization statistics"] = quantize_windows(loaded.tokenizer, calib, None).describe()
    elif calib is not None:
        for name, text in calibration_domains(calib).items():
            calibrations[f"--calib {name}"] = {"source": str(text), "text_sha256": sha256_text(read_text(text)[0])}
    if calibrations:
        for warning in check_held_out(loaded.tokenizer, windows, str(data), calibrations):
            print(f"warning: {warning}", file=sys.stderr)
    if loaded.streamed is not None:
        loaded.set_tokenizer_aside()  # the text is tokenized; streamed, every MB left counts
    from layerwise.prune.depth import check_schedule, schedule as run_in_order

    def variant() -> contextlib.AbstractContextManager:
        return run_in_order(loaded, schedule) if schedule is not None else contextlib.nullcontext()

    report = {"meta": run_metadata(), "model": loaded.describe(), "data": windows.describe()}
    # In memory, the base's outputs are cached first, so the same model object is then quantized
    # in place: no copy. Streamed, quantizing leaves overrides that the base pass ignores.
    streaming = loaded.streamed is not None  # also when chosen for a model too large to load
    base = None if streaming else base_outputs(loaded, windows, batch_size=batch_size, progress=progress)
    if stored is not None:
        apply_quantized(loaded, document, stored)
        report["sizes"] = size_report(loaded, stored.configs() if isinstance(stored, StoredModules) else stored,
                                      document["meta"].get("dropped_modules", ()))
    elif plan is not None:
        from layerwise.apply.run import run_quantize

        report["sizes"] = run_quantize(loaded, plan, calib=calib, progress=progress)[2]
    rounding = contextlib.nullcontext()
    if emulate != "float":
        from layerwise.apply.quantize import input_rounding_for, plan_targets

        targets = (stored.configs() if isinstance(stored, StoredModules) else stored) if stored is not None \
            else plan_targets(loaded, plan)
        rounding = input_rounding_for(loaded, targets, emulate)
        report["emulation"] = emulate
    compared = stored is not None or plan is not None or schedule is not None
    if streaming:
        order = None if schedule is None else check_schedule(schedule, loaded.n_blocks)
        base_quality, quality = compare_streamed(loaded, windows, compare=compared, order=order, progress=progress)
    else:
        base_quality = base.quality
        if compared:
            with variant(), rounding:
                quality = evaluate(loaded, base, progress=progress)
    report["base"] = base_quality.to_dict()
    if compared:
        report["quantized"] = quality.to_dict()
        if schedule is not None:
            report["schedule"] = list(schedule)
    return report
