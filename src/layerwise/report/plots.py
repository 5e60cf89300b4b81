"""PNG files of the figures in `report.figures`, written atomically."""
from __future__ import annotations

import io
from pathlib import Path
from typing import TYPE_CHECKING, Sequence

from layerwise.report.figures import pareto_figure, sensitivity_figure
from layerwise.util.files import atomic_path

if TYPE_CHECKING:
    from layerwise.plan.table import SensitivityTable


def png_bytes(figure) -> bytes:
    """The figure as PNG bytes; the figure is closed."""
    import matplotlib.pyplot as plt

    buffer = io.BytesIO()
    figure.savefig(buffer, format="png")
    plt.close(figure)
    return buffer.getvalue()


def save_figure(figure, path: str | Path) -> Path:
    data = png_bytes(figure)
    with atomic_path(path) as tmp:
        Path(tmp).write_bytes(data)
    return Path(path)


def pareto_plot(rows: Sequence[dict], table: "SensitivityTable", path: str | Path,
                measured: dict[str, Sequence[tuple[float, float]]] | None = None) -> Path:
    """Bits per weight against KL: the allocator's curve predicted from the table, each option
    applied uniformly (predicted), and any measured series {name: [(bits, kl), ...]}."""
    series = {"per-layer plan, predicted (additive table)": [(r["bits_per_weight"], r["predicted_kl"]) for r in rows],
              "uniform options, predicted": [(bits, float(table.kl[:, i].sum()))
                                             for i, bits in enumerate(table.option_bits().values()) if bits == bits]}
    series |= dict(measured or {})
    return save_figure(pareto_figure(series), path)


def sensitivity_heatmap(table: "SensitivityTable", path: str | Path) -> Path:
    """log10 KL of every unit (rows, in depth order) under every option (columns)."""
    return save_figure(sensitivity_figure([unit.name for unit in table.units], table.options, table.kl), path)
