"""A versioned, validated mapping from modules to quantizer configs.

Rules are (pattern, config) pairs applied in order, later ones winning; a pattern is a fully
qualified module name or `re:<regular expression>` matched against the whole name. The default
applies to every linear inside the blocks; embeddings and the LM head are quantized only when a
rule names them. A rule whose config is None keeps the matched modules in float. `drop` lists
units removed altogether: whole blocks ("model.layers.3") or sublayers ("model.layers.3.attn",
"model.layers.3.mlp"); their linears are not quantized and cost nothing.
"""
from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path

from layerwise.errors import LayerwiseError
from layerwise.quant.config import QuantConfig
from layerwise.util.files import check_schema, read_artifact, write_text_atomic

SCHEMA = "layerwise.plan"
SCHEMA_VERSION = 1


def _matches(pattern: str, name: str) -> bool:
    if pattern.startswith("re:"):
        return re.fullmatch(pattern[3:], name) is not None
    return pattern == name


@dataclass(frozen=True)
class Plan:
    default: QuantConfig | None
    rules: tuple[tuple[str, QuantConfig | None], ...] = ()
    model_fingerprint: str | None = None
    meta: dict = field(default_factory=dict, compare=False)
    drop: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        for pattern, _ in self.rules:
            if pattern.startswith("re:"):
                try:
                    re.compile(pattern[3:])
                except re.error as error:
                    raise LayerwiseError(f"plan rule {pattern!r} is not a valid regular expression: {error}") from None

    @classmethod
    def uniform(cls, format: str = "int", bits: int | None = 4, group_size: int | None = 128,
                symmetric: bool = True, algorithm: str = "rtn", remainder: str = "error") -> "Plan":
        return cls(QuantConfig(format, bits, group_size, symmetric, algorithm, remainder))

    def override(self, pattern: str, config: QuantConfig | None = None, **changes) -> "Plan":
        """A new plan where `pattern` gets `config`, or the default with `changes` applied."""
        if config is None and changes:
            if self.default is None:
                raise LayerwiseError("override with field changes needs a default config; pass a QuantConfig")
            config = self.default.replace(**changes)
        return Plan(self.default, self.rules + ((pattern, config),), self.model_fingerprint, self.meta, self.drop)

    def resolve(self, block_linears: list[str], other_modules: list[str]) -> dict[str, QuantConfig]:
        """The config of every module the plan quantizes. Every rule must match some module."""
        known = block_linears + other_modules
        for pattern, _ in self.rules:
            if not any(_matches(pattern, name) for name in known):
                raise LayerwiseError(
                    f"plan rule {pattern!r} matches no quantizable module of this model "
                    f"(e.g. {block_linears[0]}, {other_modules[-1] if other_modules else ''})"
                )
        targets: dict[str, QuantConfig] = {}
        for name in known:
            config = self.default if name in block_linears else None
            for pattern, rule_config in self.rules:
                if _matches(pattern, name):
                    config = rule_config
            if config is not None:
                targets[name] = config
        return targets

    def to_dict(self) -> dict:
        return {
            "schema": SCHEMA, "schema_version": SCHEMA_VERSION,
            "default": self.default.to_dict() if self.default else None,
            "rules": [{"pattern": p, "config": c.to_dict() if c else None} for p, c in self.rules],
            "model_fingerprint": self.model_fingerprint, "meta": self.meta, "drop": list(self.drop),
        }

    def save(self, path: str | Path) -> Path:
        return write_text_atomic(path, json.dumps(self.to_dict(), indent=1) + "\n")

    @classmethod
    def from_dict(cls, data: dict, where: str = "plan") -> "Plan":
        check_schema(data, SCHEMA, SCHEMA_VERSION, where, "plan")
        default = QuantConfig.from_dict(data["default"]) if data.get("default") else None
        rules = tuple((r["pattern"], QuantConfig.from_dict(r["config"]) if r["config"] else None)
                      for r in data.get("rules", []))
        return cls(default, rules, data.get("model_fingerprint"), data.get("meta", {}), tuple(data.get("drop", ())))

    @classmethod
    def load(cls, path: str | Path) -> "Plan":
        return cls.from_dict(read_artifact(path, SCHEMA, SCHEMA_VERSION, "plan"), str(path))
