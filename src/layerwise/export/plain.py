"""The "hf" export: a plain Hugging Face folder of the dequantized weights, which loads anywhere,
with the plan beside them. Streamed, each part is held with its quantized weights while its
tensors are written (`layerwise.models.saving`)."""
from __future__ import annotations

import json

from layerwise.export.registry import ExportJob, register_exporter
from layerwise.models.saving import save_plain


@register_exporter("hf", folder=True, streams=True,
                   description="a plain Hugging Face folder of the dequantized weights (loads anywhere), plan.json beside")
def write_plain(job: ExportJob) -> dict:
    save_plain(job.loaded, job.out, {"plan.json": json.dumps(job.plan.to_dict(), indent=1) + "\n"})
    return {"path": str(job.out), "file_bytes": sum(p.stat().st_size for p in job.out.iterdir())}
