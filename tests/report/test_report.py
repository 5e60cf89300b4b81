"""`layerwise report`: a self-contained page with every section, readable figures, no torch, and
a clean render in headless Chromium (the Debian package; .ci/run installs it)."""
from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys

import pytest

from conftest import CALIBRATION_TEXT, EVALUATION_TEXT, STORIES, require_tool
from layerwise.errors import LayerwiseError
from layerwise.report.run import SECTION_IDS, build_report, find_artifacts, metric_ranking, run_report
from test_cli import assert_one_line_error, layerwise

# End to end through the CLI or fresh processes: left out of the quick tier (-m "not slow").
pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    """Every artifact layerwise writes, for stories260K: profile, table, plan, pareto, eval."""
    from layerwise import load_model
    from layerwise.evaluate.run import run_eval
    from layerwise.measure.run import run_plan
    from layerwise.report.pareto import run_pareto
    from layerwise.profile import run_profile
    from layerwise.apply.run import run_quantize

    folder = tmp_path_factory.mktemp("run")
    loaded = load_model(STORIES)
    run_profile(loaded, CALIBRATION_TEXT, tokens=1024, seq_len=256, ablation=True, out=folder / "profile",
                progress=False)
    outcome = run_plan(loaded, bits_per_weight=4.5, options="int2pc,int3pc,int4pc,int8pc", calib=CALIBRATION_TEXT,
                       tokens=1024, fitness_tokens=512, generations=3, table=folder / "sensitivity.json",
                       out=folder / "plan.json", progress=False)
    run_pareto(folder / "sensitivity.json", out=folder / "pareto")
    run_quantize(load_model(STORIES), outcome.plan, out=folder / "quantized", progress=False)
    report = run_eval(STORIES, data=EVALUATION_TEXT, quantized=folder / "quantized", tokens=1024, progress=False)
    (folder / "eval-plan.json").write_text(json.dumps(report))
    return folder


def test_artifacts_are_found_by_content(run_dir):
    found = find_artifacts(run_dir)
    assert found.profile[0].name == "profile.json" and found.table[0].name == "sensitivity.json"
    assert found.plan_report[0].name == "plan.report.json" and found.pareto[0].name == "pareto.json"
    assert [path.name for path, _ in found.evaluations] == ["eval-plan.json"]


def test_the_page_is_self_contained_with_every_section(run_dir, tmp_path):
    path = run_report(run_dir, tmp_path / "report.html")
    text = path.read_text()
    for section in SECTION_IDS:
        assert f'<section id="{section}">' in text
    assert "Not in this run" not in text  # every section has its data
    assert text.count("data:image/png;base64,") == 5  # five figures and one table
    assert not re.search(r'(src|href)="(?!data:|#)', text)  # nothing fetched from elsewhere
    assert text.count("made by:") >= 5  # every figure says what made it


def test_missing_sections_say_what_would_fill_them(run_dir, tmp_path):
    (tmp_path / "only").mkdir()
    shutil.copy(run_dir / "profile" / "profile.json", tmp_path / "only" / "profile.json")
    text, _ = build_report(tmp_path / "only")
    assert text.count("Not in this run") == 4 and "layerwise plan MODEL" in text
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "notes.json").write_text("[1, 2]")
    with pytest.raises(LayerwiseError, match="holds no layerwise results"):
        build_report(tmp_path / "empty")


def test_every_figure_is_readable_and_the_check_can_fail():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from layerwise.report.figures import pareto_figure, readability_problems

    good = pareto_figure({"a": [(3, 1.0), (4, 0.5)], "b": [(3, 2.0), (4, 0.7)]})
    assert readability_problems(good) == []
    bad, axes = plt.subplots()
    axes.plot([1, 2], [3, 4], label="one")
    axes.plot([1, 2], [4, 5], label="two")
    assert readability_problems(bad) == ["untitled axes: no x label", "untitled axes: no y label",
                                         "untitled axes: 2 series but no legend"]
    plt.close("all")


def test_metric_ranking_orders_by_correlation(run_dir):
    found = find_artifacts(run_dir)
    header, rows = metric_ranking(found.profile[1], found.table[1])
    assert header[:2] == ["statistic", "mean |rho|"] and len(header) == 2 + 4
    means = [float(row[1]) for row in rows]
    assert means == sorted(means, reverse=True) and all(0 <= m <= 1 for m in means)
    assert {"lim", "ablation_kl_block", "logit_lens_kl"} <= {row[0] for row in rows}


def test_the_report_module_never_imports_torch(run_dir):
    code = ("import sys; from layerwise.report.run import build_report; build_report(sys.argv[1]); "
            "print(sorted(m for m in sys.modules if m == 'torch' or m.startswith('torch.')))")
    done = subprocess.run([sys.executable, "-c", code, str(run_dir)], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "[]"


def test_report_cli_and_its_bad_input(run_dir, tmp_path):
    done = layerwise("report", run_dir, "--out", tmp_path / "r.html")
    assert done.returncode == 0, done.stderr
    assert "self-contained" in done.stdout
    done = layerwise("report", run_dir, "--out", tmp_path / "r.html")
    assert_one_line_error(done, "already exists; pass --overwrite")
    done = layerwise("report", tmp_path / "nowhere", "--out", tmp_path / "x.html")
    assert_one_line_error(done, "does not exist")
    assert not (tmp_path / "x.html").exists()


def _chromium() -> str | None:
    return shutil.which("chromium") or shutil.which("chromium-browser")


def _render(chromium: str, page, *extra: str) -> subprocess.CompletedProcess:
    return subprocess.run([chromium, "--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars",
                           "--enable-logging=stderr", "--v=0", "--virtual-time-budget=5000", *extra,
                           page.as_uri()], capture_output=True, text=True, timeout=120)


def _console_errors(stderr: str) -> list[str]:
    return [line for line in stderr.splitlines() if ":CONSOLE" in line]


def test_the_report_renders_in_headless_chromium(run_dir, tmp_path):
    chromium = require_tool("chromium", _chromium(), "apt install chromium; .ci/run installs it")
    page = run_report(run_dir, tmp_path / "report.html")
    dom = _render(chromium, page, "--dump-dom")
    assert dom.returncode == 0, dom.stderr[-2000:]
    assert _console_errors(dom.stderr) == []
    assert 'data-images="5"' in dom.stdout and 'data-broken-images="0"' in dom.stdout
    for section in SECTION_IDS:
        assert f'id="{section}"' in dom.stdout

    shot = tmp_path / "report.png"
    done = _render(chromium, page, f"--screenshot={shot}", "--window-size=1400,5000")
    assert done.returncode == 0 and shot.exists(), done.stderr[-2000:]
    import matplotlib.image

    pixels = matplotlib.image.imread(shot)
    assert pixels.shape[:2] == (5000, 1400) and pixels.std() > 0.05  # a page, not a blank screen

    # The same check catches a broken figure: the page reports it on the console.
    broken = tmp_path / "broken.html"
    broken.write_text(page.read_text().replace("data:image/png;base64,", "data:image/png;base64,AAAA", 1))
    done = _render(chromium, broken, "--dump-dom")
    assert 'data-broken-images="1"' in done.stdout and len(_console_errors(done.stderr)) == 1
