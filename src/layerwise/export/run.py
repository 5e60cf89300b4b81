"""`layerwise export` from Python: quantize by a plan (or load a quantized directory), then write
a format another program loads."""
from __future__ import annotations

import json
import tempfile
from pathlib import Path

from layerwise.data.domains import Calibration
from layerwise.errors import LayerwiseError
from layerwise.models.loading import load_model, resolve_source
from layerwise.plan.plan import Plan
from layerwise.util.files import check_output

EXPORT_FORMATS = ("gguf", "hf", "compressed-tensors")


def run_export(
    model: str | Path,
    *,
    format: str = "gguf",
    out: str | Path,
    overwrite: bool = False,
    plan: Plan | str | Path | None = None,
    quantized: str | Path | None = None,
    calib: Calibration = None,
    tokens: int = 16384,
    dtype: str = "auto",
    device: str = "cpu",
    converter: str | Path | None = None,
    imatrix: str | Path | None = None,
    streaming: bool | None = False,
    progress: bool = True,
) -> dict:
    """"gguf": one GGUF file with the plan's type per tensor (the plan must use GGUF types).
    "hf": a plain Hugging Face folder holding the dequantized weights, loadable anywhere, with
    plan.json beside them. "compressed-tensors": a packed folder (int codes packed into int32,
    fp16 scales, bits and group size per module) that transformers and vLLM load.

    GGUF from a Hugging Face model (folder or hub id) first converts it with llama.cpp's
    convert_hf_to_gguf.py (`converter`: the script or its llama.cpp folder; default
    $LAYERWISE_CONVERT_HF_TO_GGUF or PATH) into a temporary file whose metadata, tokenizer and
    untouched tensors are copied. `imatrix` weights a plan's GGUF types as `llama-quantize
    --imatrix` does (for --quantized, the importance matrix was given to `quantize`).

    `device` is where quantization runs (GGUF's byte packing runs in numpy on the CPU).
    `streaming` quantizes one block at a time from disk (`load_model(streaming=True)`); GGUF only,
    whose file is written from the stored codes and the source file's other tensors (None: a GGUF
    export streams when the model would not fit in memory)."""
    if format not in EXPORT_FORMATS:
        raise LayerwiseError(f"unknown export format {format!r}; choose from {', '.join(EXPORT_FORMATS)}")
    if streaming and format != "gguf":
        raise LayerwiseError(f"--streaming export writes GGUF only; {format} is written from the whole model in memory")
    if format != "gguf":
        streaming = False  # never chosen on its own for a format written from the whole model
    if (plan is None) == (quantized is None):
        raise LayerwiseError("give either --plan or --quantized")
    out = Path(out)
    check_output(out, overwrite, directory=format != "gguf")
    source = resolve_source(model)
    if format == "gguf" and source.kind != "gguf":
        from layerwise.export.convert import find_converter

        converter = find_converter(converter)  # before any quantization work
    if out.exists() and (out.is_dir() != (format != "gguf")):
        raise LayerwiseError(f"{out} exists and is a {'folder' if out.is_dir() else 'file'}; "
                             f"{format} export writes a {'file' if format == 'gguf' else 'folder'}")
    if quantized is not None and imatrix is not None:
        raise LayerwiseError("--imatrix goes with --plan (quantized now); a --quantized folder was quantized "
                             "already: pass the importance matrix to `layerwise quantize`")
    if quantized is not None:
        from layerwise.quant.storage import apply_quantized, load_quantized

        document, stored = load_quantized(quantized)
        loaded = load_model(model, dtype=dtype, device=device, streaming=streaming)
        apply_quantized(loaded, document, stored)
        plan = Plan.load(Path(quantized) / "plan.json")
        dropped = document["meta"].get("dropped_modules", [])
        sizes = document["meta"].get("sizes")
    else:
        from layerwise.quant.run import run_quantize

        plan = plan if isinstance(plan, Plan) else Plan.load(plan)
        loaded = load_model(model, dtype=dtype, device=device, streaming=streaming)
        if format == "compressed-tensors":
            from layerwise.export.compressed import check_plan_representable
            from layerwise.quant.apply import plan_targets

            check_plan_representable(plan_targets(loaded, plan))  # before any quantization work
        loaded, stored, sizes = run_quantize(loaded, plan, calib=calib, tokens=tokens, imatrix=imatrix,
                                             progress=progress)
        from layerwise.quant.apply import plan_dropped

        dropped = plan_dropped(loaded, plan)
    if format == "gguf":
        from layerwise.export.gguf import check_gguf_exportable, export_gguf

        if source.kind == "gguf":
            report = export_gguf(loaded, stored, out, dropped)
        else:
            from layerwise.export.convert import convert_to_gguf

            check_gguf_exportable(stored, dropped)  # before converting
            with tempfile.TemporaryDirectory(prefix="layerwise-convert-") as scratch:
                converted = convert_to_gguf(source, Path(scratch) / "converted.gguf", loaded.model.dtype, converter)
                report = export_gguf(loaded, stored, out, dropped, source=converted)
            report["converted_by"] = str(converter)
        _check_no_larger(plan, out, report)
    elif format == "compressed-tensors":
        from layerwise.export.compressed import export_compressed_tensors

        report = export_compressed_tensors(loaded, stored, out)
    else:
        from layerwise.models.saving import save_plain

        save_plain(loaded, out, {"plan.json": json.dumps(plan.to_dict(), indent=1) + "\n"})
        report = {"path": str(out), "file_bytes": sum(p.stat().st_size for p in out.iterdir())}
    report["predicted_sizes"] = sizes
    from layerwise.quant.apply import plan_fallbacks

    report["fallbacks"] = plan_fallbacks(loaded, plan)
    return report


def _check_no_larger(plan: Plan, out: Path, report: dict) -> None:
    """A plan made to be no larger than a reference GGUF (`plan --budget-like`) must give a file no
    larger than it: our metadata comes from our own source GGUF, which could be longer than the
    reference's. A larger file is removed, not left half right."""
    like = ((plan.meta or {}).get("provenance") or {}).get("budget_like")
    if not like:
        return
    report["reference"] = {"file": like["file"], "file_bytes": like["file_bytes"]}
    if report["file_bytes"] > like["file_bytes"]:
        out.unlink(missing_ok=True)
        raise LayerwiseError(f"the GGUF would be {report['file_bytes']:,} bytes, {report['file_bytes'] - like['file_bytes']:,} "
                             f"more than {Path(like['file']).name} ({like['file_bytes']:,}), which the plan was made to "
                             "match: the source's metadata or untouched tensors are larger than the reference's; nothing "
                             "was written")
