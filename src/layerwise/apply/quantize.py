"""Applying a plan to a model: `quantize_` replaces weights in place by their dequantized values
and returns the stored form (codes and scales) of every quantized module, for size and export.

Data-free configs (round to nearest) need no calibration. GPTQ and AWQ run block by block: the
inputs of block i are cached, its linears' statistics gathered, its weights quantized, and its
quantized outputs become the inputs of block i+1, so memory stays near one block.
"""
from __future__ import annotations

from pathlib import Path
from typing import Mapping

import numpy as np
import torch

from layerwise.apply.storage import StoredModules
from layerwise.data.windows import TokenWindows
from layerwise.engine.hooks import advance_batches, run_block, scoped_hooks, take_first_inputs
from layerwise.engine.replay import calls_of
from layerwise.errors import LayerwiseError
from layerwise.models.layout import block_linears, blocks_of, has_experts, head_is_tied, linear_weight
from layerwise.models.loading import LoadedModel
from layerwise.models.streaming import by_part, held, write_linear
from layerwise.plan.plan import Plan
from layerwise.prune.depth import dropped_modules, drop_units_, parse_unit
from layerwise.quant.activations import InputRounding
from layerwise.quant.config import QuantConfig
from layerwise.quant.linear import InputStats, input_statistics_hooks, quantize_linear
from layerwise.quant.qtensor import QTensor
from layerwise.util.memory import trim_freed_memory
from layerwise.util.progress import progress_bars


def named_only(loaded: LoadedModel) -> list[str]:
    """Modules a plan quantizes only where a rule names them: the token embedding, the output
    head, and the routers of mixture-of-experts blocks (kept in float by default: small, and
    every token's choice of experts goes through them)."""
    adapter = loaded.adapter
    routers = [f"{adapter.blocks}.{index}.{adapter.router}"
               for index, block in enumerate(blocks_of(loaded.model, adapter)) if has_experts(block, adapter)]
    return [adapter.embed, adapter.lm_head, *routers]


def plan_targets(loaded: LoadedModel, plan: Plan) -> dict[str, QuantConfig]:
    """Module name -> config for every module `plan` quantizes in this model (not those it drops)."""
    linears = [name for _, name, _ in block_linears(loaded.model, loaded.adapter)]
    others = named_only(loaded)
    dropped = set(plan_dropped(loaded, plan))
    targets = {name: config for name, config in plan.resolve(linears, others).items() if name not in dropped}
    for name, config in targets.items():
        if config.remainder == "fallback":
            targets[name] = config.for_columns(linear_weight(loaded.model.get_submodule(name)).shape[1])
    for name in others:
        if name in targets and targets[name].algorithm != "rtn":
            raise LayerwiseError(f"{name}: only round-to-nearest is supported outside the block linears, "
                                 f"not {targets[name].algorithm!r}")
    return targets


def input_rounding_for(loaded: LoadedModel, targets: Mapping[str, QuantConfig | QTensor],
                       emulation: str) -> InputRounding:
    """`InputRounding` of the quantized model's matrix products, as `emulation` computes them:
    `targets` maps modules to their configs (or stored forms). A token embedding is looked up, not
    multiplied: its type reaches the head's inputs only when the head is tied to it."""
    adapter = loaded.adapter
    tied = head_is_tied(loaded.model, adapter)
    configs = {}
    for name, target in targets.items():
        config = target.config if isinstance(target, QTensor) else target
        if name == adapter.embed:
            if tied and adapter.lm_head not in targets:
                configs[adapter.lm_head] = config
            continue
        configs[name] = config
    rounding = InputRounding({name: loaded.model.get_submodule(name) for name in configs}, emulation)
    for name, config in configs.items():
        rounding.set(name, config)
    return rounding


def plan_fallbacks(loaded: LoadedModel, plan: Plan) -> dict[str, str]:
    """Module -> "asked -> used" for every K-quant the plan asks for on rows it does not fit
    (remainder="fallback"), as llama.cpp would write it."""
    linears = [name for _, name, _ in block_linears(loaded.model, loaded.adapter)]
    asked = plan.resolve(linears, named_only(loaded))
    used = plan_targets(loaded, plan)
    return {name: f"{asked[name].format} -> {config.format}" for name, config in used.items()
            if config.format != asked[name].format}


def plan_dropped(loaded: LoadedModel, plan: Plan) -> list[str]:
    """The linears of the units `plan` drops (validated against this model)."""
    modules = []
    for name in plan.drop:
        kind, index = parse_unit(loaded.adapter, loaded.n_blocks, name)
        modules.extend(dropped_modules(loaded.adapter, kind, index))
    return list(dict.fromkeys(modules))


def _quantize_module(loaded: LoadedModel, name: str, config: QuantConfig, stats: InputStats | None,
                     importance: np.ndarray | None = None) -> QTensor:
    qtensor = quantize_linear(name, loaded.model.get_submodule(name), config, stats, importance).compact()
    write_linear(loaded.streamed, loaded.model, name, qtensor)
    return qtensor


@torch.no_grad()
def quantize_(
    loaded: LoadedModel,
    plan: Plan,
    calibration: TokenWindows | None = None,
    *,
    batch_size: int = 4,
    importance: dict[str, np.ndarray] | None = None,
    spill_to: str | Path | None = None,
    progress: bool = True,
) -> Mapping[str, QTensor]:
    """Quantize `loaded.model` in place according to `plan`; return each module's stored form.
    Units the plan drops are silenced first (their output projections zeroed), so that the
    units after them calibrate on what the pruned model computes. `importance` (module -> column
    weights, from an importance matrix) weights the GGUF types' rounding, as llama-quantize does.

    Streamed, each part's stored forms move to an unnamed scratch file (in `spill_to`, else the
    system's temporary folder) once the part is done, and the model decodes them from there when
    the part loads: the result is a `StoredModules`, and one part's codes are in memory at a time."""
    importance = importance or {}
    targets = plan_targets(loaded, plan)
    drop_units_(loaded, plan.drop)
    needs_data = any(config.algorithm != "rtn" for config in targets.values())
    if needs_data and calibration is None:
        raise LayerwiseError("GPTQ and AWQ need calibration text (--calib)")
    model, adapter, streamed = loaded.model, loaded.adapter, loaded.streamed
    result: dict[str, QTensor] = {}
    spilled = StoredModules(directory=spill_to) if streamed is not None else None

    def spill(names: list[str]) -> None:
        if spilled is None:
            return
        for name in names:
            spilled.add(name, result.pop(name))
            write_linear(streamed, model, name, spilled.stored_form(name))
    with progress_bars(progress) as bars:
        task = bars.add_task("quantizing", total=len(targets))
        if needs_data:
            per_batch = calls_of(loaded, calibration, batch_size)
            hidden = take_first_inputs(per_batch)
            for index, block in enumerate(blocks_of(model, adapter)):
                prefix = f"{adapter.blocks}.{index}."
                names = [name for name in targets if name.startswith(prefix)]
                data_names = [name for name in names if targets[name].algorithm != "rtn"]
                stats, register = input_statistics_hooks(model, {name: {targets[name].algorithm}
                                                                 for name in data_names})

                with held(streamed, prefix[:-1]):
                    if data_names:
                        with scoped_hooks(register):
                            for calls, h in zip(per_batch, hidden):
                                run_block(block, calls[index], h)
                    for name in names:
                        if streamed is not None:
                            # The statistics pass's activations, or the last linear's column loop,
                            # left pieces in the heap: returned before GPTQ's float64 factorization.
                            trim_freed_memory()
                        result[name] = _quantize_module(loaded, name, targets[name],
                                                        stats.pop((name, targets[name].algorithm), None),
                                                        importance.get(name))
                        bars.advance(task)
                    hidden = advance_batches(block, per_batch, hidden, index)
                spill(names)
        done = set(result) | set(spilled or ())
        for part, names in by_part(streamed, [name for name in targets if name not in done]):
            with held(streamed, part):
                for name in names:
                    result[name] = _quantize_module(loaded, name, targets[name], None, importance.get(name))
                    bars.advance(task)
            spill(names)
    return result if spilled is None else spilled
