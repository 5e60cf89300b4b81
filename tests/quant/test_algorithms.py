"""GPTQ and AWQ on synthetic layers with correlated inputs, where the answer is known to improve."""
from __future__ import annotations

import pytest
import torch

from layerwise.quant import QuantConfig, gptq_quantize, quantize_weight
from layerwise.quant.awq import awq_quantize


def correlated_inputs(n=2048, columns=64, rank=16, seed=0) -> torch.Tensor:
    """Inputs near a low-rank subspace, as LLM activations are: the regime GPTQ exploits."""
    generator = torch.Generator().manual_seed(seed)
    low_rank = torch.randn(n, rank, generator=generator) @ torch.randn(rank, columns, generator=generator)
    return low_rank + 0.1 * torch.randn(n, columns, generator=generator)


def output_error(weight, restored, inputs) -> float:
    return (inputs @ (restored - weight).t()).pow(2).mean().item()


def test_gptq_beats_rounding_on_the_layer_output():
    torch.manual_seed(0)
    weight = torch.randn(96, 64) * 0.1
    inputs = correlated_inputs()
    hessian = 2 * inputs.t() @ inputs / len(inputs)
    for config in (QuantConfig("int", 3, 32), QuantConfig("int", 4, None), QuantConfig("nf4", group_size=32)):
        rtn = quantize_weight(weight, config).dequantize()
        gptq = gptq_quantize(weight, hessian, config.replace(algorithm="gptq"))
        assert gptq.codes.shape == weight.shape
        assert gptq.params["scale"].shape == rtn.shape[:1] + ((64 // (config.group_size or 64)),)
        assert output_error(weight, gptq.dequantize(), inputs) < 0.5 * output_error(weight, rtn, inputs), config.label


def test_gptq_with_identity_hessian_is_rounding():
    weight = torch.randn(16, 64)
    config = QuantConfig("int", 4, 32)
    gptq = gptq_quantize(weight, torch.eye(64), config.replace(algorithm="gptq"), damp=0.0)
    torch.testing.assert_close(gptq.dequantize(), quantize_weight(weight, config).dequantize())


def test_awq_is_never_worse_than_rounding_on_its_inputs():
    torch.manual_seed(1)
    weight = torch.randn(96, 64) * 0.1
    inputs = correlated_inputs(seed=1) * torch.logspace(0, 1.5, 64)  # a few channels dominate
    config = QuantConfig("int", 3, 32)
    awq = awq_quantize(weight, inputs, config.replace(algorithm="awq"))
    rtn = quantize_weight(weight, config).dequantize()
    assert output_error(weight, awq.dequantize(), inputs) <= output_error(weight, rtn, inputs)
    assert awq.channel_scale.shape == (64,)
    assert awq.n_bits == quantize_weight(weight, config).n_bits + 16 * 64


def test_linears_that_read_the_same_input_share_their_statistics(stories):
    """q/k/v and gate/up are handed one tensor each: one Hessian (and AWQ sample) per group, equal
    to the bit to what each linear gathers alone; o and down keep their own."""
    from layerwise.engine.hooks import scoped_hooks
    from layerwise.quant.linear import gather_inputs, input_statistics_hooks

    model = stories.model
    names = [f"model.layers.1.{role}" for role in ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj",
                                                   "self_attn.o_proj", "mlp.gate_proj", "mlp.up_proj",
                                                   "mlp.down_proj")]
    stats, register = input_statistics_hooks(model, {name: {"gptq", "awq"} for name in names})
    alone = {(name, algorithm): [] for name in names for algorithm in ("gptq", "awq")}

    def register_alone(handles: list) -> None:  # each linear for itself, as before the sharing
        from layerwise.quant.linear import InputStats

        for key in alone:
            alone[key] = InputStats()
            handles.append(model.get_submodule(key[0]).register_forward_pre_hook(
                lambda module, args, key=key: gather_inputs(alone[key], args[0], key[1])))

    ids = torch.randint(0, 512, (4, 64), generator=torch.Generator().manual_seed(0))
    with torch.no_grad(), scoped_hooks(register), scoped_hooks(register_alone):
        for batch in ids.split(2):  # two batches: shared sums stay shared
            model(input_ids=batch, use_cache=False)
    gptq = {name: stats[name, "gptq"] for name in names}
    assert gptq[names[0]] is gptq[names[1]] is gptq[names[2]] and gptq[names[4]] is gptq[names[5]]
    assert len({id(value) for value in gptq.values()}) == 4
    for (name, algorithm), own in alone.items():
        shared = stats[name, algorithm]
        assert shared.rows == own.rows == 4 * 64
        if algorithm == "gptq":
            assert torch.equal(shared.hessian, own.hessian), name
        else:
            assert all(torch.equal(a, b) for a, b in zip(shared.sample, own.sample)), name
    # A linear that shared its input and is then handed another tensor is refused, not mixed in.
    from layerwise import LayerwiseError

    with torch.no_grad(), scoped_hooks(register):
        model.get_submodule(names[0])(torch.randn(1, 4, 64))
        with pytest.raises(LayerwiseError, match="shared its input"):
            model.get_submodule(names[1])(torch.randn(1, 4, 64))
