"""`layerwise export` from Python: quantize by a plan (or load a quantized directory), then write
a format another program loads."""
from __future__ import annotations

from pathlib import Path

from layerwise.apply.quantize import plan_dropped, plan_fallbacks, plan_targets
from layerwise.apply.run import run_quantize
from layerwise.apply.storage import apply_quantized, load_quantized
from layerwise.data.domains import Calibration
from layerwise.errors import LayerwiseError
from layerwise.export import EXPORTERS, ExportJob, exporter_named
from layerwise.models.loading import load_model, resolve_source
from layerwise.plan.plan import Plan
from layerwise.util.files import check_output


def run_export(
    model: str | Path,
    *,
    format: str = "gguf",
    out: str | Path,
    overwrite: bool = False,
    plan: Plan | str | Path | None = None,
    quantized: str | Path | None = None,
    calib: Calibration = None,
    tokens: int | None = None,
    dtype: str = "auto",
    device: str = "cpu",
    device_map: str | None = None,
    converter: str | Path | None = None,
    imatrix: str | Path | None = None,
    streaming: bool | None = False,
    progress: bool = True,
) -> dict:
    """`format` names an exporter (`layerwise.export.EXPORTERS`): "gguf", one GGUF file with the
    plan's type per tensor (the plan must use GGUF types); "hf", a plain Hugging Face folder holding
    the dequantized weights, loadable anywhere, with plan.json beside them; "compressed-tensors", a
    packed folder (int codes packed into int32, fp16 scales, bits and group size per module) that
    transformers and vLLM load.

    GGUF from a Hugging Face model (folder or hub id) first converts it with llama.cpp's
    convert_hf_to_gguf.py (`converter`: the script or its llama.cpp folder; default
    $LAYERWISE_CONVERT_HF_TO_GGUF or PATH) into a temporary file whose metadata, tokenizer and
    untouched tensors are copied. `imatrix` weights a plan's GGUF types as `llama-quantize
    --imatrix` does (for --quantized, the importance matrix was given to `quantize`).

    `device` is where quantization runs (GGUF's byte packing runs in numpy on the CPU).
    `streaming` quantizes one block at a time from disk (`load_model(streaming=True)`), for the
    formats whose exporter writes one part of the model at a time (all three: GGUF with the source
    file's other tensors, compressed-tensors and hf with each part held in turn); None: such an
    export streams when the model would not fit in memory."""
    exporter = exporter_named(format)
    if streaming and not exporter.streams:
        raise LayerwiseError(f"--streaming export writes {', '.join(n for n, e in EXPORTERS.items() if e.streams)} "
                             f"only; {format} is written from the whole model in memory")
    if not exporter.streams:
        streaming = False  # never chosen on its own for a format written from the whole model
    if (plan is None) == (quantized is None):
        raise LayerwiseError("give either --plan or --quantized")
    out = Path(out)
    check_output(out, overwrite, directory=exporter.folder)
    source = resolve_source(model)
    if exporter.prepare is not None:
        converter = exporter.prepare(source, converter)  # before any quantization work
    if out.exists() and out.is_dir() != exporter.folder:
        raise LayerwiseError(f"{out} exists and is a {'folder' if out.is_dir() else 'file'}; "
                             f"{format} export writes a {'folder' if exporter.folder else 'file'}")
    if quantized is not None and imatrix is not None:
        raise LayerwiseError("--imatrix goes with --plan (quantized now); a --quantized folder was quantized "
                             "already: pass the importance matrix to `layerwise quantize`")
    if quantized is not None:
        document, stored = load_quantized(quantized)
        loaded = load_model(model, dtype=dtype, device=device, device_map=device_map, streaming=streaming)
        apply_quantized(loaded, document, stored)
        plan = Plan.load(Path(quantized) / "plan.json")
        dropped = document["meta"].get("dropped_modules", [])
        sizes = document["meta"].get("sizes")
    else:
        plan = plan if isinstance(plan, Plan) else Plan.load(plan)
        loaded = load_model(model, dtype=dtype, device=device, device_map=device_map, streaming=streaming)
        if exporter.check_targets is not None:
            exporter.check_targets(plan_targets(loaded, plan))  # before any quantization work
        loaded, stored, sizes = run_quantize(loaded, plan, calib=calib, tokens=tokens, imatrix=imatrix,
                                             progress=progress)
        dropped = plan_dropped(loaded, plan)
    report = exporter.write(ExportJob(loaded, stored, dropped, plan, source, out, converter))
    report["predicted_sizes"] = sizes
    report["fallbacks"] = plan_fallbacks(loaded, plan)
    return report
