"""The report reads at a glance: a verdict above every figure that names the units that matter
most and least (and from which evidence), what could be dropped and what the plan buys; and
figures whose scale shows the data. Run folders are written by hand in the artifacts' formats,
so these tests need no model and say exactly which unit must come out where."""
from __future__ import annotations

import html
import json
import re

import numpy as np
import pytest

from layerwise.report.figures import logit_lens_figure, profile_figure
from layerwise.report.run import build_report

BLOCKS = 4
HIDDEN = 8
TOKENS = 64
# Ablation KL per block: block 0 matters most, block 2's attention least.
ABLATION = {"block": [4.0, 1.0, 0.6, 0.9], "attn": [0.5, 0.3, 0.02, 0.2], "mlp": [3.5, 0.8, 0.4, 0.7]}
MASSIVE = [0.0, 16.0, 12.0, 0.0]  # entries counted over all TOKENS: more than 1, not a share


def _profile(ablation: bool = True) -> dict:
    blocks = []
    for b in range(BLOCKS):
        row = {"block": b, "lim": [0.9, 0.2, 0.1, 0.3][b], "rel_update": [17.6, 0.3, 0.2, 0.4][b],
               "attn_rel_update": [0.5, 0.1, 0.05, 0.1][b], "mlp_rel_update": [17.6, 0.2, 0.15, 0.3][b],
               "massive_activations": MASSIVE[b], "logit_lens_kl": [6.0, 3.0, 1.0, 0.0][b]}
        if ablation:
            row |= {f"ablation_kl_{kind}": values[b] for kind, values in ABLATION.items()}
        blocks.append(row)
    linears = [{"name": f"model.layers.{b}.{name}", "block": b, "rows": rows, "columns": columns}
               for b in range(BLOCKS) for name, rows, columns in
               (("q_proj", HIDDEN, HIDDEN), ("o_proj", HIDDEN, HIDDEN), ("up_proj", 2 * HIDDEN, HIDDEN),
                ("down_proj", HIDDEN, 2 * HIDDEN))]
    lens = [[8.0, 5.0, 4.0], [3.0, 2.0, 2.5], [1.0, 0.5, 0.8], [0.0, 0.0, 0.0]]
    return {"schema": "layerwise.profile", "schema_version": "1",
            "meta": {"command": "layerwise profile tiny --ablation all --out run/profile",
                     "model": {"source": "tiny", "fingerprint": "f00"},
                     "data": {"source": "text", "tokens": TOKENS}},
            "blocks": blocks, "linears": linears, "columns": {},
            "logit_lens": {"positions": [0, 8, 15], "kl": lens}}


def _table() -> dict:
    """int2 KL: block 1's MLP matters most, block 3's attention least; drop KL: block 2's MLP."""
    units = [{"name": f"model.layers.{b}.{kind}", "block": b, "kind": kind} for b in range(BLOCKS)
             for kind in ("attn", "mlp")]
    int2 = [0.3, 0.5, 0.2, 0.9, 0.25, 0.4, 0.1, 0.6]
    drop = [1.0, 2.0, 0.8, 1.5, 0.7, 0.05, 0.9, 1.2]
    weights = [64, 128] * BLOCKS
    return {"schema": "layerwise.sensitivity", "schema_version": "1", "model_fingerprint": "f00",
            "granularity": "sublayer", "units": units, "options": ["int2", "int4", "drop"],
            "cost_bits": [[2.25 * w, 4.25 * w, 0.0] for w in weights],
            "kl": [[k, k / 10, d] for k, d in zip(int2, drop)], "unit_weights": weights,
            "cost": {"forward_equivalents": 20, "seconds": 1.0},
            "meta": {"command": "layerwise plan tiny --budget 3.25 --table run/sensitivity.json"}}


def _plan_report() -> dict:
    options = {f"model.layers.{b}.{kind}": "int4" if b < 2 else "int2" for b in range(BLOCKS)
               for kind in ("attn", "mlp")}
    return {"command": "layerwise plan tiny --budget 3.25 --out run/plan.json", "model": {"source": "tiny"},
            "allocator": "exact", "returned": "exact", "bits_per_weight": 3.125, "total_bytes": 4321,
            "budget_bits_per_weight": 3.25, "predicted_kl": 0.19, "calibration_kl": 0.21, "options": options,
            "check": {"returned": "exact", "plan_kl": 0.21, "plan_kl_ci": [0.18, 0.25], "best_uniform": "int2",
                      "uniform": {"int2": {"kl": 0.3, "kl_ci": [0.27, 0.34]}}, "margin": 0.09,
                      "margin_ci": [0.05, 0.12], "ratio": 0.7, "ratio_ci": [0.6, 0.8]}}


def _write(folder, name: str, data: dict) -> None:
    (folder / name).parent.mkdir(parents=True, exist_ok=True)
    (folder / name).write_text(json.dumps(data))


def _verdict(text: str) -> dict[str, str]:
    """The verdict's rows, {finding: what it says + where from}; it must come before every figure."""
    start, end = text.index('<section id="verdict">'), text.index('<section id="profile">')
    assert start < end and "<img" not in text[:start]
    rows = re.findall(r"<tr>(.*?)</tr>", text[start:end], re.S)
    cells = [[html.unescape(cell) for cell in re.findall(r"<t[dh][^>]*>(.*?)</t[dh]>", row, re.S)] for row in rows]
    return {row[0]: " | ".join(row[1:]) for row in cells[1:]}


def _first(row: str) -> str:
    return row.split(",")[0].strip()


def test_the_verdict_ranks_units_by_measured_sensitivity(tmp_path):
    _write(tmp_path, "profile/profile.json", _profile())
    _write(tmp_path, "sensitivity.json", _table())
    _write(tmp_path, "plan.report.json", _plan_report())
    _write(tmp_path, "eval-plan.json", {"meta": {}, "base": {"perplexity": 10.0},
                                        "quantized": {"kl": 0.22, "kl_ci": [0.2, 0.24], "perplexity": 11.0},
                                        "sizes": {"linear_bits_per_weight": 3.125}})
    verdict = _verdict(build_report(tmp_path)[0])
    assert verdict["matter most"].endswith("(sensitivity.json)")  # the evidence is named
    assert "KL when only this unit takes int2, the cheapest option other than drop" in verdict["matter most"]
    assert _first(verdict["matter most"]) == "model.layers.1.mlp (0.9)"
    assert _first(verdict["matter least"]) == "model.layers.3.attn (0.1)"
    dropped = verdict["could be dropped"]
    assert _first(dropped) == "model.layers.2.mlp (0.05)" and "drop KL in the sensitivity table" in dropped
    assert "layerwise drop tiny --indices 2 --kind mlp" in dropped
    plan = verdict["the plan"]
    assert "3.125 bits per weight, 4,321 bytes (budget 3.250)" in plan
    assert "the allocated plan has KL 0.21 [0.18, 0.25], the best uniform option within budget (int2) 0.3 " \
           "[0.27, 0.34]; margin 0.09 [0.05, 0.12]" in plan and "ratio plan / uniform 0.7 [0.6, 0.8]" in plan
    assert "table predicts" not in plan  # measured beats predicted
    assert verdict["measured"].startswith("eval-plan: KL on held-out text 0.22 [0.2, 0.24], perplexity 11")


def test_an_older_plan_report_shows_what_it_has_and_the_tables_prediction(tmp_path):
    report = _plan_report()
    del report["check"], report["total_bytes"]
    _write(tmp_path, "sensitivity.json", _table())
    _write(tmp_path, "plan.report.json", report)
    plan = _verdict(build_report(tmp_path)[0])["the plan"]
    assert plan.startswith("exact plan: 3.125 bits per weight (budget 3.250); KL on calibration windows 0.21; the "
                           "table predicts KL 0.19 against 3.25 for uniform int2 (2.250 bits per weight)")
    assert "margin" not in plan and "bytes" not in plan  # absent from the report: left out, not invented


def test_the_verdict_from_a_profile_alone_uses_ablation_kl(tmp_path):
    _write(tmp_path, "profile.json", _profile())
    text = build_report(tmp_path)[0]
    verdict = _verdict(text)
    assert "ablation KL in the profile" in verdict["matter most"]
    assert _first(verdict["matter most"]) == "block 0 mlp (3.5)"
    assert _first(verdict["matter least"]) == "block 2 attn (0.02)"
    dropped = verdict["could be dropped"]
    assert _first(dropped) == "block 2 attn (0.02)" and "layerwise drop tiny --indices 2 --kind attn" in dropped
    assert verdict["the plan"].startswith("No plan here: `layerwise plan MODEL")
    assert text.count("Not in this run") == 4  # the verdict is never an empty section


def test_the_verdict_without_ablation_falls_back_to_lim_and_says_how_to_measure(tmp_path):
    _write(tmp_path, "profile.json", _profile(ablation=False))
    verdict = _verdict(build_report(tmp_path)[0])
    assert "LIM in the profile" in verdict["matter most"]
    assert _first(verdict["matter most"]) == "block 0 (0.9)"
    assert _first(verdict["matter least"]) == "block 2 (0.1)"
    assert verdict["could be dropped"].startswith("No ablation data: `layerwise profile MODEL --ablation all`")


def _axes(figure, title: str):
    return next(axes for axes in figure.axes if axes.get_title().startswith(title))


def test_residual_updates_are_drawn_on_a_log_scale():
    profile = _profile()
    figure = profile_figure(profile["blocks"], profile["linears"], TOKENS)
    assert _axes(figure, "residual update").get_yscale() == "log"  # block 0's 17.6 no longer flattens the rest


def test_massive_activations_are_drawn_as_a_share():
    profile = _profile()
    figure = profile_figure(profile["blocks"], profile["linears"], TOKENS)
    axes = _axes(figure, "massive activations")
    drawn = axes.lines[0].get_ydata()
    assert ((0 <= drawn) & (drawn <= 1)).all() and max(MASSIVE) > 1
    assert np.allclose(drawn, np.array(MASSIVE) / (TOKENS * HIDDEN))  # entries over positions x hidden size
    assert "share" in axes.get_ylabel()
    unknown = profile_figure(profile["blocks"], profile["linears"])  # no token count: no share, no panel
    assert not any(a.get_title().startswith("massive") for a in unknown.axes)


def test_the_logit_lens_colours_ignore_the_final_block():
    lens = _profile()["logit_lens"]
    figure = logit_lens_figure(lens["positions"], lens["kl"])
    norm = figure.axes[0].images[0].norm
    non_final = np.array(lens["kl"][:-1])
    assert non_final.min() <= norm.vmin and norm.vmax <= non_final.max()  # the final block's 0 sets nothing
    assert norm.vmin > 0 and type(norm).__name__ == "LogNorm"
    assert "percentile" in figure.axes[1].get_ylabel()


@pytest.fixture(autouse=True)
def _close_figures():
    yield
    import matplotlib.pyplot as plt

    plt.close("all")
