"""`layerwise compress`: the whole job in one command, each step's result kept in one folder.

profile -> importance matrix (GGUF) -> sensitivity table -> plan -> quantize and export ->
evaluation -> report. Every step writes its artifact atomically and is skipped when the artifact
is already there and no step before it was redone, so a run that was interrupted goes on where it
stopped (the sensitivity table also resumes inside itself); `compress.json` holds the settings, and a folder made with other
settings is refused rather than mixed.
"""
from __future__ import annotations

import json
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

from layerwise.data.domains import Calibration, calibration_domains
from layerwise.errors import LayerwiseError
from layerwise.util.files import check_writable_dir, write_text_atomic
from layerwise.util.meta import run_metadata

SCHEMA = "layerwise.compress"
# GGUF types llama.cpp runs, for GGUF files; K-quants apply where rows are multiples of 256.
GGUF_OPTIONS = "q4_0,q5_0,q8_0,q3_k,q4_k,q5_k,q6_k"
IMATRIX_CHUNKS = 100
# The share of the measured table's passes `auto`'s table may cost here, less than `plan`'s
# REFINE_SHARE (whose plans bench/sensitivity.py judged) so that SmolLM2 keeps well within the 10
# minutes `compress` is for (bench/compress.py: the refinement there is about 10 passes, 85 s).
COMPRESS_REFINE = 0.05


@dataclass
class CompressOutcome:
    out: Path
    artifacts: dict[str, Path]  # step -> what it wrote
    reused: list[str] = field(default_factory=list)  # steps whose artifact was there already
    seconds: dict[str, float] = field(default_factory=dict)


def _artifacts(out: Path, format: str, folder: bool, evaluating: bool) -> dict[str, Path]:
    paths = {"profile": out / "profile", "imatrix": out / "imatrix.gguf", "plan": out / "plan.json",
             "export": out / ("model" if folder else f"model.{format}"),
             "eval": out / "eval.json", "report": out / "report.html"}
    if format != "gguf":
        del paths["imatrix"]
    if not evaluating:
        del paths["eval"]
    return paths


def _settings(model, bits_per_weight, budget_like, format, options, estimator, refine, calib, eval_data,
              eval_tokens, tokens, check_tokens) -> dict:
    domains = {name: str(text) for name, text in calibration_domains(calib).items()}
    return {"model": str(model), "bits_per_weight": bits_per_weight,
            "budget_like": str(budget_like) if budget_like is not None else None, "format": format,
            "options": options, "estimator": estimator, "refine": refine, "calibration": domains,
            "eval_data": str(eval_data) if eval_data is not None else None, "eval_tokens": eval_tokens,
            "tokens": tokens, "check_tokens": check_tokens}


def _claim(out: Path, settings: dict, overwrite: bool) -> None:
    """Make `out` this run's folder: new, empty, or holding a run with the same settings."""
    manifest = out / "compress.json"
    if out.exists() and any(out.iterdir()) and not overwrite:
        if not manifest.is_file():
            raise LayerwiseError(f"output {out} already exists and is not a compress folder; give another --out "
                                 "or pass --overwrite")
        earlier = json.loads(manifest.read_text()).get("settings")
        if earlier != settings:
            changed = sorted(key for key in settings if settings[key] != (earlier or {}).get(key))
            raise LayerwiseError(f"{out} holds a compress run with other settings ({', '.join(changed)}); give "
                                 "another --out, or pass --overwrite to start it afresh")
    if overwrite and out.exists():
        shutil.rmtree(out)
    check_writable_dir(out)
    out.mkdir(parents=True, exist_ok=True)
    if not manifest.is_file():
        write_text_atomic(manifest, json.dumps({"schema": SCHEMA, "schema_version": 1, "settings": settings,
                                                "meta": run_metadata()}, indent=1) + "\n")


def run_compress(
    model: str | Path,
    *,
    out: str | Path,
    bits_per_weight: float | None = None,
    budget_like: str | Path | None = None,
    format: str = "gguf",
    options: str | Sequence[str] | None = None,
    estimator: str = "auto",
    refine: float | None = None,
    calib: Calibration = None,
    eval_data: str | Path | None = None,
    eval_tokens: int = 40 * 512,
    tokens: int = 4096,
    check_tokens: int = 4096,
    overwrite: bool = False,
    dtype: str = "auto",
    device: str = "cpu",
    device_map: str | None = None,
    streaming: bool | None = False,
    progress: bool = True,
) -> CompressOutcome:
    """Compress `model` to a budget (`bits_per_weight` of the block linears, or no larger than the
    GGUF file `budget_like`) and write everything under `out`: profile/, imatrix.gguf (GGUF),
    sensitivity.json, plan.json (+ plan.report.json), model.gguf or model/ (the `format`),
    eval.json (with `eval_data`, which must not be calibration text) and report.html. Options
    default to llama.cpp's types for GGUF and to `plan`'s for the other formats. `refine`: the share
    of the measured table's passes an estimated table may cost (`run_plan`; None: COMPRESS_REFINE
    with the "auto" estimator, else 0). `streaming` reads one block at a time from disk for every
    step (None: when the model would not fit in memory); the results are those of a run in memory."""
    from layerwise.export import exporter_named
    from layerwise.export.run import run_export
    from layerwise.measure.estimators import estimator_named
    from layerwise.measure.run import DEFAULT_OPTIONS
    from layerwise.measure.refine import check_share

    if sum(budget is not None for budget in (bits_per_weight, budget_like)) != 1:
        raise LayerwiseError("give exactly one budget: bits per weight or a GGUF file to be no larger than "
                             "(--budget, --budget-like)")
    exporter = exporter_named(format)
    if budget_like is not None and format != "gguf":
        raise LayerwiseError("--budget-like sizes a GGUF file; it needs --format gguf")
    estimator_named(estimator)
    if eval_data is not None and not Path(eval_data).is_file():
        raise LayerwiseError(f"evaluation text {eval_data} not found")
    options = options or (GGUF_OPTIONS if format == "gguf" else DEFAULT_OPTIONS)
    if refine is None:
        refine = COMPRESS_REFINE if estimator == "auto" else 0.0
    check_share(refine)
    out = Path(out)
    settings = _settings(model, bits_per_weight, budget_like, format, options if isinstance(options, str)
                         else ",".join(options), estimator, refine, calib, eval_data, eval_tokens, tokens,
                         check_tokens)
    _claim(out, settings, overwrite)
    paths = _artifacts(out, format, exporter.folder, eval_data is not None)
    outcome = CompressOutcome(out, paths)

    from layerwise.models.loading import load_model

    loaded = load_model(model, dtype=dtype, device=device, device_map=device_map, streaming=streaming)
    streaming = loaded.streamed is not None  # the steps that load the model again load it the same way

    redone = []

    def step(name: str, make) -> None:
        """Skip a step whose artifact is there, unless an earlier step was redone (it may feed it)."""
        if paths[name].exists():
            if not redone:
                outcome.reused.append(name)
                return
            shutil.rmtree(paths[name]) if paths[name].is_dir() else paths[name].unlink()
        redone.append(name)
        if progress:
            print(f"layerwise compress: {name} ...", flush=True)
        started = time.perf_counter()
        make(paths[name])
        outcome.seconds[name] = time.perf_counter() - started

    from layerwise.profile.runner import run_profile

    step("profile", lambda path: run_profile(loaded, None, tokens=tokens, out=path, progress=progress))
    if "imatrix" in paths:
        from layerwise.quant.imatrix import run_imatrix

        domains = calibration_domains(calib)
        # llama-imatrix reads one text; the prose domain (or the first) stands for all, as users run it.
        text = domains.get("prose", next(iter(domains.values())))
        # With the head's entry: it weights the embedding/head unit of a --budget-like plan.
        step("imatrix", lambda path: run_imatrix(loaded, data=text, out=path, chunks=IMATRIX_CHUNKS,
                                                 include_output=True, progress=progress))
    from layerwise.measure.run import run_plan

    step("plan", lambda path: run_plan(
        loaded, bits_per_weight=bits_per_weight, budget_like=budget_like, options=options, estimator=estimator,
        refine=refine,
        granularity="linear" if format == "gguf" else None, table=out / "sensitivity.json", calib=calib,
        tokens=tokens, check_tokens=check_tokens, imatrix=paths.get("imatrix"), out=path, progress=progress))
    step("export", lambda path: run_export(model, format=format, plan=paths["plan"], out=path, calib=calib,
                                           dtype=dtype, device=device, streaming=streaming, progress=progress))
    if "eval" in paths:
        from layerwise.evaluate.run import run_eval

        def evaluate(path: Path) -> None:
            report = run_eval(model, data=eval_data, plan=paths["plan"], calib=calib, tokens=eval_tokens,
                              dtype=dtype, device=device, streaming=streaming, progress=progress)
            write_text_atomic(path, json.dumps(report, indent=1) + "\n")
        step("eval", evaluate)
    from layerwise.report.run import run_report

    step("report", lambda path: run_report(out, path))
    return outcome
