"""Static figures (PNG) drawn with matplotlib's non-interactive backend."""
from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Sequence

from layerwise.util.files import atomic_path

if TYPE_CHECKING:
    from layerwise.plan.sensitivity import SensitivityTable


def pareto_plot(rows: Sequence[dict], table: "SensitivityTable", path: str | Path,
                measured: dict[str, Sequence[tuple[float, float]]] | None = None) -> Path:
    """Bits per weight against KL: the allocator's curve predicted from the table, each option
    applied uniformly (predicted), and any measured series {name: [(bits, kl), ...]}."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(figsize=(7, 4.5), dpi=120)
    axes.plot([r["bits_per_weight"] for r in rows], [r["predicted_kl"] for r in rows], "o-", ms=3,
              label="per-layer plan, predicted (additive table)")
    uniform = [(bits, float(table.kl[:, i].sum())) for i, bits in enumerate(table.option_bits().values())
               if bits == bits]
    axes.plot(*zip(*uniform), "s", color="gray", label="uniform options, predicted")
    for name, points in (measured or {}).items():
        points = sorted(points)
        axes.plot([p[0] for p in points], [p[1] for p in points], "^--", label=name)
    axes.set_yscale("log")
    axes.set_xlabel("bits per weight of the block linears (scales counted)")
    axes.set_ylabel("KL(base || quantized), nats/token")
    axes.grid(True, which="both", alpha=0.3)
    axes.legend(fontsize=8)
    figure.tight_layout()
    with atomic_path(path) as tmp:
        figure.savefig(tmp, format="png")
    plt.close(figure)
    return Path(path)


def sensitivity_heatmap(table: "SensitivityTable", path: str | Path) -> Path:
    """log10 KL of every unit (rows, in depth order) under every option (columns)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    values = np.log10(np.where(np.isfinite(table.kl) & (table.kl > 0), table.kl, np.nan))
    height = max(4.0, 0.12 * len(table.units) + 1.5)
    figure, axes = plt.subplots(figsize=(1.0 + 0.7 * len(table.options) + 2.0, height), dpi=110)
    image = axes.imshow(values, aspect="auto", cmap="magma_r", interpolation="nearest")
    axes.set_xticks(range(len(table.options)), table.options, rotation=45, ha="right", fontsize=8)
    step = max(1, len(table.units) // 30)
    axes.set_yticks(range(0, len(table.units), step), [table.units[i].name for i in range(0, len(table.units), step)],
                    fontsize=6)
    axes.set_xlabel("option")
    axes.set_ylabel("unit (input side at the top)")
    figure.colorbar(image, ax=axes, label="log10 KL when only this unit is quantized")
    figure.tight_layout()
    with atomic_path(path) as tmp:
        figure.savefig(tmp, format="png")
    plt.close(figure)
    return Path(path)
