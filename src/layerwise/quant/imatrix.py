"""The importance matrix: for every linear, the sum of each input column's squares over
calibration tokens, in llama.cpp's own file formats.

`llama-quantize --imatrix` weights each column's rounding error by its mean square input
(sum / count) when it chooses block scales; that is most of what separates llama.cpp's stock
Q3_K/Q4_K files from plain rounding. This module computes the statistic with hooks on the
model's linears (the inputs llama.cpp's MUL_MAT sees), reads files that `llama-imatrix` wrote,
and writes ours in the same formats, so either tool's file serves either quantizer:

- GGUF (llama-imatrix's default): `general.type = "imatrix"`, `imatrix.datasets`,
  `imatrix.chunk_count`, `imatrix.chunk_size`, and per weight `<tensor>.in_sum2` (float32,
  [matrices, columns]) and `<tensor>.counts` (float32, tokens per matrix);
- legacy `.dat`: per entry the name, the number of chunks and sum / count * chunks.

Entries are keyed by GGUF tensor name ("blk.3.ffn_down.weight"); `importance_for` maps them to
the model's modules. Chunking follows llama-imatrix: the text is tokenized once (BOS first when
the tokenizer adds one), cut into consecutive chunks of `ctx` tokens, and each chunk's first
token is replaced by BOS.
"""
from __future__ import annotations

import struct
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from layerwise.data.windows import TokenWindows, bos_policy, encode_text, read_text
from layerwise.errors import LayerwiseError
from layerwise.models.adapters import expert_of
from layerwise.models.gguf_names import gguf_tensor_names, gguf_tensor_parts
from layerwise.models.layout import block_linears, head_is_tied, linear_weight
from layerwise.models.loading import LoadedModel, load_model
from layerwise.util.files import atomic_path, check_output
from layerwise.util.meta import sha256_text
from layerwise.util.progress import progress_bars

IMATRIX_SUFFIXES = (".in_sum2", ".counts")


@dataclass
class Imatrix:
    """Per GGUF tensor name: `sums` [matrices, columns] of squared inputs and `counts` [matrices]
    of tokens summed (one matrix for a dense weight, one per expert for merged experts)."""

    sums: dict[str, np.ndarray]
    counts: dict[str, np.ndarray]
    datasets: list[str] = field(default_factory=list)
    chunk_count: int = 0
    chunk_size: int = 0
    # The model it was computed on (layerwise's fingerprint), when known: files we write carry it
    # under "layerwise.model_fingerprint", a key llama.cpp ignores.
    model_fingerprint: str | None = None

    def importance(self, tensor: str) -> np.ndarray:
        """What llama-quantize weights `tensor`'s columns by: sums / counts per matrix (1 where a
        matrix saw no token), flattened as llama.cpp passes it ([columns] for a dense weight)."""
        if tensor not in self.sums:
            raise LayerwiseError(f"the importance matrix has no entry for {tensor}")
        # In float32, as llama-quantize divides, so that equal files give equal bytes.
        sums, counts = self.sums[tensor].astype(np.float32), self.counts[tensor].astype(np.float32)
        seen = counts > 0
        values = np.where(seen[:, None], sums / np.where(seen, counts, np.float32(1))[:, None], np.float32(1))
        return values.astype(np.float32).reshape(-1)

    def save(self, path: str | Path) -> Path:
        """GGUF, or llama.cpp's legacy format when `path` ends in ".dat"."""
        path = Path(path)
        with atomic_path(path) as tmp:
            if path.suffix == ".dat":
                tmp.write_bytes(self._legacy_bytes())
            else:
                self._write_gguf(tmp)
        return path

    def _write_gguf(self, path: Path) -> None:
        import gguf

        writer = gguf.GGUFWriter(path, arch="")
        # gguf-py always adds general.architecture; llama-imatrix's files have none.
        for kv in writer.kv_data:
            kv.pop(gguf.Keys.General.ARCHITECTURE, None)
        writer.add_type("imatrix")
        # llama-quantize refuses a file without this key, and gguf-py writes no empty array.
        writer.add_array("imatrix.datasets", list(self.datasets) or ["(unknown)"])
        writer.add_uint32("imatrix.chunk_count", int(self.chunk_count))
        writer.add_uint32("imatrix.chunk_size", int(self.chunk_size))
        if self.model_fingerprint:
            writer.add_string("layerwise.model_fingerprint", self.model_fingerprint)
        for name in sorted(self.sums):  # llama-imatrix's order, for files that compare equal
            writer.add_tensor(f"{name}.in_sum2", np.ascontiguousarray(self.sums[name], dtype=np.float32))
            writer.add_tensor(f"{name}.counts", self.counts[name].astype(np.float32).reshape(-1, 1))
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.close()

    def _legacy_bytes(self) -> bytes:
        chunk = max(self.chunk_size, 1)
        out = [struct.pack("<i", len(self.sums))]
        for name in sorted(self.sums):
            sums, counts = self.sums[name], self.counts[name]
            calls = int((counts.max() + chunk - 1) // chunk)  # ceiling, as llama-imatrix
            # llama-imatrix stores mean * calls, and 1 * calls for a matrix that saw no token
            values = np.where(counts[:, None] > 0, sums / np.where(counts > 0, counts, 1)[:, None], 1.0) * calls
            encoded = name.encode()
            out += [struct.pack("<i", len(encoded)), encoded, struct.pack("<ii", calls, sums.size),
                    values.astype("<f4").tobytes()]
        dataset = (self.datasets[-1] if self.datasets else "").encode()
        out += [struct.pack("<ii", self.chunk_count, len(dataset)), dataset]
        return b"".join(out)

    @classmethod
    def load(cls, path: str | Path) -> "Imatrix":
        """A file `llama-imatrix` (or `save`) wrote, GGUF or legacy."""
        path = Path(path)
        if not path.is_file():
            raise LayerwiseError(f"no importance matrix at {path}")
        with path.open("rb") as handle:
            magic = handle.read(4)
        try:
            return _load_gguf(path) if magic == b"GGUF" else _load_legacy(path)
        except (ValueError, KeyError, IndexError, struct.error) as error:
            raise LayerwiseError(f"{path} is not a readable importance matrix ({type(error).__name__}: {error})") \
                from None


def _load_gguf(path: Path) -> Imatrix:
    import gguf

    reader = gguf.GGUFReader(path)
    kind = reader.fields.get("general.type")
    if kind is None or kind.contents() != "imatrix":
        raise LayerwiseError(f"{path} is a GGUF file, but not an importance matrix (general.type is not 'imatrix')")
    tensors = {tensor.name: np.asarray(tensor.data, dtype=np.float32) for tensor in reader.tensors}
    sums, counts = {}, {}
    for name, data in tensors.items():
        if name.endswith(".in_sum2"):
            base = name.removesuffix(".in_sum2")
            if f"{base}.counts" not in tensors:
                raise LayerwiseError(f"{path}: {name} has no matching {base}.counts")
            count = tensors[f"{base}.counts"].reshape(-1).astype(np.float64)
            sums[base] = data.reshape(len(count), -1).astype(np.float64)
            counts[base] = count

    def value(key: str, default: Any) -> Any:
        found = reader.fields.get(key)
        return default if found is None else found.contents()

    if not sums:
        raise LayerwiseError(f"{path} holds no importance entries")
    return Imatrix(sums, counts, list(value("imatrix.datasets", [])), int(value("imatrix.chunk_count", 0)),
                   int(value("imatrix.chunk_size", 0)), value("layerwise.model_fingerprint", None))


def _load_legacy(path: Path) -> Imatrix:
    data = path.read_bytes()
    (n_entries,), offset = struct.unpack_from("<i", data, 0), 4
    if n_entries < 1 or n_entries > 1_000_000:
        raise LayerwiseError(f"{path} is neither a GGUF nor a legacy .dat importance matrix")
    sums, counts = {}, {}
    for _ in range(n_entries):
        (length,) = struct.unpack_from("<i", data, offset)
        name = data[offset + 4: offset + 4 + length].decode()
        offset += 4 + length
        calls, n_values = struct.unpack_from("<ii", data, offset)
        offset += 8
        values = np.frombuffer(data, dtype="<f4", count=n_values, offset=offset).astype(np.float64)
        offset += 4 * n_values
        # Stored as sum / count * calls: keep it with `calls` as the count, so that sums / counts
        # is the mean square, as llama-quantize reads it (which takes the values as they are
        # when calls is 0).
        sums[name], counts[name] = values.reshape(1, -1), np.array([float(calls) if calls > 0 else 1.0])
    chunk_count, datasets = 0, []
    if offset + 4 <= len(data):  # the trailer (chunk count, dataset name) is optional, as in llama.cpp
        (chunk_count,) = struct.unpack_from("<i", data, offset)
        if offset + 8 <= len(data):
            (length,) = struct.unpack_from("<i", data, offset + 4)
            if 0 < length <= len(data) - offset - 8:
                datasets.append(data[offset + 8: offset + 8 + length].decode(errors="replace"))
    return Imatrix(sums, counts, datasets, chunk_count, 0)


def imatrix_windows(tokenizer: Any, data: str | Path, *, ctx: int = 512, chunks: int | None = None,
                    bos: bool | None = None) -> TokenWindows:
    """llama-imatrix's chunks of `data`: consecutive `ctx` tokens, the first of each made BOS."""
    text, description = read_text(data)
    bos_id = bos_policy(tokenizer) if bos is None else (tokenizer.bos_token_id if bos else None)
    ids = ([bos_id] if bos_id is not None else []) + encode_text(tokenizer, text)
    available = len(ids) // ctx
    if len(ids) < 2 * ctx:
        raise LayerwiseError(f"data {description} has {len(ids)} tokens; llama-imatrix's chunking needs at least "
                             f"{2 * ctx} for a context of {ctx}")
    n_chunks = available if chunks is None else min(chunks, available)
    rows = torch.tensor(ids[: n_chunks * ctx], dtype=torch.long).reshape(n_chunks, ctx)
    if bos_id is not None:
        rows[:, 0] = bos_id
    return TokenWindows(rows, description, sha256_text(text), None, bos_id)


@torch.no_grad()
def collect_imatrix(loaded: LoadedModel, windows: TokenWindows, *, include_output: bool = False,
                    batch_size: int = 1, progress: bool = True) -> Imatrix:
    """Sums of squared inputs of every block linear (and the LM head with `include_output`)."""
    model, adapter = loaded.model, loaded.adapter
    modules = {name: module for _, name, module in block_linears(model, adapter)}
    if include_output:
        modules[adapter.lm_head] = model.get_submodule(adapter.lm_head)
    tensor_parts = gguf_tensor_parts(loaded, list(modules))
    sums: dict[str, torch.Tensor] = {}
    counts: dict[str, int] = {}

    def hook(name: str):
        def gather(module, args) -> None:
            x = args[0].reshape(-1, args[0].shape[-1]).double()
            sums[name] = (x * x).sum(dim=0) + sums.get(name, 0)
            counts[name] = counts.get(name, 0) + len(x)
        return gather

    handles = [module.register_forward_pre_hook(hook(name)) for name, module in modules.items()]
    try:
        with progress_bars(progress) as bars:
            task = bars.add_task("importance matrix", total=len(windows.input_ids))
            for batch in windows.batches(batch_size):
                model(input_ids=batch.to(loaded.input_device), use_cache=False)
                bars.advance(task, len(batch))
    finally:
        for handle in handles:
            handle.remove()
    # One row per matrix: a dense weight's, or each routed expert's of a block's merged tensor (in
    # expert order, with the tokens routed to it; zero where none was). Held at the float32
    # precision the file stores, so that the object and its file weigh alike.
    rows: dict[str, dict[int, str]] = {}
    for name in modules:
        for tensor in tensor_parts[name]:
            rows.setdefault(tensor, {})[max(expert_of(name), 0)] = name
    tensor_sums, tensor_counts = {}, {}
    for tensor, by_row in rows.items():
        names = [by_row[row] for row in range(len(by_row))]
        unseen = np.zeros(linear_weight(modules[names[0]]).shape[1])
        tensor_sums[tensor] = np.stack([sums[name].float().double().cpu().numpy() if name in sums else unseen
                                        for name in names])
        tensor_counts[tensor] = np.array([float(counts.get(name, 0)) for name in names])
    return Imatrix(tensor_sums, tensor_counts, [windows.source], len(windows.input_ids),
                   int(windows.input_ids.shape[1]), loaded.fingerprint)


def imatrix_applies(config) -> bool:
    """Whether an importance matrix weights this quantizer config: a GGUF type rounded to nearest
    (GPTQ onto GGUF grids weighs by its own Hessian)."""
    from layerwise.quant.formats import get_format

    return get_format(config.format).packed and config.algorithm == "rtn"


def importance_for(loaded: LoadedModel, imatrix: Imatrix, modules: list[str], *,
                   head: bool = False) -> dict[str, np.ndarray]:
    """Each module's column importance, checked against the model (entry present, one value per
    input column). With `head`, also the output head's, when the matrix has an entry for it
    (llama-imatrix --process-output, `layerwise imatrix --process-output`), keyed by the module a
    plan quantizes it as: the head, or the token embedding when the two share one matrix (whose
    columns are then the head's inputs). llama-quantize weights an untied output tensor by that
    entry but a tied embedding by none; weighting the tied one too is ours (on the dithered
    SmolLM2, Q5_1 rounding of its tied head so weighted has 0.42x the KL of plain rounding,
    bench/head_rounding.py)."""
    if imatrix.model_fingerprint and imatrix.model_fingerprint != loaded.fingerprint:
        raise LayerwiseError(f"the importance matrix was computed on another model (fingerprint "
                             f"{imatrix.model_fingerprint[:16]}...), not {loaded.source.display}")
    # A module split into several GGUF tensors reads one input: its first piece's entry serves.
    names = {module: parts[0] for module, parts in gguf_tensor_parts(loaded, modules).items()}
    missing = [names[module] for module in modules if names[module] not in imatrix.sums]
    if missing:
        raise LayerwiseError(f"the importance matrix has no entry for {missing[0]}"
                             f"{f' (and {len(missing) - 1} more)' if len(missing) > 1 else ''}; was it computed "
                             "on this model?")
    adapter = loaded.adapter
    if head:
        output = gguf_tensor_names(loaded, [adapter.lm_head], strict=False).get(adapter.lm_head)
        if output in imatrix.sums:
            names[adapter.embed if head_is_tied(loaded.model, adapter) else adapter.lm_head] = output
    found = {}
    for module, name in names.items():
        values = imatrix.importance(name)
        columns = linear_weight(loaded.model.get_submodule(module)).shape[1]
        if expert_of(module) >= 0 and values.size % columns == 0:  # a routed expert's row of its block's tensor
            values = values.reshape(-1, columns)[expert_of(module)]
        if values.size != columns:
            raise LayerwiseError(f"the importance matrix entry {name} has {values.size} values, but "
                                 f"{module} has {columns} input columns; was it computed on this model?")
        found[module] = values
    return found


def importance_digest(importance: dict[str, np.ndarray]) -> str:
    """A short hash of module -> column weights: what a sensitivity table and a plan record of the
    importance matrix they were measured with."""
    import hashlib

    digest = hashlib.sha256()
    for name in sorted(importance):
        digest.update(name.encode())
        digest.update(np.ascontiguousarray(importance[name], dtype="<f4").tobytes())
    return digest.hexdigest()[:16]


def run_imatrix(
    model: str | Path | LoadedModel,
    *,
    data: str | Path,
    out: str | Path,
    ctx: int = 512,
    chunks: int | None = 100,
    include_output: bool = False,
    overwrite: bool = False,
    dtype: str = "auto",
    device: str = "cpu",
    device_map: str | None = None,
    streaming: bool | None = False,
    progress: bool = True,
) -> Imatrix:
    """`layerwise imatrix`: the importance matrix of `model` on `data`, chunked as llama-imatrix
    chunks it (`ctx` tokens per chunk, at most `chunks` chunks), written to `out` (GGUF, or
    legacy when it ends in .dat). `streaming` reads one block at a time from disk (None: only when
    the model would not fit in memory)."""
    check_output(out, overwrite)
    loaded = model if isinstance(model, LoadedModel) else load_model(model, dtype=dtype, device=device,
                                                                      device_map=device_map, streaming=streaming)
    windows = imatrix_windows(loaded.tokenizer, data, ctx=ctx, chunks=chunks)
    imatrix = collect_imatrix(loaded, windows, include_output=include_output, progress=progress)
    imatrix.datasets = [str(data)]
    imatrix.save(out)
    return imatrix
