"""Streaming: a model whose blocks, embedding and head hold no weights until they are called.

The skeleton (the norms outside the blocks, buffers such as rotary frequencies) stays in memory;
every other parameter lives on the meta device and is read from the checkpoint when its part (a
block, the embedding, the head) is called, and let go when the call returns, so the weights in
memory at any time are one part's. safetensors files are opened for one part's tensors and closed
again (their pages leave the process); a GGUF is dequantized one tensor at a time by transformers'
own per-tensor conversion, so the values are those `from_pretrained(gguf_file=...)` gives. Two
parts never load whole unless held or overridden: the embedding reads the rows of the tokens it
is given, and the head reads and applies a slice of its rows at a time.

Code that reads or changes a part's weights outside its forward holds the part (`held`). Changes
that must outlast a release (quantized weights, silenced projections) are overrides: kept in their
stored form and decoded each time the part is loaded (`write_parameter`, `write_linear`).
"""
from __future__ import annotations

import contextlib
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator

import torch
from torch import nn

from layerwise.errors import LayerwiseError
from layerwise.models.adapters import Adapter
from layerwise.models.checkpoint import (GGUFTensors, SafetensorsTensors, buffers_to, checkpoint_names,
                                         open_checkpoint, owner_of, place, skeleton)
from layerwise.models.integrity import check_finite
from layerwise.models.layout import stored_transposed
from layerwise.util.memory import trim_freed_memory

# A producer of a parameter's values in the parameter's own layout (decoded when its part loads).
Producer = Callable[[], torch.Tensor]


@dataclass
class StreamedWeights:
    """Which parameters of a skeleton model are streamed, from where, and what holds them now."""

    model: nn.Module
    source: SafetensorsTensors | GGUFTensors
    checkpoint_names: dict[str, str]  # parameter name -> tensor name in the checkpoint
    parts: dict[str, nn.Module]  # part path ("model.layers.3", "lm_head") -> module
    device: torch.device
    holds: Counter = field(default_factory=Counter)
    overrides: dict[str, Producer] = field(default_factory=dict)  # keyed by checkpoint name
    use_overrides: bool = True
    loads: int = 0  # parts loaded so far (tests and benchmarks read it)
    sliced: set = field(default_factory=set)  # parts read a slice of rows at a time for each call (the head)
    # What has been checked for NaN/Inf already: (part, with overrides) as loaded, and (tensor, first
    # row, end row) slices of a sliced head. The same bytes read again need no second look (the
    # check was 15% of a streamed eval's time); a new override unchecks every part as overridden.
    checked: set = field(default_factory=set)
    # part path -> f(rows) -> rows: what a part read a few rows at a time (the embedding) makes of
    # them for the duration of `rows_transformed` (a plan's quantized embedding, never held whole).
    row_transforms: dict[str, Callable[[torch.Tensor], torch.Tensor]] = field(default_factory=dict)
    _placeholders: dict[str, nn.Parameter] = field(default_factory=dict)  # meta stand-ins, by checkpoint name

    def part_of(self, name: str) -> str | None:
        """The streamed part that holds module or parameter `name`, if any."""
        for part in self.parts:
            if name == part or name.startswith(part + "."):
                return part
        return None

    @contextlib.contextmanager
    def held(self, part: str) -> Iterator[None]:
        """Keep `part`'s weights in memory for the duration (loaded if they were not)."""
        if self.holds[part] == 0:
            self._load(part)
        self.holds[part] += 1
        try:
            yield
        finally:
            self.holds[part] -= 1
            if self.holds[part] == 0:
                self._release(part)
                # The part's weights and its call's activations came from the heap in pieces of a
                # few MB; given back now, the next part does not stack on their fragments.
                trim_freed_memory()

    @contextlib.contextmanager
    def original(self) -> Iterator[None]:
        """Load parts as the checkpoint has them, overrides ignored (the base model's outputs)."""
        if any(self.holds.values()):
            raise LayerwiseError("the original weights are asked for while a part is held with its overrides")
        self.use_overrides = False
        try:
            yield
        finally:
            self.use_overrides = True

    @contextlib.contextmanager
    def rows_transformed(self, part: str, transform: Callable[[torch.Tensor], torch.Tensor]) -> Iterator[None]:
        """The rows `part` reads for each call (the embedding's) pass through `transform` meanwhile."""
        if part in self.row_transforms or self.holds[part]:
            raise LayerwiseError(f"{part}: its rows are transformed already, or it is held whole")
        self.row_transforms[part] = transform
        try:
            yield
        finally:
            del self.row_transforms[part]

    def override(self, parameter: str, produce: Producer) -> None:
        """From now on, parameter `parameter` loads as `produce()` (tied parameters alike)."""
        self.overrides[self.checkpoint_names[parameter]] = produce
        part = self.part_of(parameter)
        self._uncheck_overridden()
        if self.holds[part]:
            self._load(part, only=parameter)

    @contextlib.contextmanager
    def overrides_restored(self) -> Iterator[None]:
        """Overrides made meanwhile (trial changes, such as silenced projections) are undone on exit."""
        saved = dict(self.overrides)
        try:
            yield
        finally:
            self.overrides = saved
            self._uncheck_overridden()

    def renumber(self, paths: dict[str, str | None]) -> None:
        """Move parts to new paths (None: gone), as when blocks are deleted and the rest renumbered:
        a moved part's parameters, under their new names, still read their own checkpoint tensors."""
        if any(self.holds.values()):
            raise LayerwiseError("parts cannot be renumbered while one is held")
        names = {}
        for name, key in self.checkpoint_names.items():
            part = self.part_of(name)
            new = paths.get(part, part) if part is not None else None
            if part is None:
                names[name] = key
            elif new is not None:
                names[new + name[len(part):]] = key
        parts = {}
        for path, module in self.parts.items():
            new = paths.get(path, path)
            if new is None:
                continue
            parts[new] = module
            if new != path:  # its forward loads the part by path: wrapped again under the new one
                del module.forward
                _load_around_calls(self, new, module)
        self.parts, self.checkpoint_names = parts, names
        self.checked = {entry for entry in self.checked if len(entry) != 2}  # paths now name other blocks

    def _uncheck_overridden(self) -> None:
        """Overrides changed: every part loaded with overrides is looked at again (tied parameters
        share a key, so not only the changed part)."""
        self.checked = {entry for entry in self.checked if not (len(entry) == 2 and entry[1])}

    def resident_parameters(self) -> int:
        """Elements of streamed parts' parameters that are in memory now (not meta)."""
        return sum(p.numel() for module in self.parts.values() for p in module.parameters() if not p.is_meta)

    def _parameters(self, part: str) -> list[tuple[nn.Module, str, str]]:
        module = self.parts[part]
        found = []
        for name, _ in module.named_parameters(remove_duplicate=False):
            found.append((*owner_of(module, name), f"{part}.{name}"))
        return found

    def _load(self, part: str, only: str | None = None) -> None:
        try:
            self._swap_in(part, only)
        except BaseException:
            if only is None:
                self._release(part)  # nothing half-loaded stays in memory
            raise

    def _swap_in(self, part: str, only: str | None) -> None:
        entries = [entry for entry in self._parameters(part) if only is None or entry[2] == only]
        wanted = []
        for _, _, name in entries:
            key = self.checkpoint_names[name]
            if not (self.use_overrides and key in self.overrides):
                wanted.append(key)
        dtypes = {self.checkpoint_names[name]: owner._parameters[attribute].dtype for owner, attribute, name in entries}
        tensors = self.source.read(sorted(set(wanted)), dtypes)
        for _, _, name in entries:
            key = self.checkpoint_names[name]
            place(self.model, name, self.overrides[key]() if self.use_overrides and key in self.overrides
                  else tensors[key], self.device)
        if only is None and (part, self.use_overrides) not in self.checked:
            check_finite(self.parts[part], part)
            self.checked.add((part, self.use_overrides))
        self.loads += only is None

    def _release(self, part: str) -> None:
        for owner, attribute, name in self._parameters(part):
            key = self.checkpoint_names[name]
            if key not in self._placeholders:  # one per checkpoint tensor: tied parameters stay tied
                old = owner._parameters[attribute]
                self._placeholders[key] = nn.Parameter(torch.empty(old.shape, dtype=old.dtype, device="meta"),
                                                       requires_grad=False)
            owner._parameters[attribute] = self._placeholders[key]


def stream_model(config: Any, adapter: Adapter, weights_at: Path, gguf_file: str | None, dtype: torch.dtype,
                 device: str, trust_remote_code: bool = False) -> tuple[nn.Module, StreamedWeights]:
    """A skeleton of the model `config` describes, its blocks, embedding and head streamed from
    the safetensors folder or GGUF file at `weights_at` (the rest read into memory now)."""
    model = skeleton(config, dtype, trust_remote_code)
    source = open_checkpoint(weights_at, gguf_file, model, config)
    names = checkpoint_names(model, source.names(), getattr(model, "base_model_prefix", ""))
    n_blocks = len(model.get_submodule(adapter.blocks))
    part_paths = [adapter.embed, *(f"{adapter.blocks}.{i}" for i in range(n_blocks)), adapter.lm_head]
    parts = {path: model.get_submodule(path) for path in part_paths}
    streamed = StreamedWeights(model, source, names, parts, torch.device(device))
    resident = [name for name, _ in model.named_parameters(remove_duplicate=False) if streamed.part_of(name) is None]
    tensors = source.read(sorted({names[name] for name in resident}),
                          {names[name]: model.get_parameter(name).dtype for name in resident})
    for name in resident:
        place(model, name, tensors[names[name]], device)
    buffers_to(model, device)
    for path, module in parts.items():
        wrap = (_embed_rows_only if path == adapter.embed
                else _head_in_slices if path == adapter.lm_head and _sliceable_head(streamed, module, adapter)
                else _load_around_calls)
        wrap(streamed, path, module)
    for path in parts:
        streamed._release(path)
    return model, streamed


def _embed_rows_only(streamed: StreamedWeights, path: str, module: nn.Module) -> None:
    """Make the embedding read, for each call, only the rows of the tokens it is given: its
    forward runs on those rows with the ids renumbered into them (subclasses that scale the
    output work unchanged), after `rows_transformed`'s transform if one is set. Held (e.g. as a
    tied head) or overridden, it loads whole instead."""
    forward = module.forward
    name = f"{path}.weight"

    def forward_with_rows(input_ids, *args, **kwargs):
        key = streamed.checkpoint_names[name]
        if streamed.holds[path] or (streamed.use_overrides and key in streamed.overrides):
            with streamed.held(path):
                return forward(input_ids, *args, **kwargs)
        unique, renumbered = torch.unique(input_ids, return_inverse=True)
        dtype = module._parameters["weight"].dtype
        rows = streamed.source.read_rows(key, unique.tolist()).to(device=streamed.device, dtype=dtype)
        if path in streamed.row_transforms:
            rows = streamed.row_transforms[path](rows).to(dtype=dtype)
        return _forward_on_rows(module, forward, rows, renumbered, args, kwargs)

    module.forward = forward_with_rows


def _forward_on_rows(module: nn.Module, forward: Callable, rows: torch.Tensor, renumbered: torch.Tensor,
                     args: tuple, kwargs: dict) -> torch.Tensor:
    """An embedding's own forward (subclasses that scale the output too) with only `rows` as its
    weight, the ids renumbered into them; its weight and padding index as they were after."""
    own, padding_idx = module._parameters["weight"], getattr(module, "padding_idx", None)
    module._parameters["weight"] = nn.Parameter(rows, requires_grad=False)
    # padding_idx only masks gradients; it would be checked against the rows, not the vocabulary.
    if padding_idx is not None:
        module.padding_idx = None
    try:
        return forward(renumbered, *args, **kwargs)
    finally:
        module._parameters["weight"] = own
        if padding_idx is not None:
            module.padding_idx = padding_idx


# Vocabulary rows of a streamed head read and applied at once: 16 MB of float32 weights (SmolLM2's
# 49k x 576 head in seven slices; the whole matrix is 0.21x of that model).
HEAD_SLICE_ELEMENTS = 1 << 22


def _sliceable_head(streamed: StreamedWeights, module: nn.Module, adapter: Adapter) -> bool:
    """A plain linear head without a bias whose rows the source reads as they are: any head in
    safetensors; in a GGUF, only one tied to the embedding (transformers' per-tensor conversions
    leave the embedding's rows alone; a separate output tensor is not checked for that)."""
    if type(module) is not nn.Linear or module.bias is not None:
        return False
    key = streamed.checkpoint_names[f"{adapter.lm_head}.weight"]
    return (isinstance(streamed.source, SafetensorsTensors)
            or key == streamed.checkpoint_names.get(f"{adapter.embed}.weight"))


def _head_in_slices(streamed: StreamedWeights, path: str, module: nn.Module) -> None:
    """Make the head read its weight a slice of vocabulary rows at a time for each call, each
    slice applied to the whole input and let go, so the [vocab, hidden] matrix is never in memory
    at once. Held or overridden (a quantized head), it loads whole instead."""
    forward = module.forward
    key = streamed.checkpoint_names[f"{path}.weight"]
    streamed.sliced.add(path)

    def forward_in_slices(hidden: torch.Tensor) -> torch.Tensor:
        if streamed.holds[path] or (streamed.use_overrides and key in streamed.overrides):
            with streamed.held(path):
                return forward(hidden)
        placeholder = module._parameters["weight"]
        vocab, width = placeholder.shape
        step = head_step(width)
        logits = torch.empty(*hidden.shape[:-1], vocab, dtype=hidden.dtype, device=hidden.device)
        for start in range(0, vocab, step):
            stop = min(vocab, start + step)
            weight = head_rows(streamed, path, start, stop, placeholder.dtype)
            logits[..., start:stop] = nn.functional.linear(hidden, weight)
            del weight
        trim_freed_memory()  # the slices' pieces, or the next call's logits stack on their fragments
        return logits

    module.forward = forward_in_slices


def head_step(width: int) -> int:
    """Vocabulary rows of a head `width` wide read and applied at once."""
    return max(1, HEAD_SLICE_ELEMENTS // width)


def head_rows(streamed: StreamedWeights, path: str, start: int, stop: int, dtype: torch.dtype) -> torch.Tensor:
    """Rows start..stop of the streamed head at `path`, as the checkpoint has them, in `dtype` on
    the model's device; checked for NaN/Inf the first time they are read."""
    key = streamed.checkpoint_names[f"{path}.weight"]
    weight = streamed.source.read_rows(key, list(range(start, stop))).to(device=streamed.device, dtype=dtype)
    if (key, start, stop) not in streamed.checked:
        if not bool(torch.isfinite(weight).all()):
            raise LayerwiseError(f"{path}: weight rows {start}..{stop} have NaN or Inf values; the checkpoint is "
                                 "corrupt")
        streamed.checked.add((key, start, stop))
    return weight


def _load_around_calls(streamed: StreamedWeights, path: str, module: nn.Module) -> None:
    """Make `module` load its weights for each call and let them go after (unless held)."""
    forward = module.forward

    def forward_with_weights(*args, **kwargs):
        with streamed.held(path):
            return forward(*args, **kwargs)

    module.forward = forward_with_weights


@contextlib.contextmanager
def embedding_rows_transformed(loaded: Any, transform: Callable[[torch.Tensor], torch.Tensor]) -> Iterator[None]:
    """For the duration, the embedding of `loaded` (a LoadedModel) looks up the rows of the tokens
    it is given as `transform` makes them (a quantized embedding, never made whole): streamed, as
    it reads them; in memory, from its weight, the module's own forward run on those rows with the
    ids renumbered into them, as a streamed embedding runs."""
    path = loaded.adapter.embed
    if loaded.streamed is not None:
        with loaded.streamed.rows_transformed(path, transform):
            yield
        return
    module = loaded.model.get_submodule(path)
    forward, weight = module.forward, module.weight

    def forward_with_rows(input_ids, *args, **kwargs):
        unique, renumbered = torch.unique(input_ids, return_inverse=True)
        rows = transform(weight.detach()[unique]).to(weight.dtype)
        return _forward_on_rows(module, forward, rows, renumbered, args, kwargs)

    module.forward = forward_with_rows
    try:
        yield
    finally:
        del module.forward  # the class's own again


def held(streamed: StreamedWeights | None, name: str) -> contextlib.AbstractContextManager:
    """Hold the streamed part that contains module `name` (nothing to do when not streaming, or
    when `name` is in the resident skeleton)."""
    part = streamed.part_of(name) if streamed is not None else None
    return streamed.held(part) if part is not None else contextlib.nullcontext()


def has_overrides(streamed: StreamedWeights | None, name: str) -> bool:
    """Whether the streamed part that contains module `name` has overrides (e.g. a quantized head)."""
    part = streamed.part_of(name) if streamed is not None else None
    return part is not None and any(streamed.checkpoint_names[parameter] in streamed.overrides
                                    for _, _, parameter in streamed._parameters(part))


def held_unless_sliced(streamed: StreamedWeights | None, name: str) -> contextlib.AbstractContextManager:
    """For many calls of the part that contains module `name`: hold it (read or decoded once for
    all of them), unless it is a head read a slice of rows at a time for each call, which then
    never sits in memory whole (an overridden head is decoded whole, so it is held)."""
    part = streamed.part_of(name) if streamed is not None else None
    if part is None or (part in streamed.sliced and not (streamed.use_overrides and has_overrides(streamed, name))):
        return contextlib.nullcontext()
    return streamed.held(part)


def by_part(streamed: StreamedWeights | None, names: list[str]) -> list[tuple[str, list[str]]]:
    """`names` (modules) grouped by the streamed part that holds them, in the model's order, so
    that each part is loaded once for all of its modules (one group per name when not streaming)."""
    if streamed is None:
        return [(name, [name]) for name in names]
    order = {part: position for position, part in enumerate(streamed.parts)}
    groups: dict[str, list[str]] = {}
    for name in names:
        groups.setdefault(streamed.part_of(name) or name, []).append(name)
    return sorted(groups.items(), key=lambda item: order.get(item[0], -1))


def write_parameter(streamed: StreamedWeights | None, model: nn.Module, name: str, produce: Producer) -> None:
    """Give parameter `name` the values `produce()` makes (in its own layout): in place in memory;
    when streaming, kept as an override that its part decodes each time it loads."""
    part = streamed.part_of(name) if streamed is not None else None
    if part is None:
        model.get_parameter(name).data.copy_(produce())
    else:
        streamed.override(name, produce)


def write_linear(streamed: StreamedWeights | None, model: nn.Module, name: str, stored: Any) -> None:
    """Give linear `name` the [out, in] weight `stored` (a tensor, or a stored form whose
    `dequantize()` gives one), in whatever layout the module keeps (GPT-2's Conv1D: transposed)."""
    transposed = stored_transposed(model.get_submodule(name))

    def produce() -> torch.Tensor:
        values = stored.dequantize() if hasattr(stored, "dequantize") else stored
        return values.t() if transposed else values

    write_parameter(streamed, model, f"{name}.weight", produce)
