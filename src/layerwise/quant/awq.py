"""AWQ-style activation-aware scaling (Lin et al., 2023): scale input channel j of the weight by
s_j = mean|x_j|^alpha before rounding and divide it out after, so that channels carrying large
activations are rounded more finely; alpha is searched on calibration inputs. Pure tensor math."""
from __future__ import annotations

import torch

from layerwise.quant.config import QuantConfig
from layerwise.quant.qtensor import QTensor
from layerwise.quant.rtn import quantize_weight


def awq_quantize(
    weight: torch.Tensor, inputs: torch.Tensor, config: QuantConfig, *, grid: int = 20, module: str = "weight"
) -> QTensor:
    """Quantize an [out, in] weight with the channel scaling that minimises the output error on
    `inputs` ([n, in] sampled calibration rows). alpha = 0 is plain rounding, so the result is
    never worse than RTN on these inputs."""
    weight = weight.detach().float()
    inputs = inputs.float()
    reference = inputs @ weight.t()
    activation = inputs.abs().mean(dim=0).clamp_min(1e-5)
    rounding = config.replace(algorithm="rtn")
    best, best_error = None, float("inf")
    for step in range(grid + 1):
        scale = activation.pow(step / grid)
        # Centre the scales (geometric mean of the extremes = 1) and store them as fp16.
        scale = (scale / (scale.max() * scale.min()).sqrt()).to(torch.float16).float()
        candidate = quantize_weight(weight * scale, rounding, module)
        candidate.channel_scale = scale
        error = (inputs @ candidate.dequantize().t() - reference).pow(2).mean().item()
        if error < best_error:
            best, best_error = candidate, error
    best.config = config
    return best
