"""A quantized matrix kept with one-byte codes (`QTensor.compact`) decodes to the same values."""
import pytest
import torch

from layerwise.quant.config import QuantConfig
from layerwise.quant.rtn import quantize_weight


@pytest.mark.parametrize("config", [
    QuantConfig("int", 4, 32, True, "rtn", "error"),
    QuantConfig("int", 8, 32, False, "rtn", "error"),  # codes 0..255: uint8
    QuantConfig("int", 3, None, False, "rtn", "error"),
    QuantConfig("nf4", 4, 32, True, "rtn", "error"),
    QuantConfig("fp8", 8, 32, True, "rtn", "error"),
])
def test_compact_codes_decode_to_the_same_weights(config):
    torch.manual_seed(0)
    qtensor = quantize_weight(torch.randn(16, 64), config)
    compact = qtensor.compact()
    assert compact.codes.element_size() == 1
    assert torch.equal(compact.dequantize(), qtensor.dequantize())
    assert compact.compact() is compact
