"""The report's first section: what a person can act on, from whatever the run directory holds.

Three questions, each answered from the best evidence present, which it names: which units matter
most and least (measured sensitivity, else the profile's ablation KL, else its LIM), what could be
dropped (the table's drop KL, else the profile's ablation KL), and what the plan costs and buys
(its size, and its KL next to uniform's at the same budget, with intervals where the artifacts
carry them). Plain data in (parsed JSON, arrays), rows of text out.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Mapping, Sequence

import numpy as np

DROP = "drop"
SHOWN = 3  # units named per finding: enough to act on, few enough to read at a glance
_KINDS = ("block", "attn", "mlp")


@dataclass(frozen=True)
class Ranking:
    """One number per unit and what that number is (the source a reader is told)."""

    units: list[str]
    values: list[float]
    source: str
    commands: list[str] | None = None  # per unit, the command that acts on it (drop candidates)

    def ordered(self) -> list[int]:
        """Indices of the units with a finite value, largest value first."""
        finite = [i for i, value in enumerate(self.values) if math.isfinite(value)]
        return sorted(finite, key=lambda i: -self.values[i])


def importance_from_table(units: Sequence[str], options: Sequence[str], cost: np.ndarray,
                          kl: np.ndarray) -> Ranking | None:
    """KL of each unit at the cheapest option other than drop that every unit was measured at
    (the option that separates units most); the mean over options where no option is complete."""
    quantizers = [o for o, name in enumerate(options) if name != DROP]
    if not quantizers:
        return None
    complete = [o for o in quantizers if np.isfinite(kl[:, o]).all()]
    if complete:
        cheapest = min(complete, key=lambda o: float(np.nansum(cost[:, o])))
        return Ranking(list(units), [float(v) for v in kl[:, cheapest]],
                       f"measured sensitivity: KL when only this unit takes {options[cheapest]}, the cheapest "
                       "option other than drop")
    with np.errstate(all="ignore"):
        mean = np.nanmean(np.where(np.isfinite(kl[:, quantizers]), kl[:, quantizers], np.nan), axis=1)
    return Ranking(list(units), [float(v) for v in mean],
                   "measured sensitivity: KL when only this unit is quantized, mean over the options measured")


def _ablation(blocks: Sequence[Mapping], kinds: Sequence[str], model: str) -> Ranking | None:
    present = [kind for kind in kinds if f"ablation_kl_{kind}" in blocks[0]]
    if not present:
        return None
    units, values, commands = [], [], []
    for kind in present:
        for row in blocks:
            units.append(f"block {row['block']}" + ("" if kind == "block" else f" {kind}"))
            values.append(_finite(row.get(f"ablation_kl_{kind}")))
            commands.append(f"layerwise drop {model} --indices {row['block']} --kind {kind}")
    return Ranking(units, values, "ablation KL in the profile: KL to the model without this unit, each removed "
                   "alone", commands)


def importance_from_profile(blocks: Sequence[Mapping]) -> Ranking | None:
    """The profile's ablation KL (sublayers where measured, else blocks), else its LIM."""
    if not blocks:
        return None
    ranking = _ablation(blocks, ("attn", "mlp"), "MODEL") or _ablation(blocks, ("block",), "MODEL")
    if ranking is not None:
        return ranking
    if "lim" in blocks[0]:
        return Ranking([f"block {row['block']}" for row in blocks], [_finite(row.get("lim")) for row in blocks],
                       "LIM in the profile (1 - cos(h_in, h_out); Layer-Wise Quantization's block importance): "
                       "no sensitivity table or ablation KL in this run")
    return None


def drops_from_table(table_units: Sequence[Mapping], options: Sequence[str], kl: np.ndarray,
                     model: str = "MODEL") -> Ranking | None:
    """The table's drop KL, where the table measured the drop option."""
    if DROP not in options or not np.isfinite(kl[:, list(options).index(DROP)]).any():
        return None
    return Ranking([unit["name"] for unit in table_units], [float(v) for v in kl[:, list(options).index(DROP)]],
                   "drop KL in the sensitivity table: KL when only this unit is removed",
                   [f"layerwise drop {model} --indices {unit['block']} --kind {unit.get('kind', 'block')}"
                    for unit in table_units])


def drops_from_profile(blocks: Sequence[Mapping], model: str = "MODEL") -> Ranking | None:
    """The profile's ablation KL, blocks and sublayers together: each number is the KL without
    that one unit."""
    return _ablation(blocks, _KINDS, model) if blocks else None


def _finite(value) -> float:
    return math.nan if value is None else float(value)


def number(value, interval: Sequence[float] | None = None) -> str:
    """A KL-like number to three significant digits, with its 95% interval where there is one."""
    text = f"{float(value):.3g}"
    if interval is not None and len(interval) == 2 and all(v is not None for v in interval):
        text += f" [{float(interval[0]):.3g}, {float(interval[1]):.3g}]"
    return text


def listing(ranking: Ranking, indices: Sequence[int]) -> str:
    return ", ".join(f"{ranking.units[i]} ({number(ranking.values[i])})" for i in indices)


def most_and_least(ranking: Ranking) -> tuple[list[int], list[int]]:
    """Up to SHOWN units at each end; the ends share a unit only when there is one unit."""
    order = ranking.ordered()
    shown = max(1, min(SHOWN, len(order) // 2)) if order else 0
    return order[:shown], order[::-1][:shown]


def plan_summary(report: Mapping, uniform_predicted: tuple[str, float, float] | None) -> str:
    """Size and budget; the never-worse check's measurements where the report has them (plan and
    best uniform KL on held-out calibration windows, their margin, with intervals), else its
    calibration KL; and the table's prediction against uniform when nothing measured uniform."""
    parts = [f"{report.get('returned', '?')} plan: {float(report.get('bits_per_weight', math.nan)):.3f} bits per "
             f"weight"]
    if report.get("total_bytes") is not None:
        parts[0] += f", {int(report['total_bytes']):,} bytes"
    if report.get("budget_bits_per_weight") is not None:
        parts[0] += f" (budget {float(report['budget_bits_per_weight']):.3f})"
    check = report.get("check") if isinstance(report.get("check"), Mapping) else {}
    if check.get("plan_kl") is not None:
        parts += _check_summary(check)
    elif report.get("calibration_kl") is not None:
        parts.append(f"KL on calibration windows {number(report['calibration_kl'])}")
    if uniform_predicted is not None and not check.get("best_uniform") and report.get("predicted_kl") is not None:
        option, bits, kl = uniform_predicted
        parts.append(f"the table predicts KL {number(report['predicted_kl'])} against {number(kl)} for uniform "
                     f"{option} ({bits:.3f} bits per weight)")
    return "; ".join(parts) + "."


def _check_summary(check: Mapping) -> list[str]:
    """The plan's `check` (layerwise.plan.check.UniformCheck.to_dict), in words."""
    plan = number(check["plan_kl"], check.get("plan_kl_ci"))
    parts = [f"on held-out calibration windows the allocated plan has KL {plan}"]
    best = check.get("best_uniform")
    uniform = (check.get("uniform") or {}).get(best) or {}
    if best and uniform.get("kl") is not None:
        parts[0] += f", the best uniform option within budget ({best}) {number(uniform['kl'], uniform.get('kl_ci'))}"
    if check.get("margin") is not None:
        parts.append(f"margin {number(check['margin'], check.get('margin_ci'))} (uniform minus plan; above 0: "
                     "the plan is better)")
    if check.get("ratio") is not None:
        parts.append(f"KL ratio plan / uniform {number(check['ratio'], check.get('ratio_ci'))}")
    domains = check.get("domains") if isinstance(check.get("domains"), Mapping) else {}
    if len(domains) > 1:
        parts.append("per calibration domain, KL ratio to its best uniform plan: " + ", ".join(
            f"{name} {number(entry['ratio'], entry.get('ratio_ci'))}" for name, entry in domains.items()
            if isinstance(entry, Mapping) and entry.get("ratio") is not None))
    if check.get("returned") == "uniform":
        parts.append(f"uniform {best} did better on some calibration domain, so it is the plan returned")
    elif check.get("returned") and check.get("candidates") and not check["candidates"][0].get("passed", True):
        parts.append(f"the allocated plan lost to uniform on some calibration domain; the safer "
                     f"{check['returned']} plan passed and is returned")
    return parts


def best_uniform(options: Sequence[str], cost: np.ndarray, kl: np.ndarray, weights: np.ndarray,
                 budget_bits: float) -> tuple[str, float, float] | None:
    """(option, bits per weight, predicted KL) of the uniform option with the least predicted KL
    among those within `budget_bits` per weight (what the plan's never-worse check compares to)."""
    total = float(weights.sum())
    fitting = [(float(kl[:, o].sum()), float(cost[:, o].sum() / total), name) for o, name in enumerate(options)
               if name != DROP and np.isfinite(kl[:, o]).all() and cost[:, o].sum() / total <= budget_bits + 1e-9]
    if not fitting:
        return None
    kl_sum, bits, name = min(fitting)
    return name, bits, kl_sum


def evaluation_summary(name: str, evaluation: Mapping) -> str | None:
    """Held-out KL and perplexity of one `layerwise eval --json` file, with intervals."""
    quantized = evaluation.get("quantized")
    if not isinstance(quantized, Mapping) or quantized.get("kl") is None:
        return None
    text = f"{name}: KL on held-out text {number(quantized['kl'], quantized.get('kl_ci'))}"
    if quantized.get("perplexity") is not None:
        text += f", perplexity {number(quantized['perplexity'], quantized.get('perplexity_ci'))}"
    base = evaluation.get("base") or {}
    if base.get("perplexity") is not None:
        text += f" (base {number(base['perplexity'])})"
    bits = (evaluation.get("sizes") or {}).get("linear_bits_per_weight")
    if bits is not None:
        text += f" at {float(bits):.3f} bits per weight"
    return text + "."
