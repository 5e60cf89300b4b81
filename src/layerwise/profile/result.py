"""The profile as data: versioned JSON, CSV tables, and a table for the terminal."""
from __future__ import annotations

import csv
import io
import json
import math
from dataclasses import dataclass, field
from pathlib import Path

from rich.table import Table

from layerwise.errors import LayerwiseError
from layerwise.util.files import read_artifact, write_text_atomic

SCHEMA = "layerwise.profile"
SCHEMA_VERSION = 1

# Columns shown in the terminal (all of them are in the CSV and JSON).
TERMINAL_COLUMNS = (
    ("lim", "LIM/BI"), ("attn_rel_update", "attn dh/h"), ("mlp_rel_update", "mlp dh/h"),
    ("hidden_norm", "|h|"), ("logit_lens_kl", "lens KL"), ("logit_lens_top1", "lens top1"),
    ("act_kurtosis", "kurt"), ("max_over_median", "max/med"), ("mlp_sparsity", "sparse"),
    ("zd", "ZD"), ("ablation_kl_block", "KL -blk"), ("ablation_kl_attn", "KL -attn"), ("ablation_kl_mlp", "KL -mlp"),
    ("expert_load_entropy", "load H"), ("expert_load_max", "load max"), ("shared_rel_update", "shared dh/h"),
)


@dataclass
class ProfileResult:
    """Per-block rows (`blocks`), per-linear rows (`linears`), what each column means, metadata,
    the logit lens by block and sampled position (`logit_lens`: positions, kl and top1 grids), and
    in mixture-of-experts models one row per block and routed expert (`experts`)."""

    meta: dict
    blocks: list[dict]
    linears: list[dict]
    columns: dict[str, str] = field(default_factory=dict)
    logit_lens: dict = field(default_factory=dict)
    experts: list[dict] = field(default_factory=list)

    def column(self, name: str) -> list[float]:
        """One statistic for every block, in block order."""
        if not self.blocks or name not in self.blocks[0]:
            known = sorted(self.blocks[0]) if self.blocks else []
            raise LayerwiseError(f"profile has no column {name!r}; it has: {', '.join(known)}")
        return [row[name] for row in self.blocks]

    def to_dict(self) -> dict:
        return {"schema": SCHEMA, "schema_version": SCHEMA_VERSION, "meta": self.meta,
                "columns": self.columns, "blocks": self.blocks, "linears": self.linears,
                "logit_lens": self.logit_lens} | ({"experts": self.experts} if self.experts else {})

    def save(self, out_dir: str | Path) -> list[Path]:
        """profile.json, blocks.csv and linears.csv (and experts.csv for a mixture-of-experts model)
        in `out_dir`, each written atomically."""
        out_dir = Path(out_dir)
        text = json.dumps(_json_safe(self.to_dict()), indent=1)
        written = [
            write_text_atomic(out_dir / "profile.json", text + "\n"),
            write_text_atomic(out_dir / "blocks.csv", _csv(self.blocks)),
            write_text_atomic(out_dir / "linears.csv", _csv(self.linears)),
        ]
        if self.experts:
            written.append(write_text_atomic(out_dir / "experts.csv", _csv(self.experts)))
        return written

    @classmethod
    def load(cls, path: str | Path) -> "ProfileResult":
        path = Path(path)
        if path.is_dir():
            path = path / "profile.json"
        data = read_artifact(path, SCHEMA, SCHEMA_VERSION, "profile")
        return cls(data["meta"], data["blocks"], data["linears"], data.get("columns", {}), data.get("logit_lens", {}),
                   data.get("experts", []))

    def table(self) -> Table:
        present = [(key, title) for key, title in TERMINAL_COLUMNS if self.blocks and key in self.blocks[0]]
        model = self.meta.get("model", {})
        data = self.meta.get("data", {})
        table = Table(title=f"{model.get('source', '?')}: {data.get('tokens', '?')} tokens of {data.get('source', '?')}")
        table.add_column("block", justify="right")
        for _, title in present:
            table.add_column(title, justify="right")
        for row in self.blocks:
            table.add_row(str(row["block"]), *(_fmt(row[key]) for key, _ in present))
        return table


def _fmt(value: float) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    if isinstance(value, float) and (abs(value) >= 1000 or (value != 0 and abs(value) < 1e-3)):
        return f"{value:.2e}"
    return f"{value:.4g}" if isinstance(value, float) else str(value)


def _json_safe(value):
    """NaN/inf are not JSON: write them as null."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _json_safe(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_json_safe(v) for v in value]
    return value


def _csv(rows: list[dict]) -> str:
    buffer = io.StringIO()
    if rows:
        writer = csv.DictWriter(buffer, fieldnames=list(rows[0]), lineterminator="\n")
        writer.writeheader()
        writer.writerows(rows)
    return buffer.getvalue()
