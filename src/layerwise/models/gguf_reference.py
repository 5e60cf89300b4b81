"""A GGUF file to match in size: what its tensors take, for plans that must be no larger.

People compare a quantization with the file they would otherwise download (llama-quantize's
Q4_K_M, say). A plan "like" such a file gets, for the tensors it plans (block linears, token
embedding, output head), at most the bytes the reference's same tensors take; everything else
(metadata, tokenizer, norms) is copied from a GGUF of the same model on export, as it is in the
reference, so the whole file is no larger. The export checks that it is not.
"""
from __future__ import annotations

from collections import Counter
from dataclasses import dataclass
from pathlib import Path

from layerwise.errors import LayerwiseError
from layerwise.models.gguf_names import gguf_architecture, gguf_tensor_parts
from layerwise.models.integrity import check_gguf
from layerwise.models.loading import LoadedModel
from layerwise.util.meta import file_fingerprint

# GGUF aligns every tensor's data (32 bytes by default), so a tensor of other bytes than the
# reference's may take up to one alignment more; and our file carries one note the reference does
# not. Kept back from the budget so the whole file stays within the reference's size.
ALIGNMENT_SLACK = 32
METADATA_SLACK = 1024


@dataclass(frozen=True)
class ReferenceFile:
    path: str
    sha256: str
    file_bytes: int
    tensor_bytes: dict[str, int]  # planned module -> bytes of its tensor in the reference
    tensor_types: dict[str, str]  # planned module -> the reference's GGML type

    @property
    def planned_bytes(self) -> int:
        """What the planned tensors may take together in a file no larger than the reference."""
        return sum(self.tensor_bytes.values()) - ALIGNMENT_SLACK * len(self.tensor_bytes) - METADATA_SLACK

    def describe(self) -> dict:
        types = dict(Counter(self.tensor_types.values()))
        return {"file": self.path, "sha256": self.sha256, "file_bytes": self.file_bytes,
                "planned_tensor_bytes": sum(self.tensor_bytes.values()), "budget_bytes": self.planned_bytes,
                "tensor_types": types}


def read_reference(loaded: LoadedModel, path: str | Path, modules: list[str]) -> ReferenceFile:
    """The sizes of `modules`' tensors in the GGUF at `path`, checked to be this model's (same
    architecture, every tensor present with the same number of weights)."""
    import gguf

    path = Path(path)
    if not path.is_file():
        raise LayerwiseError(f"reference file {path} not found")
    summary = check_gguf(path)  # bad magic, a truncated file: one line
    arch = summary["architecture"]
    ours = gguf_architecture(loaded)
    if arch != ours:
        raise LayerwiseError(f"{path.name} is a GGUF of architecture {arch!r}, this model's is {ours!r}")
    parts = gguf_tensor_parts(loaded, modules, ours)
    tensors = summary["tensor_table"]
    # Modules sharing a tensor (the routed experts of a block), or pieces of one module (a split).
    by_tensors: dict[tuple[str, ...], list[str]] = {}
    for module in modules:
        by_tensors.setdefault(parts[module], []).append(module)
    sizes, types = {}, {}
    for names, members in by_tensors.items():
        found = [tensors.get(name) for name in names]
        counts = [loaded.model.get_submodule(module).weight.numel() for module in members]
        weights = sum(counts)
        elements = sum(tensor.elements for tensor in found if tensor is not None)
        if None in found or elements != weights:
            what = "absent" if None in found else f"{elements} weights, not {weights}"
            raise LayerwiseError(f"{path.name} is not a GGUF of this model: its tensor {' + '.join(names)} is {what}")
        total_bytes = sum(tensor.nbytes for tensor in found)
        # A split module's pieces may differ in type: the costlier per weight speaks for it.
        widest_type = max(found, key=lambda tensor: tensor.nbytes / tensor.elements).tensor_type
        for module, count in zip(members, counts):
            # The routed experts of a block share one tensor: each is given its share of the bytes.
            sizes[module] = total_bytes * count // weights
            types[module] = gguf.GGMLQuantizationType(widest_type).name
    return ReferenceFile(str(path.resolve()), file_fingerprint(path), path.stat().st_size, sizes, types)
