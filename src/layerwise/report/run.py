"""`layerwise report RUN_DIR --out report.html`: every artifact found in a run directory, drawn.

The run directory holds whatever layerwise wrote there (profile.json, a sensitivity table, a plan
and its report, pareto.json, `eval --json` outputs, bench/allocate.py's results); each is found by
its content, not its name. Sections without data say which command would fill them. Nothing
here imports torch: the report can be made on a machine that only has the JSON files.
"""
from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from layerwise.errors import LayerwiseError
from layerwise.report import verdict
from layerwise.report.figures import (
    block_columns,
    logit_lens_figure,
    pareto_figure,
    plan_bits_figure,
    profile_figure,
    readability_problems,
    sensitivity_figure,
)
from layerwise.report.html import Figure, Section, render
from layerwise.util.files import check_output, write_text_atomic

SECTION_IDS = ("verdict", "profile", "logit-lens", "sensitivity", "pareto", "plan", "metrics")
_MAX_JSON_BYTES = 256 << 20
# Table units outside the blocks (`plan --budget-like`), as layerwise.plan.units.EDGE_KINDS names
# them; spelled here because the report never imports torch, which the plan stage does.
_EDGE_KINDS = ("embed", "head")


@dataclass
class RunArtifacts:
    """The artifacts found in a run directory, each as (path, parsed JSON)."""

    profile: tuple[Path, dict] | None = None
    table: tuple[Path, dict] | None = None
    plan_report: tuple[Path, dict] | None = None
    pareto: tuple[Path, dict] | None = None
    bench: tuple[Path, dict] | None = None
    evaluations: list[tuple[Path, dict]] = field(default_factory=list)
    ignored: list[str] = field(default_factory=list)


def find_artifacts(run_dir: str | Path) -> RunArtifacts:
    """Classify every JSON file up to two levels below `run_dir` by what it contains."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise LayerwiseError(f"run directory {run_dir} does not exist or is not a directory")
    found = RunArtifacts()
    paths = sorted(p for p in run_dir.rglob("*.json") if len(p.relative_to(run_dir).parts) <= 3)
    for path in paths:
        if path.stat().st_size > _MAX_JSON_BYTES:
            found.ignored.append(f"{path} (larger than {_MAX_JSON_BYTES >> 20} MiB)")
            continue
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except (json.JSONDecodeError, UnicodeDecodeError):
            found.ignored.append(f"{path} (not valid JSON)")
            continue
        kind = _kind(data)
        if kind == "evaluation":
            found.evaluations.append((path, data))
        elif kind and getattr(found, kind) is None:
            setattr(found, kind, (path, data))
    return found


def _kind(data: object) -> str | None:
    if not isinstance(data, dict):
        return None
    schema = data.get("schema")
    if schema == "layerwise.profile":
        return "profile"
    if schema == "layerwise.sensitivity":
        return "table"
    if schema == "layerwise.pareto" or ("rows" in data and "allocator" in data and "options" not in data):
        return "pareto"
    if "returned" in data and isinstance(data.get("options"), dict):
        return "plan_report"
    if "base" in data and "quantized" in data:
        return "evaluation"
    rows = data.get("rows")
    if isinstance(rows, list) and rows and isinstance(rows[0], dict) and {"allocator", "bits_per_weight", "kl"} <= \
            set(rows[0]):
        return "bench"
    return None


def _command(meta: dict | None) -> str:
    command = (meta or {}).get("command")
    return f"made by: {command}" if command else "made by: (command not recorded)"


def _figure(figure, alt: str, caption: str) -> Figure:
    from layerwise.report.plots import png_bytes

    problems = readability_problems(figure)
    if problems:  # a figure without labels is a bug in the builder, not in the user's data
        raise AssertionError(f"figure '{alt}' is not readable: {'; '.join(problems)}")
    return Figure(png_bytes(figure), alt, caption)


# --------------------------------------------------------------------------------------------
# Sections


def _profile_sections(found: RunArtifacts) -> list[Section]:
    profile_section = Section("profile", "Profile: every statistic against depth")
    lens_section = Section("logit-lens", "Logit lens by depth and position")
    if found.profile is None:
        hint = "Make one with `layerwise profile MODEL --ablation all --out RUN_DIR`."
        profile_section.missing = lens_section.missing = hint
        return [profile_section, lens_section]
    path, data = found.profile
    meta = data.get("meta", {})
    source = f"data: {path}; model {meta.get('model', {}).get('source', '?')}, " \
             f"{meta.get('data', {}).get('tokens', '?')} tokens of {meta.get('data', {}).get('source', '?')}"
    profile_section.intro = ("One calibration pass. Lower LIM, residual update and ablation KL mean a block changes "
                             "the residual stream less; the logit lens shows how early the final prediction forms.")
    tokens = meta.get("data", {}).get("tokens")
    if "massive_activations" in data["blocks"][0] and not (tokens and data.get("linears")):
        source += "; massive activations not drawn (their share needs the token count and the linears' widths)"
    profile_section.figures.append(_figure(profile_figure(data["blocks"], data.get("linears", []), tokens),
                                           "profile statistics against depth", source))
    profile_section.provenance.append(_command(meta))
    lens = data.get("logit_lens") or {}
    if lens.get("kl"):
        lens_section.figures.append(_figure(logit_lens_figure(lens["positions"], lens["kl"]),
                                            "logit lens heat map", source))
        lens_section.provenance.append(_command(meta))
    else:
        lens_section.missing = "This profile has no per-position logit lens; re-run `layerwise profile`."
    return [profile_section, lens_section]


def _table_arrays(table: dict) -> tuple[list[str], list[str], np.ndarray, np.ndarray, np.ndarray]:
    def array(rows):
        return np.array([[math.nan if v is None else v for v in row] for row in rows], dtype=float)

    units = [unit["name"] for unit in table["units"]]
    return units, list(table["options"]), array(table["cost_bits"]), array(table["kl"]), \
        np.array(table["unit_weights"], dtype=float)


def _sensitivity_section(found: RunArtifacts) -> Section:
    section = Section("sensitivity", "Sensitivity: KL per unit and option")
    if found.table is None:
        section.missing = "Measure a table with `layerwise plan MODEL --budget B --table RUN_DIR/sensitivity.json`."
        return section
    path, table = found.table
    units, options, _, kl, _ = _table_arrays(table)
    cost = table.get("cost", {})
    section.intro = (f"{len(units)} units x {len(options)} options, each entry the KL to the base model when only "
                     f"that unit takes that option ({cost.get('forward_equivalents', math.nan):.0f} forward-pass "
                     f"equivalents, {cost.get('seconds', math.nan):.0f} s).")
    section.figures.append(_figure(sensitivity_figure(units, options, kl), "sensitivity heat map", f"data: {path}"))
    section.provenance.append(_command(table.get("meta")))
    return section


def _predicted_curves(table: dict, profile: dict | None) -> dict[str, list[tuple[float, float]]]:
    """From the table alone (the additive model): uniform options, the exact optimum and, with a
    profile, Layer-Wise Quantization's LIM ordering, at budgets across the options' range."""
    from layerwise.plan.allocate import allocate
    from layerwise.plan.problem import AllocationProblem

    units, options, cost, kl, weights = _table_arrays(table)
    total = weights.sum()
    quantizers = [o for o, name in enumerate(options) if name != verdict.DROP and np.isfinite(kl[:, o]).all()]
    uniform = sorted((float(cost[:, o].sum() / total), float(kl[:, o].sum()), o) for o in quantizers)
    curves: dict[str, list[tuple[float, float]]] = {"uniform (predicted)": [(b, k) for b, k, _ in uniform]}
    if len(uniform) < 2:
        return curves
    low, high = uniform[0][0], uniform[-1][0]
    budgets = [low + (high - low) * i / 24 for i in range(25)]
    curves["exact, our allocator (predicted)"] = []
    lim = None
    edges = any(unit.get("kind") in _EDGE_KINDS for unit in table["units"])
    if profile is not None and "lim" in profile["blocks"][0] and not edges:  # LIM ranks blocks, not the embedding
        lim_by_block = [row["lim"] for row in profile["blocks"]]
        lim = [lim_by_block[unit["block"]] for unit in table["units"]]
        curves["LWQ, LIM order (predicted)"] = []
    for bits in budgets:
        problem = AllocationProblem(tuple(units), tuple(options), cost, kl, bits * total * (1 + 1e-12))
        exact = allocate(problem, "exact")
        curves["exact, our allocator (predicted)"].append((exact.total_cost / total, exact.total_loss))
        if lim is not None:
            pair = [(b, o) for b, _, o in uniform]
            below = [o for b, o in pair if b <= bits + 1e-12]
            above = [o for b, o in pair if b > bits + 1e-12]
            if below and above:
                ordered = allocate(problem, "ordering", scores=lim, high=above[0], low=below[-1])
                curves["LWQ, LIM order (predicted)"].append((ordered.total_cost / total, ordered.total_loss))
    return curves


def _pareto_section(found: RunArtifacts) -> Section:
    section = Section("pareto", "Size against quality")
    kl_series: dict[str, list[tuple[float, float]]] = {}
    perplexity_series: dict[str, list[tuple[float, float]]] = {}
    if found.bench is not None:
        path, bench = found.bench
        for row in bench["rows"]:
            # Rows judged on several kinds of text (bench/allocate.py) make one series per text.
            name = f"{row['allocator']} (measured{', ' + row['domain'] if row.get('domain') else ''})"
            kl_series.setdefault(name, []).append((row["bits_per_weight"], row["kl"]))
            if row.get("perplexity") is not None:
                perplexity_series.setdefault(name, []).append((row["bits_per_weight"], row["perplexity"]))
        section.provenance.append(f"measured series: {path}; {_command(bench.get('meta') or bench)}")
    if found.table is not None:
        kl_series |= _predicted_curves(found.table[1], found.profile[1] if found.profile else None)
        section.provenance.append(f"predicted series: the additive model of {found.table[0]}")
    if found.pareto is not None:
        path, pareto = found.pareto
        kl_series[f"layerwise pareto, {pareto.get('allocator', '?')} (predicted)"] = [
            (row["bits_per_weight"], row["predicted_kl"]) for row in pareto["rows"]]
        section.provenance.append(f"data: {path}; {_command(pareto.get('meta'))}")
    for path, evaluation in found.evaluations:
        sizes = evaluation.get("sizes")
        if sizes:
            name = f"{path.stem} (measured)"
            kl_series[name] = [(sizes["linear_bits_per_weight"], evaluation["quantized"]["kl"])]
            perplexity_series[name] = [(sizes["linear_bits_per_weight"], evaluation["quantized"]["perplexity"])]
            section.provenance.append(f"data: {path}; {_command(evaluation.get('meta'))}")
    if not kl_series:
        section.missing = ("Run `layerwise pareto TABLE --out RUN_DIR/pareto`, or `layerwise eval ... --json "
                           "RUN_DIR/eval.json` for quantized models, or bench/allocate.py.")
        return section
    section.intro = ("Predicted series add up the table's single-unit KLs; measured series come from evaluating "
                     "the quantized model on held-out text.")
    section.figures.append(_figure(pareto_figure(kl_series, perplexity_series or None), "size against KL and "
                                   "perplexity", "Where each series comes from is listed below."))
    return section


def _plan_section(found: RunArtifacts) -> Section:
    section = Section("plan", "The plan: bits per layer")
    if found.plan_report is None:
        section.missing = "Make a plan with `layerwise plan MODEL --budget B --out RUN_DIR/plan.json`."
        return section
    path, report = found.plan_report
    labels_by_unit: dict[str, str] = report["options"]
    units = list(labels_by_unit)
    labels = [labels_by_unit[unit] for unit in units]
    if found.table is not None:
        table_units, options, cost, _, weights = _table_arrays(found.table[1])
        index = {name: i for i, name in enumerate(table_units)}
        bits = [float(cost[index[u], options.index(label)] / weights[index[u]]) if u in index and label in options
                else math.nan for u, label in zip(units, labels)]
    else:
        bits = [_nominal_bits(label) for label in labels]
    section.intro = (f"{report.get('returned', '?')} plan at {report.get('bits_per_weight', math.nan):.3f} bits per "
                     f"weight (budget {report.get('budget_bits_per_weight', math.nan):.3f}); KL on calibration "
                     f"windows {report.get('calibration_kl', math.nan):.4f}.")
    section.figures.append(_figure(plan_bits_figure(units, bits, labels), "bits per unit", f"data: {path}"))
    section.provenance.append(_command({"command": report.get("command")}))
    return section


def _nominal_bits(label: str) -> float:
    """Bits per weight from an option name like int3g64 (16-bit scale per group), when no table says."""
    import re

    if label == verdict.DROP:
        return 0.0
    match = re.search(r"int(\d)(?:g(\d+))?", label)
    if not match:
        return math.nan
    bits, group = int(match.group(1)), match.group(2)
    return bits + (16 / int(group) if group else 0.0)


def metric_ranking(profile: dict, table: dict) -> tuple[list[str], list[list[str]]]:
    """Spearman rank correlation between each per-block profile statistic and the block's measured
    sensitivity (its units' KL summed) under each option; best predictors first by mean |rho|."""
    from scipy.stats import spearmanr

    blocks = profile["blocks"]
    units, options, _, kl, _ = _table_arrays(table)
    # The embedding and head (`plan --budget-like`) belong to no block.
    block_of = [None if unit.get("kind") in _EDGE_KINDS else unit["block"] for unit in table["units"]]
    n_blocks = len(blocks)
    quantizers = [o for o, name in enumerate(options) if name != verdict.DROP and np.isfinite(kl[:, o]).all()]
    sensitivity = {o: np.array([kl[[u for u, b in enumerate(block_of) if b == block], o].sum()
                                for block in range(n_blocks)]) for o in quantizers}
    rows = []
    for name, values in block_columns(blocks, profile.get("linears", [])).items():
        values = np.array(values, dtype=float)
        if not np.isfinite(values).all() or np.ptp(values) == 0:
            continue
        rhos = [float(spearmanr(values, sensitivity[o]).statistic) for o in quantizers]
        rows.append((float(np.nanmean(np.abs(rhos))), name, rhos))
    rows.sort(key=lambda row: -row[0])
    header = ["statistic", "mean |rho|", *(f"rho vs {options[o]}" for o in quantizers)]
    return header, [[name, f"{mean:.3f}", *(f"{rho:+.3f}" for rho in rhos)] for mean, name, rhos in rows]


def _metrics_section(found: RunArtifacts) -> Section:
    section = Section("metrics", "Which statistic predicts measured sensitivity")
    if found.profile is None or found.table is None:
        section.missing = "Needs both a profile and a sensitivity table of the same model in the run directory."
        return section
    profile, table = found.profile[1], found.table[1]
    if profile.get("meta", {}).get("model", {}).get("fingerprint") not in (None, table.get("model_fingerprint")):
        section.missing = "The profile and the sensitivity table describe different models."
        return section
    section.intro = ("Spearman rank correlation across blocks between each profile statistic and the block's "
                     "measured sensitivity (the KL of its units, quantized one at a time, summed). |rho| near 1: the "
                     "statistic orders blocks as quantization damage does; the sign says in which direction.")
    section.tables.append(metric_ranking(profile, table))
    section.provenance.append(f"data: {found.profile[0]} and {found.table[0]}")
    return section


def _verdict_section(found: RunArtifacts) -> Section:
    """Above every figure: the units that matter most and least, what could be dropped, and what
    the plan costs and buys; every line names the evidence it comes from."""
    section = Section("verdict", "Verdict")
    section.intro = "What to act on, from the best evidence in this run (named in the last column; intervals are 95%)."
    rows = [*_importance_rows(found), _drop_row(found), *_plan_rows(found)]
    section.tables.append((["", "what this run says", "from"], rows))
    section.provenance += [f"data: {path}" for path, _ in filter(None, (found.table, found.profile, found.plan_report))]
    return section


def _importance_rows(found: RunArtifacts) -> list[list[str]]:
    ranking, path = None, None
    if found.table is not None:
        ranking, path = verdict.importance_from_table(*_table_arrays(found.table[1])[:4]), found.table[0]
    if ranking is None and found.profile is not None:
        ranking, path = verdict.importance_from_profile(found.profile[1]["blocks"]), found.profile[0]
    if ranking is None:
        return [["what matters", "Nothing here ranks units: `layerwise profile MODEL --ablation all --out "
                 "RUN_DIR/profile` or `layerwise plan MODEL --budget B --table RUN_DIR/sensitivity.json`.", ""]]
    most, least = verdict.most_and_least(ranking)
    evidence = f"{ranking.source} ({path.name})"
    return [["matter most", verdict.listing(ranking, most), evidence],
            ["matter least", verdict.listing(ranking, least), evidence]]


def _drop_row(found: RunArtifacts) -> list[str]:
    model = _model_source(found) or "MODEL"
    drops, path = None, None
    if found.table is not None:
        _, options, _, kl, _ = _table_arrays(found.table[1])
        drops, path = verdict.drops_from_table(found.table[1]["units"], options, kl, model), found.table[0]
    if drops is None and found.profile is not None:
        drops, path = verdict.drops_from_profile(found.profile[1]["blocks"], model), found.profile[0]
    if drops is None or not drops.ordered():
        return ["could be dropped", "No ablation data: `layerwise profile MODEL --ablation all` measures the KL "
                "without each block and sublayer (or add `drop` to `layerwise plan --options`).", ""]
    smallest = drops.ordered()[::-1][:verdict.SHOWN]
    return ["could be dropped", f"{verdict.listing(drops, smallest)}. The first: `{drops.commands[smallest[0]]}`. "
            "KLs of units removed together do not add up; `layerwise drop --by search` re-measures after each drop.",
            f"{drops.source} ({path.name})"]


def _plan_rows(found: RunArtifacts) -> list[list[str]]:
    rows = []
    if found.plan_report is not None:
        path, report = found.plan_report
        uniform = None
        if found.table is not None and report.get("budget_bits_per_weight") is not None:
            _, options, cost, kl, weights = _table_arrays(found.table[1])
            uniform = verdict.best_uniform(options, cost, kl, weights, float(report["budget_bits_per_weight"]))
        rows.append(["the plan", verdict.plan_summary(report, uniform), path.name])
    else:
        rows.append(["the plan", "No plan here: `layerwise plan MODEL --budget B --out RUN_DIR/plan.json`.", ""])
    for path, evaluation in found.evaluations:
        summary = verdict.evaluation_summary(path.stem, evaluation)
        if summary:
            rows.append(["measured", summary, path.name])
    return rows


def _model_source(found: RunArtifacts) -> str | None:
    for artifact in (found.profile and found.profile[1].get("meta"), found.plan_report and found.plan_report[1]):
        source = ((artifact or {}).get("model") or {}).get("source")
        if source:
            return source
    return None


def build_report(run_dir: str | Path, title: str | None = None) -> tuple[str, RunArtifacts]:
    """The report's HTML and what it was made from."""
    found = find_artifacts(run_dir)
    if not any([found.profile, found.table, found.plan_report, found.pareto, found.bench, found.evaluations]):
        raise LayerwiseError(f"{run_dir} holds no layerwise results (profile.json, a sensitivity table, plan, "
                             "pareto.json or eval JSON); nothing to report")
    sections = [_verdict_section(found), *_profile_sections(found), _sensitivity_section(found),
                _pareto_section(found), _plan_section(found), _metrics_section(found)]
    model = None
    if found.profile:
        model = found.profile[1].get("meta", {}).get("model", {}).get("source")
    title = title or f"layerwise report: {model or Path(run_dir).resolve().name}"
    subtitle = f"Made from {Path(run_dir)}"
    if found.ignored:
        subtitle += f"; ignored {len(found.ignored)} file(s): {', '.join(found.ignored[:3])}"
    return render(title, subtitle, sections), found


def run_report(run_dir: str | Path, out: str | Path, *, title: str | None = None, overwrite: bool = False) -> Path:
    """`layerwise report` from Python: one self-contained HTML file at `out`."""
    check_output(out, overwrite)
    text, _ = build_report(run_dir, title)
    return write_text_atomic(out, text)
