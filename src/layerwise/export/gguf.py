"""A GGUF file with one type per tensor, from a plan whose options are GGUF types.

The container is written by gguf-py (the library llama.cpp's own converter uses). The source is
a GGUF file of the same model: the model's own, or for a Hugging Face model the one llama.cpp's
converter makes of it (`layerwise.export.convert`). Its metadata and tokenizer are copied, every
tensor the plan does not quantize is copied byte for byte, and every tensor it does gets the
codes our quantizers made, which are llama.cpp's byte layouts (bit-exact with gguf-py for the
types it implements).

llama.cpp stores Llama-family q/k projections with rows permuted for its rotary kernel
(transformers' GGUF loader undoes it on reading); block types quantize each row on its own, so
the stored codes are permuted the same way, with no requantization.
"""
from __future__ import annotations

import tempfile
from collections import Counter
from pathlib import Path

import numpy as np

from layerwise.errors import LayerwiseError
from layerwise.export.registry import ExportJob, register_exporter
from layerwise.models.adapters import expert_of
from layerwise.models.gguf_names import gguf_tensor_names
from layerwise.models.loading import LoadedModel, ModelSource
from layerwise.plan.plan import Plan
from layerwise.quant.qtensor import QTensor
from layerwise.util.files import atomic_path

# Architectures whose GGUF q/k rows are permuted (llama.cpp's convert_hf_to_gguf.py LlamaModel).
_PERMUTED_QK = {"llama", "mistral", "granite"}


def require_gguf_source(source: ModelSource) -> Path:
    """The source's .gguf file; anything else is refused, since its metadata and tokenizer are copied."""
    if source.kind != "gguf" or not source.gguf_file:
        raise LayerwiseError("GGUF export needs a GGUF of the model to copy metadata and tokenizer from: a model "
                             "read from a .gguf file, or one converted by llama.cpp's convert_hf_to_gguf.py "
                             "(--converter)")
    return Path(source.location) / source.gguf_file


def _permute_rows(rows: np.ndarray, n_head: int) -> np.ndarray:
    """HF row order -> llama.cpp's (the inverse of transformers' reverse permutation)."""
    dim = rows.shape[0] // n_head // 2
    return rows.reshape(n_head, 2, dim, *rows.shape[1:]).swapaxes(1, 2).reshape(rows.shape)


def _find_by_rows(loaded: LoadedModel, module: str, existing: dict, claimed: set[str]) -> list[tuple[str, np.ndarray]]:
    """The float source tensors of the module's block that hold its rows, each with the indices of
    the module's rows it holds, in its order. Block types quantize each row on its own, so where a
    converter only reorders or splits rows our codes stay valid row by row. The model holds the
    quantized weights by now, so each source row is matched to its nearest quantized row, which
    must be clearly nearer than any other (quantization moves a row far less than rows differ)."""
    import torch

    from layerwise.models.layout import linear_weight

    weight = linear_weight(loaded.model.get_submodule(module)).detach().float()
    # A few hundred columns tell rows apart as well as all of them, at a fraction of the cost.
    columns = slice(None, None, max(1, weight.shape[1] // 256))
    ours = weight[:, columns]
    prefix = f"blk.{module.removeprefix(loaded.adapter.blocks + '.').split('.', 1)[0]}."
    found, taken = [], np.zeros(weight.shape[0], dtype=bool)
    for name, tensor in existing.items():
        if (not name.startswith(prefix) or name in claimed or tensor.data.ndim != 2
                or tensor.tensor_type.name not in ("F32", "F16", "BF16")):
            continue
        values = _float_rows(tensor)
        if values.shape[1] != weight.shape[1]:
            continue
        rows = torch.from_numpy(np.array(values[:, columns]))
        distances = torch.cdist(rows, ours)
        nearest = distances.topk(min(2, weight.shape[0]), dim=1, largest=False)
        best = nearest.values[:, 0]
        clear = best < 0.5 * nearest.values[:, -1] if weight.shape[0] > 1 else torch.ones_like(best, dtype=torch.bool)
        if bool(clear.all()) and bool((best <= 0.5 * rows.norm(dim=1)).all()):
            indices = nearest.indices[:, 0].numpy()
            found.append((name, indices))
            taken[indices] = True
    if not found or not taken.all() or sum(len(indices) for _, indices in found) != weight.shape[0]:
        raise LayerwiseError(f"the source GGUF has no tensor for {module}, neither by name nor holding its rows "
                             "(a GGUF of another model, or a converter that changes this weight's values, which "
                             "our quantized codes then cannot stand for)")
    return found


def _float_rows(tensor) -> np.ndarray:
    """A float GGUF tensor's values as float32 rows (gguf-py hands bfloat16 over as raw 16-bit words)."""
    data = np.asarray(tensor.data)
    if tensor.tensor_type.name == "BF16":
        data = (data.view(np.uint16).astype(np.uint32) << 16).view(np.float32)
    return data.astype(np.float32, copy=False).reshape(data.shape[0], -1)


def check_gguf_exportable(quantized: dict[str, QTensor], dropped: list[str] | None = None) -> None:
    """Refuse what a GGUF cannot hold: dropped units, and formats that are not GGUF block types."""
    if dropped:
        raise LayerwiseError("GGUF export of plans that drop units is not supported yet; llama.cpp has no way to "
                             "mark a sublayer absent (whole blocks would need renumbering)")
    not_gguf = [f"{name} ({q.config.label})" for name, q in quantized.items() if q.packed is None]
    if not_gguf:
        raise LayerwiseError(f"GGUF stores only its own block types; these modules use other formats: "
                             f"{', '.join(not_gguf[:3])}{' ...' if len(not_gguf) > 3 else ''}. Plan with GGUF "
                             "options such as q4_0, q5_0, q8_0, q4_k")
    formats: dict[str, set[str]] = {}
    for name, q in quantized.items():
        if expert_of(name) >= 0:
            formats.setdefault(name.replace(f".experts.{expert_of(name)}.", ".experts.*."), set()).add(q.config.format)
    mixed = [name for name, found in formats.items() if len(found) > 1]
    if mixed:
        raise LayerwiseError(f"GGUF keeps the routed experts of a block in one tensor of one type, but {mixed[0]} "
                             "mixes types; plan with --granularity sublayer or linear for a GGUF")


def export_gguf(loaded: LoadedModel, quantized: dict[str, QTensor], out: str | Path,
                dropped: list[str] | None = None, source: str | Path | None = None) -> dict:
    """Write `out`; return what was written: bytes in total and per type, and the equivalent
    llama-quantize --tensor-type arguments. `source` is the GGUF to copy everything else from
    (default: the file the model was read from)."""
    import gguf

    check_gguf_exportable(quantized, dropped)
    source = Path(source) if source is not None else require_gguf_source(loaded.source)
    reader = gguf.GGUFReader(source)
    arch = str(reader.fields["general.architecture"].contents())
    existing = {tensor.name: tensor for tensor in reader.tensors}
    names = gguf_tensor_names(loaded, list(quantized), arch, strict=False)
    # What the name map does not place, the converter split or reordered (Qwen3-Next's fused
    # linear-attention input): found by its rows.
    by_rows = {module: _find_by_rows(loaded, module, existing, claimed=set(names.values()))
               for module in quantized if names.get(module) not in existing}
    config = loaded.model.config
    replacement: dict[str, tuple[np.ndarray, int]] = {}
    experts: dict[str, dict[int, np.ndarray]] = {}
    for module, q in quantized.items():
        packed = np.ascontiguousarray(q.packed)
        qtype = int(getattr(gguf.GGMLQuantizationType, q.config.format.upper()))
        if module in by_rows:
            for tensor_name, rows in by_rows[module]:
                replacement[tensor_name] = (np.ascontiguousarray(packed[rows]), qtype)
            continue
        tensor_name = names[module]
        if arch in _PERMUTED_QK and (".attn_q." in tensor_name or ".attn_k." in tensor_name):
            heads = config.num_attention_heads if ".attn_q." in tensor_name else config.num_key_value_heads
            packed = np.ascontiguousarray(_permute_rows(packed, heads))
        if expert_of(module) >= 0:
            experts.setdefault(tensor_name, {})[expert_of(module)] = packed
        replacement[tensor_name] = (packed, qtype)  # a routed expert's slice: the stack replaces it below
    for tensor_name, slices in experts.items():
        if sorted(slices) != list(range(len(slices))):
            raise LayerwiseError(f"{tensor_name} needs every routed expert of its block quantized; the plan has "
                                 f"experts {sorted(slices)}")
        replacement[tensor_name] = (np.stack([slices[e] for e in range(len(slices))]), replacement[tensor_name][1])

    out = Path(out)
    with atomic_path(out) as tmp:
        writer = gguf.GGUFWriter(tmp, arch, endianess=reader.endianess)
        for field in reader.fields.values():
            # Virtual fields, the architecture (written by the writer) and the file type (no longer
            # one type) are not copied.
            if field.name.startswith("GGUF.") or field.name in ("general.architecture", "general.file_type"):
                continue
            value_type = field.types[0]
            sub_type = field.types[-1] if value_type == gguf.GGUFValueType.ARRAY else None
            writer.add_key_value(field.name, field.contents(), value_type, sub_type=sub_type)
        writer.add_string("layerwise.note", "per-tensor types from a layerwise plan")
        types: Counter = Counter()
        type_bytes: Counter = Counter()
        for tensor in reader.tensors:
            data, qtype = replacement.get(tensor.name, (tensor.data, int(tensor.tensor_type)))
            writer.add_tensor_info(tensor.name, data.shape, data.dtype, data.nbytes,
                                   raw_dtype=gguf.GGMLQuantizationType(qtype))
            name = gguf.GGMLQuantizationType(qtype).name
            types[name] += 1
            type_bytes[name] += data.nbytes
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_ti_data_to_file()
        for tensor in reader.tensors:
            data = replacement.get(tensor.name, (tensor.data, None))[0]
            writer.write_tensor_data(data, tensor_endianess=reader.endianess)
        writer.close()
    # One argument per tensor (the routed experts of a block share theirs).
    placed = {module: [name for name, _ in by_rows[module]] if module in by_rows else [names[module]]
              for module in quantized}
    tensor_types = list(dict.fromkeys(f"--tensor-type {name.removesuffix('.weight')}={q.config.format}"
                                      for module, q in quantized.items() for name in placed[module]))
    return {"path": str(out), "file_bytes": out.stat().st_size, "tensors_by_type": dict(types),
            "bytes_by_type": dict(type_bytes), "planned_tensor_bytes": sum(p.nbytes for p, _ in replacement.values()),
            "llama_quantize_args": tensor_types}


def converter_for(source: ModelSource, converter: str | Path | None) -> Path | None:
    """A Hugging Face model is converted by llama.cpp's converter first: found before any work."""
    if source.kind == "gguf":
        return None
    from layerwise.export.convert import find_converter

    return find_converter(converter)


@register_exporter("gguf", folder=False, streams=True, prepare=converter_for,
                   description="one GGUF file with the plan's llama.cpp type per tensor (the plan must use GGUF types)")
def write_gguf(job: ExportJob) -> dict:
    if job.source.kind == "gguf":
        report = export_gguf(job.loaded, job.stored, job.out, job.dropped)
    else:
        from layerwise.export.convert import convert_to_gguf

        check_gguf_exportable(job.stored, job.dropped)  # before converting
        with tempfile.TemporaryDirectory(prefix="layerwise-convert-") as scratch:
            converted = convert_to_gguf(job.source, Path(scratch) / "converted.gguf", job.loaded.model.dtype,
                                        job.converter, job.loaded.adapter.converter_args)
            report = export_gguf(job.loaded, job.stored, job.out, job.dropped, source=converted)
        report["converted_by"] = str(job.converter)
    _check_no_larger(job.plan, job.out, report)
    return report


def _check_no_larger(plan: Plan, out: Path, report: dict) -> None:
    """A plan made to be no larger than a reference GGUF (`plan --budget-like`) must give a file no
    larger than it: our metadata comes from our own source GGUF, which could be longer than the
    reference's. A larger file is removed, not left half right."""
    like = ((plan.meta or {}).get("provenance") or {}).get("budget_like")
    if not like:
        return
    report["reference"] = {"file": like["file"], "file_bytes": like["file_bytes"]}
    if report["file_bytes"] > like["file_bytes"]:
        out.unlink(missing_ok=True)
        raise LayerwiseError(f"the GGUF would be {report['file_bytes']:,} bytes, {report['file_bytes'] - like['file_bytes']:,} "
                             f"more than {Path(like['file']).name} ({like['file_bytes']:,}), which the plan was made to "
                             "match: the source's metadata or untouched tensors are larger than the reference's; nothing "
                             "was written")
