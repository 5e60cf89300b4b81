"""The sensitivity table: for every unit and option, the KL to the base model on calibration
text when only that unit is quantized with that option, and what the unit then costs in bits.
Numbers only: `layerwise.measure.sensitivity` fills it by running the model; allocators read it.
"""
from __future__ import annotations

import json
import math
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Sequence

import numpy as np

from layerwise.errors import LayerwiseError
from layerwise.plan.objectives import objective_named, relative_to_uniform
from layerwise.plan.problem import AllocationProblem
from layerwise.plan.units import EDGE_KINDS, Unit
from layerwise.quant.config import QuantConfig
from layerwise.util.files import read_artifact, write_text_atomic

if TYPE_CHECKING:
    from layerwise.models.loading import LoadedModel

SCHEMA = "layerwise.sensitivity"
SCHEMA_VERSION = 1
# The share of calibration tokens whose mean KL is an entry's tail KL (`tail_mean`): the worst 1%.
TAIL_SHARE = 0.01


@dataclass
class SensitivityTable:
    model_fingerprint: str
    granularity: str
    units: list[Unit]
    options: list[str]  # option names (`layerwise.plan.options`)
    cost_bits: np.ndarray  # [U, O] stored bits of the unit's linears; NaN where the option cannot apply
    kl: np.ndarray  # [U, O] mean KL(base || only this unit quantized), nats per token; NaN where n/a
    unit_weights: np.ndarray  # [U] weights per unit
    other_bits: int  # everything outside the block linears, as stored unquantized (for byte budgets)
    calibration: dict
    cost: dict  # seconds and forward-pass equivalents spent measuring
    skipped: dict[str, str] = field(default_factory=dict)  # "unit option" -> why the option cannot apply
    meta: dict = field(default_factory=dict)
    # With several calibration domains: domain -> [U, O] KL on that domain's windows alone (`kl` is
    # then their average). Empty for one text.
    domain_kl: dict[str, np.ndarray] = field(default_factory=dict)
    # [U, O] tail KL (`tail_mean`: the mean KL of the worst TAIL_SHARE of all calibration tokens,
    # every domain's pooled) with only this unit quantized; None where the table was filled
    # without it (estimated entries, the replayed in-memory path, tables from before it).
    tail_kl: np.ndarray | None = None

    @property
    def domains(self) -> list[str]:
        return list(self.domain_kl)

    def restricted(self, domains: list[str]) -> "SensitivityTable":
        """The table as if measured on these of its domains only (e.g. leaving one out)."""
        missing = [name for name in domains if name not in self.domain_kl]
        if missing:
            raise LayerwiseError(f"the sensitivity table has no column set for domain(s) {missing}; it was "
                                 f"measured on {self.domains or 'one text'}")
        kept = {name: self.domain_kl[name] for name in domains}
        calibration = dict(self.calibration)
        if "domains" in calibration:
            calibration["domains"] = {name: calibration["domains"][name] for name in domains}
        # The tail is pooled over every domain's tokens: it describes no subset of them.
        tail = self.tail_kl if set(domains) == set(self.domain_kl) else None
        return replace(self, kl=np.mean(np.stack(list(kept.values())), axis=0), domain_kl=kept,
                       calibration=calibration, tail_kl=tail)

    def with_options(self, names: Sequence[str]) -> "SensitivityTable":
        """The table's columns for these of its options, in this order (a table measured for more
        options serves a plan that may take fewer)."""
        missing = [name for name in names if name not in self.options]
        if missing:
            raise LayerwiseError(f"the sensitivity table has no column for option(s) {missing}; it was measured "
                                 f"for {','.join(self.options)}")
        columns = [self.options.index(name) for name in names]
        prefixes = [f"{unit.name} " for unit in self.units]
        skipped = {key: why for key, why in self.skipped.items()
                   if any(key == prefix + name for prefix in prefixes for name in names)}
        return replace(self, options=list(names), cost_bits=self.cost_bits[:, columns], kl=self.kl[:, columns],
                       skipped=skipped, domain_kl={d: kl[:, columns] for d, kl in self.domain_kl.items()},
                       tail_kl=None if self.tail_kl is None else self.tail_kl[:, columns])

    def joined(self, other: "SensitivityTable") -> "SensitivityTable":
        """This table with `other`'s columns appended: both measured on the same model, units and
        calibration windows, for different options (how a table grows by new options)."""
        if (self.model_fingerprint, self.granularity, [u.name for u in self.units]) != \
                (other.model_fingerprint, other.granularity, [u.name for u in other.units]):
            raise LayerwiseError("cannot join sensitivity tables of different models, units or granularity")
        if json.loads(json.dumps(self.calibration)) != json.loads(json.dumps(other.calibration)) or \
                self.domains != other.domains:
            raise LayerwiseError("cannot join sensitivity tables measured on different calibration windows")
        repeated = sorted(set(self.options) & set(other.options))
        if repeated:
            raise LayerwiseError(f"both sensitivity tables have option(s) {repeated}")
        ours, theirs = self.meta.get("statistics"), other.meta.get("statistics")
        if ours and theirs and json.loads(json.dumps(ours)) != json.loads(json.dumps(theirs)):
            raise LayerwiseError("cannot join sensitivity tables whose GPTQ/AWQ options were fitted on different "
                                 "windows")
        cost = {key: self.cost.get(key, 0) + other.cost.get(key, 0) for key in ("seconds", "forward_equivalents")}
        return replace(self, options=self.options + other.options, meta=self.meta | {"statistics": ours or theirs},
                       cost_bits=np.concatenate([self.cost_bits, other.cost_bits], axis=1),
                       kl=np.concatenate([self.kl, other.kl], axis=1), cost=self.cost | cost,
                       skipped=self.skipped | other.skipped,
                       domain_kl={d: np.concatenate([kl, other.domain_kl[d]], axis=1)
                                  for d, kl in self.domain_kl.items()},
                       tail_kl=(np.concatenate([self.tail_kl, other.tail_kl], axis=1)
                                if self.tail_kl is not None and other.tail_kl is not None else None))

    @property
    def configs(self) -> list[QuantConfig | str]:
        from layerwise.plan.options import parse_option  # the quantizer registry loads torch; tables are numbers
        return [parse_option(name) for name in self.options]

    @property
    def estimator(self) -> str:
        """How the entries were obtained (`layerwise.measure.estimators`); tables from before there were
        several were all measured."""
        return self.meta.get("estimator", "measured")

    @property
    def edges(self) -> bool:
        """Whether the embedding and head are units of this table (`measure_sensitivity(edges=)`)."""
        return any(unit.kind in EDGE_KINDS for unit in self.units)

    @property
    def total_weights(self) -> int:
        return int(self.unit_weights.sum())

    def option_bits(self) -> dict[str, float]:
        """Average weights-bpw of each option applied everywhere it can (NaN if it cannot apply to
        every unit)."""
        totals = self.cost_bits.sum(axis=0)
        return {name: float(total / self.total_weights) for name, total in zip(self.options, totals)}

    def budget_bits(self, bits_per_weight: float | None = None, total_bytes: float | None = None,
                    planned_bytes: float | None = None) -> float:
        """A budget as total stored bits of the units, from an average bits per weight (scales
        counted), from total model bytes (the rest of the model stays as it is, counted at 16
        bits), or from the bytes the units' tensors may take together (`planned_bytes`, e.g. what
        a reference GGUF file's same tensors take)."""
        if sum(value is not None for value in (bits_per_weight, total_bytes, planned_bytes)) != 1:
            raise LayerwiseError("give exactly one budget: bits per weight, total bytes, or planned bytes")
        if bits_per_weight is not None:
            budget = float(bits_per_weight) * self.total_weights
            shown = f"{bits_per_weight} bits per weight"
        elif planned_bytes is not None:
            budget = 8.0 * float(planned_bytes)
            shown = f"{planned_bytes} bytes for the planned tensors"
        else:
            budget = 8.0 * float(total_bytes) - self.other_bits
            shown = f"{total_bytes} bytes"
        cost = np.where(np.isfinite(self.kl), self.cost_bits, np.nan)
        smallest, largest = np.nanmin(cost, axis=1).sum(), np.nanmax(cost, axis=1).sum()

        def explain(bits: float) -> str:
            return f"{bits / self.total_weights:.4f} bits per weight, {math.ceil((bits + self.other_bits) / 8)} bytes"

        if not math.isfinite(budget) or budget < smallest:
            raise LayerwiseError(f"budget {shown} is below the smallest plan these options allow "
                                 f"({explain(smallest)}, every unit at its cheapest option)")
        if budget > largest:
            raise LayerwiseError(f"budget {shown} is above the largest plan these options allow "
                                 f"({explain(largest)}, every unit at its costliest option): nothing to "
                                 "allocate; lower the budget or add a costlier option")
        return budget

    def problem(self, budget_bits: float, objective: str = "mean", tail_weight: float = 0.0) -> AllocationProblem:
        """The allocation problem at this budget; with domains, `objective` combines them. A
        `tail_weight` w prices every entry at its KL plus w times its tail KL (`tail_kl`), in every
        domain: a plan then pays for the units whose damage falls on few tokens."""
        cost = np.nan_to_num(self.cost_bits, nan=0.0)
        names = (tuple(unit.name for unit in self.units), tuple(self.options))
        combined = objective_named(objective)
        tail = self._weighted_tail(tail_weight)
        if not self.domain_kl:
            return AllocationProblem(*names, cost, self.kl + tail, budget_bits)
        stack = np.stack([self.domain_kl[name] for name in self.domains]) + tail
        if combined.per_uniform:
            stack = relative_to_uniform(stack, cost, budget_bits)
        return AllocationProblem(*names, cost, combined.unit_loss(stack), budget_bits, stack, objective)

    def _weighted_tail(self, tail_weight: float) -> np.ndarray | float:
        check_tail_weight(tail_weight)
        if tail_weight == 0:
            return 0.0
        if self.tail_kl is None:
            raise LayerwiseError("this sensitivity table has no tail KL (its entries were estimated, replayed on a GPU, "
                                 "or measured before tails were kept): measure a new table (another --table path), "
                                 "or plan with tail weight 0")
        return tail_weight * self.tail_kl

    def check_model(self, loaded: LoadedModel) -> None:
        if self.model_fingerprint != loaded.fingerprint:
            raise LayerwiseError(f"the sensitivity table was measured on another model (fingerprint "
                                 f"{self.model_fingerprint[:16]}...), not {loaded.source.display}")

    def to_dict(self) -> dict:
        rows = table_rows
        return {
            "schema": SCHEMA, "schema_version": SCHEMA_VERSION,
            "model_fingerprint": self.model_fingerprint, "granularity": self.granularity,
            "units": [{"name": u.name, "block": u.block, "modules": list(u.modules), "kind": u.kind}
                      for u in self.units],
            "options": self.options, "cost_bits": rows(self.cost_bits), "kl": rows(self.kl),
            "unit_weights": [int(n) for n in self.unit_weights], "other_bits": int(self.other_bits),
            "calibration": self.calibration, "cost": self.cost, "skipped": self.skipped, "meta": self.meta,
            "domain_kl": {name: rows(table) for name, table in self.domain_kl.items()},
        } | ({"tail_kl": rows(self.tail_kl)} if self.tail_kl is not None else {})

    def save(self, path: str | Path) -> Path:
        return write_text_atomic(path, json.dumps(self.to_dict(), indent=1) + "\n")

    @classmethod
    def load(cls, path: str | Path) -> "SensitivityTable":
        data = read_artifact(path, SCHEMA, SCHEMA_VERSION, "sensitivity table")
        try:
            units = [Unit(u["name"], int(u["block"]), tuple(u["modules"]), u.get("kind", "block")) for u in data["units"]]
            table = cls(
                data["model_fingerprint"], data["granularity"], units, list(data["options"]),
                np.array(data["cost_bits"], dtype=np.float64), np.array(data["kl"], dtype=np.float64),
                np.array(data["unit_weights"], dtype=np.int64), int(data["other_bits"]), data["calibration"],
                data["cost"], data.get("skipped", {}), data.get("meta", {}),
                {name: np.array(rows, dtype=np.float64) for name, rows in data.get("domain_kl", {}).items()},
                np.array(data["tail_kl"], dtype=np.float64) if data.get("tail_kl") is not None else None,
            )
        except (KeyError, TypeError, ValueError) as error:
            raise LayerwiseError(f"{path} is not a complete sensitivity table ({type(error).__name__}: {error})") \
                from None
        shape = (len(units), len(table.options))
        if table.cost_bits.shape != shape or table.kl.shape != shape or \
                any(rows.shape != shape for rows in table.domain_kl.values()) or \
                (table.tail_kl is not None and table.tail_kl.shape != shape):
            raise LayerwiseError(f"{path}: tables of shape {table.kl.shape}, expected {shape}")
        return table


def edge_config(unit: Unit, config: QuantConfig) -> QuantConfig:
    """The config a unit really takes: outside the blocks (embedding, head) weights are rounded to
    nearest, as llama-quantize does (no calibration Hessian reaches them)."""
    if unit.kind in EDGE_KINDS and config.algorithm != "rtn":
        return config.replace(algorithm="rtn")
    return config


def domain_means(window_values: np.ndarray, window_domains: Sequence[str]) -> dict[str, float]:
    """The mean of the per-window values of each domain, in order of first appearance."""
    names = list(dict.fromkeys(window_domains))
    labels = np.asarray(window_domains)
    return {name: float(np.mean(window_values[labels == name])) for name in names}


def check_tail_weight(tail_weight: float) -> None:
    """Refuse a tail weight that is not a finite number >= 0 (`SensitivityTable.problem`)."""
    if not (math.isfinite(tail_weight) and tail_weight >= 0):
        raise LayerwiseError(f"tail weight {tail_weight} must be a finite number >= 0")


def tail_mean(token_values: np.ndarray, share: float = TAIL_SHARE) -> float:
    """The mean of the largest `share` of the values (at least one): the conditional value at risk
    of a per-token KL. Unlike a percentile it is subadditive, so the units' tail KLs summed bound
    the tail of a plan whose per-token KLs are the units' added."""
    values = np.sort(np.asarray(token_values, dtype=np.float64).ravel())
    return float(values[-max(1, math.ceil(share * values.size)):].mean())


def table_rows(table: np.ndarray) -> list:
    return [[None if not math.isfinite(v) else float(v) for v in row] for row in table]
