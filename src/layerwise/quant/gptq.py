"""GPTQ (Frantar et al., 2022): round one column at a time and push its error onto the columns not
yet rounded, weighted by the inverse Hessian of the layer's inputs. Pure tensor math."""
from __future__ import annotations

import contextlib
from typing import Iterator

import numpy as np
import torch

from layerwise.errors import LayerwiseError
from layerwise.quant.config import QuantConfig
from layerwise.quant.formats import get_format
from layerwise.quant.qtensor import QTensor, group_spans
from layerwise.quant.rtn import _code_dtype


def inverse_hessian_factor(hessian: torch.Tensor, damp: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Upper Cholesky factor of H^-1 after damping; also the mask of dead (never active) inputs."""
    # In place where it can be: for a 1536-wide input each float64 copy is 19 MB, and a streamed
    # quantize peaks here.
    h = hessian.double()
    h = h.clone() if h is hessian else h
    dead = torch.diag(h) == 0
    h[dead, dead] = 1.0
    h.diagonal().add_(damp * torch.mean(torch.diag(h)))
    try:
        lower = torch.linalg.cholesky(h)
    except torch.linalg.LinAlgError:
        raise LayerwiseError("GPTQ: the calibration Hessian is not positive definite; raise the damping "
                             "or use more calibration text") from None
    del h
    inverse = torch.cholesky_inverse(lower)
    del lower
    return torch.linalg.cholesky(inverse, upper=True).float(), dead


@contextlib.contextmanager
def _one_thread() -> Iterator[None]:
    """The column loop is thousands of tiny ops: threads only add synchronisation, and on a busy
    machine each op can wait a scheduler tick for a descheduled worker (measured: 0.4 s vs 0.8 s
    for a 576x1536 matrix on an idle 2-core machine, and up to 20 s on a loaded one)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def gptq_quantize(
    weight: torch.Tensor,
    hessian: torch.Tensor,
    config: QuantConfig,
    *,
    damp: float = 0.01,
    block_size: int = 128,
    module: str = "weight",
) -> QTensor:
    """Quantize an [out, in] weight given H = sum of x x^T over its calibration inputs ([in, in]).

    Group parameters are fitted when the first column of a group is reached, from the weights as
    updated by the error feedback so far (the reference implementation's order). GGUF types go to
    `gptq_gguf`.
    """
    if get_format(config.format).packed:
        return gptq_gguf(weight, hessian, config, damp=damp, block_size=block_size, module=module)
    rows, columns = weight.shape
    group_spans(columns, config, module)
    fmt = get_format(config.format)
    width = config.group_size or columns
    w = weight.detach().float().clone()
    h_inv, dead = inverse_hessian_factor(hessian.to(w.device), damp)
    w[:, dead] = 0
    codes = torch.zeros(rows, columns, dtype=_code_dtype(config), device=w.device)
    fitted: dict[str, list[torch.Tensor]] = {}
    with _one_thread():
        _column_loop(w, h_inv, codes, fitted, fmt, config, width, block_size)
    merged = {key: torch.cat(values, dim=1) for key, values in fitted.items()}
    return QTensor(config, (rows, columns), codes=codes, params=merged)


def _error_feedback(w: torch.Tensor, h_inv: torch.Tensor, block_size: int, round_column) -> None:
    """GPTQ's loop in lazy batches of `block_size` columns: `round_column(column, x, pending)` returns
    the value column `x` is stored as, where `pending(width)` is the next `width` columns from it as
    updated so far (to fit a group's parameters); each error goes to the columns not yet rounded."""
    columns = w.shape[1]
    for start in range(0, columns, block_size):
        end = min(start + block_size, columns)
        block = w[:, start:end].clone()
        errors = torch.zeros_like(block)
        h_block = h_inv[start:end, start:end]
        for i in range(end - start):
            def pending(width: int, i: int = i) -> torch.Tensor:
                return torch.cat([block[:, i:], w[:, end:start + i + width]], dim=1)[:, :width]

            x = block[:, i:i + 1]
            error = (x - round_column(start + i, x, pending)) / h_block[i, i]
            block[:, i:] -= error @ h_block[i:i + 1, i:]
            errors[:, i] = error[:, 0]
        w[:, end:] -= errors @ h_inv[start:end, end:]


def _column_loop(w, h_inv, codes, fitted, fmt, config, width, block_size) -> None:
    params = None

    def round_column(column: int, x: torch.Tensor, pending) -> torch.Tensor:
        nonlocal params
        if column % width == 0:
            params = fmt.fit(pending(width), config.bits, config.symmetric)
            for key, value in params.items():
                fitted.setdefault(key, []).append(value)
        code = fmt.encode(x, params, config.bits)
        codes[:, column] = code[:, 0].to(codes.dtype)
        return fmt.decode(code, params, config.bits)

    _error_feedback(w, h_inv, block_size, round_column)


def gptq_gguf(
    weight: torch.Tensor,
    hessian: torch.Tensor,
    config: QuantConfig,
    *,
    damp: float = 0.01,
    block_size: int = 128,
    module: str = "weight",
) -> QTensor:
    """GPTQ onto a GGUF type's grids, written as the bytes llama.cpp runs.

    When the loop reaches the first column of a GGUF block (32 weights, or a 256-weight K-quant
    super-block), llama.cpp's own quantizer for the type chooses that block's scales from the
    weights as updated so far, weighting columns by the Hessian's diagonal (the importance matrix
    llama-quantize would use); then every column is rounded on those grids and its error pushed
    onto the columns not yet rounded. The stored bytes are the quantizer's scales with GPTQ's
    codes, so what llama.cpp dequantizes is exactly what was evaluated.
    """
    from layerwise.quant import gguf_blocks

    qtype = config.format.upper()
    rows, columns = weight.shape
    unit = gguf_blocks.block_size(qtype)
    row_bytes = gguf_blocks.row_bytes(qtype, columns)  # refuses rows that are not whole blocks, by name
    unit_bytes = gguf_blocks.bytes_per_block(qtype)
    w = weight.detach().float().cpu().clone()
    hessian = hessian.detach().float().cpu()
    importance = torch.diagonal(hessian).clamp(min=0).numpy()
    h_inv, dead = inverse_hessian_factor(hessian, damp)
    w[:, dead] = 0
    packed = np.zeros((rows, row_bytes), dtype=np.uint8)
    codes = np.zeros((rows, columns), dtype=np.int32)
    grid = None

    def round_column(column: int, x: torch.Tensor, pending) -> torch.Tensor:
        nonlocal grid
        if column % unit == 0:
            weights = importance[column:column + unit]
            fitted = gguf_blocks.quantize(pending(unit).numpy(), qtype, weights if weights.sum() > 0 else None)
            at = column // unit * unit_bytes
            packed[:, at:at + unit_bytes] = fitted
            grid = gguf_blocks.code_grid(fitted, qtype, (rows, unit))
        code, value = grid.round(x.numpy(), slice(column % unit, column % unit + 1))
        codes[:, column] = code[:, 0]
        return torch.from_numpy(value)

    with _one_thread():
        _error_feedback(w, h_inv, block_size, round_column)
    return QTensor(config, (rows, columns), packed=gguf_blocks.with_codes(packed, qtype, codes))
