"""matplotlib figures built from plain data (lists, dicts, arrays): no torch, no layerwise types.

Every builder returns a Figure whose axes carry labels and, where there is more than one series,
a legend; `readability_problems` checks exactly that, and the report refuses a figure that fails.
"""
from __future__ import annotations

import math
from typing import Mapping, Sequence

import numpy as np

# Profile columns drawn together in one panel, with the y-axis they share.
PROFILE_PANELS = (
    ("block importance (LWQ's LIM = ShortGPT's BI)", ("lim", "angular_distance"), "1 - cos(h_in, h_out)", False),
    ("residual update |dh| / |h|", ("rel_update", "attn_rel_update", "mlp_rel_update"), "relative update", True),
    ("hidden-state norm", ("hidden_norm",), "mean |h| (L2)", True),
    ("activation kurtosis", ("act_kurtosis",), "kurtosis", True),
    ("outliers", ("max_over_median",), "max |h| / median |h|", True),
    ("massive activations (|x|>100, >1000x median)", ("massive_activations",), "share of h_out entries", False),
    ("MLP sparsity", ("mlp_sparsity",), "share of near-zero activations", False),
    ("logit lens KL", ("logit_lens_kl",), "KL(final || lens), nats", True),
    ("logit lens top-1", ("logit_lens_top1",), "agreement with final top-1", False),
    ("weights: ZD (LWQ)", ("zd",), "ZD score", False),
    ("weights: kurtosis", ("weight_kurtosis",), "kurtosis (mean of linears)", True),
    ("weights: effective rank", ("effective_rank",), "effective rank (mean of linears)", False),
    ("ablation: KL without the unit", ("ablation_kl_block", "ablation_kl_attn", "ablation_kl_mlp"), "KL, nats/token",
     True),
)


def pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def readability_problems(figure) -> list[str]:
    """What keeps a figure from being read on its own: an axis with data but no label, or an
    axes with several labelled series and no legend. Colorbars are judged by their one label."""
    problems = []
    for axes in figure.axes:
        title = axes.get_title() or "untitled axes"
        if axes.get_label() == "<colorbar>":
            if not (axes.get_ylabel() or axes.get_xlabel()):
                problems.append(f"{title}: colorbar without a label")
            continue
        has_data = bool(axes.lines or axes.images or axes.patches or axes.collections)
        if not has_data:
            continue
        if not axes.get_xlabel():
            problems.append(f"{title}: no x label")
        if not axes.get_ylabel():
            problems.append(f"{title}: no y label")
        labelled = [artist for artist in [*axes.lines, *axes.containers, *axes.collections]
                    if not str(artist.get_label()).startswith("_")]
        if len(labelled) > 1 and axes.get_legend() is None:
            problems.append(f"{title}: {len(labelled)} series but no legend")
    return problems


def profile_figure(blocks: Sequence[Mapping], linears: Sequence[Mapping] = (),
                   tokens: int | None = None) -> "object":
    """Every per-block statistic against depth, related ones in one panel. `tokens` (the number of
    positions profiled) turns the massive-activation count into a share; without it, or without
    linears to tell the hidden size, that panel is left out."""
    from matplotlib.ticker import MaxNLocator

    plt = pyplot()
    columns = block_columns(blocks, linears)
    if "massive_activations" in columns:
        share = massive_share(columns.pop("massive_activations"), tokens, linears)
        if share is not None:
            columns["massive_activations"] = share
    panels = [(title, [c for c in names if c in columns], ylabel, log)
              for title, names, ylabel, log in PROFILE_PANELS if any(c in columns for c in names)]
    grouped = {c for _, names, _, _ in panels for c in names}
    panels += [(name, [name], name, False) for name in columns if name not in grouped]
    ncols = 3
    nrows = math.ceil(len(panels) / ncols)
    figure, grid = plt.subplots(nrows, ncols, figsize=(13, 3.0 * nrows), dpi=100, squeeze=False)
    depth = np.arange(len(blocks))
    for axes, (title, names, ylabel, log) in zip(grid.flat, panels):
        for name in names:
            values = np.array(columns[name], dtype=float)
            axes.plot(depth, values, "o-", ms=3, label=name)
        if log and all(np.nanmin(np.array(columns[n], dtype=float)) > 0 for n in names):
            axes.set_yscale("log")
        axes.set_title(title, fontsize=10)
        axes.xaxis.set_major_locator(MaxNLocator(integer=True))
        axes.set_xlabel("block (0 = nearest the embeddings)")
        axes.set_ylabel(ylabel)
        axes.grid(True, alpha=0.3)
        if len(names) > 1:
            axes.legend(fontsize=7)
    for axes in list(grid.flat)[len(panels):]:
        axes.remove()
    figure.tight_layout()
    return figure


def block_columns(blocks: Sequence[Mapping], linears: Sequence[Mapping]) -> dict[str, list[float]]:
    """Per-block columns; per-linear weight statistics become the mean over the block's linears."""
    columns = {key: [_number(row.get(key)) for row in blocks] for key in blocks[0] if key != "block"}
    for key in ("weight_kurtosis", "effective_rank"):
        if linears and key in linears[0] and key not in columns:
            per_block = [[_number(r[key]) for r in linears if r["block"] == index] for index in range(len(blocks))]
            columns[key] = [float(np.nanmean(values)) if values else math.nan for values in per_block]
    return columns


def massive_share(counts: Sequence[float], tokens: int | None, linears: Sequence[Mapping]) -> list[float] | None:
    """The profile's `massive_activations` is a count of h_out entries summed over every position
    profiled, so it grows with --tokens; divided by the entries looked at (positions x hidden size)
    it is a share in [0, 1]. The hidden size is the most common input width of the block linears
    (q/k/v and gate/up all read the residual stream); None where tokens or linears are unknown."""
    widths = [int(row["columns"]) for row in linears if row.get("columns")]
    if not tokens or not widths:
        return None
    hidden = max(set(widths), key=widths.count)
    return [count / (tokens * hidden) for count in counts]


def _number(value) -> float:
    return math.nan if value is None else float(value)


LENS_PERCENTILES = (2, 98)


def lens_colour_range(kl) -> tuple[float, float]:
    """Colour limits for the logit-lens KL: percentiles of the blocks before the last. The last
    block's lens is the model's own output (KL 0 up to rounding); letting it set the range would
    spend the whole colour scale on one row and flatten every other."""
    grid = np.array(kl, dtype=float)
    body = grid[:-1] if len(grid) > 1 else grid
    values = body[np.isfinite(body) & (body > 0)]
    if values.size == 0:
        return 1e-6, 1.0
    low, high = np.percentile(values, LENS_PERCENTILES)
    return float(low), float(max(high, low * 10))


def logit_lens_figure(positions: Sequence[int], kl: Sequence[Sequence[float]]) -> "object":
    """KL(final || logit lens) by block and position in the window, on a log colour scale whose
    range comes from the blocks before the last (values outside it take the end colours)."""
    from matplotlib.colors import LogNorm

    plt = pyplot()
    grid = np.array(kl, dtype=float)
    low, high = lens_colour_range(grid)
    figure, axes = plt.subplots(figsize=(10, max(3.5, 0.18 * len(grid) + 1.5)), dpi=100)
    image = axes.imshow(np.maximum(grid, low * 1e-3), aspect="auto", cmap="viridis_r", interpolation="nearest",
                        origin="lower", norm=LogNorm(vmin=low, vmax=high, clip=False))
    step = max(1, len(positions) // 12)
    axes.set_xticks(range(0, len(positions), step), [str(p) for p in positions[::step]])
    axes.set_xlabel("position in the window (sampled)")
    axes.set_ylabel("block")
    axes.set_title("logit lens: how far each block's output is from the final prediction", fontsize=10)
    first, last = LENS_PERCENTILES
    bar = figure.colorbar(image, ax=axes, extend="both")
    bar.set_label(f"KL(final || lens), nats, log scale;\nrange: {first}-{last}th percentile of the blocks\n"
                  "before the last (its KL is 0 by construction)", fontsize=8)
    figure.tight_layout()
    return figure


def sensitivity_figure(unit_names: Sequence[str], options: Sequence[str], kl) -> "object":
    """log10 KL of every unit (rows, in depth order) under every option (columns)."""
    plt = pyplot()
    kl = np.array(kl, dtype=float)
    values = np.log10(np.where(np.isfinite(kl) & (kl > 0), kl, np.nan))
    height = max(4.0, 0.12 * len(unit_names) + 1.5)
    figure, axes = plt.subplots(figsize=(1.0 + 0.7 * len(options) + 2.0, height), dpi=110)
    image = axes.imshow(values, aspect="auto", cmap="magma_r", interpolation="nearest")
    axes.set_xticks(range(len(options)), options, rotation=45, ha="right", fontsize=8)
    step = max(1, len(unit_names) // 30)
    axes.set_yticks(range(0, len(unit_names), step), [unit_names[i] for i in range(0, len(unit_names), step)],
                    fontsize=6)
    axes.set_xlabel("option")
    axes.set_ylabel("unit (input side at the top)")
    axes.set_title("sensitivity: KL when only this unit takes this option", fontsize=10)
    figure.colorbar(image, ax=axes, label="log10 KL when only this unit is quantized")
    figure.tight_layout()
    return figure


def pareto_figure(kl_series: Mapping[str, Sequence[tuple[float, float]]],
                  perplexity_series: Mapping[str, Sequence[tuple[float, float]]] | None = None,
                  xlabel: str = "bits per weight of the block linears (scales counted)") -> "object":
    """Size against KL (log) and, where measured, against perplexity; one series per method."""
    plt = pyplot()
    panels = 2 if perplexity_series else 1
    figure, grid = plt.subplots(1, panels, figsize=(7 * panels, 4.5), dpi=100, squeeze=False)
    styles = ["o-", "s--", "^-.", "v:", "D-", "P--", "X-.", "*:", "h-", "<--"]
    for axes, series, ylabel in zip(grid.flat, (kl_series, perplexity_series or {}),
                                    ("KL(base || quantized), nats/token", "perplexity")):
        for index, (name, points) in enumerate(series.items()):
            points = sorted(p for p in points if p[1] is not None and np.isfinite(p[1]))
            if points:
                axes.plot([p[0] for p in points], [p[1] for p in points], styles[index % len(styles)], ms=4,
                          label=name)
        axes.set_yscale("log")
        axes.set_xlabel(xlabel)
        axes.set_ylabel(ylabel)
        axes.set_title(f"size against {ylabel.split(',')[0]}", fontsize=10)
        axes.grid(True, which="both", alpha=0.3)
        axes.legend(fontsize=7)
    figure.tight_layout()
    return figure


def plan_bits_figure(unit_names: Sequence[str], bits: Sequence[float], labels: Sequence[str]) -> "object":
    """Bits per weight of every unit under a plan, coloured by the option it takes."""
    plt = pyplot()
    figure, axes = plt.subplots(figsize=(max(8.0, 0.16 * len(unit_names) + 2), 4.0), dpi=100)
    options = list(dict.fromkeys(labels))
    colours = plt.get_cmap("tab10")
    for index, option in enumerate(options):
        positions = [i for i, label in enumerate(labels) if label == option]
        axes.bar(positions, [bits[i] for i in positions], color=colours(index % 10), label=option)
    step = max(1, len(unit_names) // 30)
    axes.set_xticks(range(0, len(unit_names), step), [unit_names[i] for i in range(0, len(unit_names), step)],
                    rotation=90, fontsize=6)
    axes.set_xlabel("unit (input side on the left)")
    axes.set_ylabel("bits per weight (scales counted)")
    axes.set_title("the plan: bits per unit", fontsize=10)
    axes.legend(fontsize=7, ncols=min(len(options), 6))
    figure.tight_layout()
    return figure
