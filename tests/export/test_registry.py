"""The exporter registry: run_export and the CLI go through it, and a registered exporter is used."""
from __future__ import annotations

import json

import pytest

from conftest import STORIES
from layerwise.errors import LayerwiseError
from layerwise.export import EXPORTERS, exporter_named, register_exporter
from layerwise.export.run import run_export
from layerwise.plan import Plan
from layerwise.quant import QuantConfig
from test_cli import assert_one_line_error, layerwise


def test_the_three_formats_are_registered_with_what_they_write():
    assert list(EXPORTERS) == ["gguf", "compressed-tensors", "hf"]
    assert [EXPORTERS[name].folder for name in EXPORTERS] == [False, True, True]
    assert [name for name, exporter in EXPORTERS.items() if exporter.streams] == ["gguf", "compressed-tensors", "hf"]
    with pytest.raises(LayerwiseError, match="unknown export format 'onnx'; choose from gguf, compressed-tensors, hf"):
        exporter_named("onnx")


@pytest.fixture
def recording_exporter():
    calls = []

    def write(job):
        calls.append(job)
        job.out.write_text(json.dumps(sorted(job.stored)))
        return {"path": str(job.out), "file_bytes": job.out.stat().st_size}

    checked = []
    register_exporter("recording", description="test", folder=False,
                      check_targets=lambda targets: checked.append(sorted(targets)))(write)
    try:
        yield calls, checked
    finally:
        del EXPORTERS["recording"]


def test_a_registered_exporter_gets_the_quantized_model(recording_exporter, tmp_path):
    calls, checked = recording_exporter
    plan = Plan(QuantConfig("int", 8, None))
    report = run_export(STORIES, format="recording", plan=plan, out=tmp_path / "model.txt", progress=False)
    (job,) = calls
    assert report["path"] == str(tmp_path / "model.txt") and report["predicted_sizes"] is not None
    assert checked == [sorted(job.stored)] and len(job.stored) == 5 * 7  # every block linear of stories260K
    assert json.loads((tmp_path / "model.txt").read_text()) == sorted(job.stored)
    assert job.plan is plan and job.dropped == [] and job.source.kind != "gguf"


def test_a_format_that_cannot_stream_is_refused_before_loading(recording_exporter, tmp_path):
    with pytest.raises(LayerwiseError, match="--streaming export writes gguf, compressed-tensors, hf only; recording is written"):
        run_export(STORIES, format="recording", plan=Plan(QuantConfig("int", 8, None)), out=tmp_path / "x",
                   streaming=True, progress=False)
    assert recording_exporter[0] == []


@pytest.mark.slow  # the CLI in fresh processes
def test_cli_lists_exporters_and_refuses_an_unknown_one(tmp_path):
    done = layerwise("list", "exporters")
    assert done.returncode == 0 and [line.split()[0] for line in done.stdout.splitlines()] == list(EXPORTERS)
    done = layerwise("export", STORIES, "--plan", tmp_path / "p.json", "--format", "onnx", "--out", tmp_path / "x")
    assert_one_line_error(done, "unknown export format 'onnx'")
