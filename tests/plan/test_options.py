import pytest

from layerwise.errors import LayerwiseError
from layerwise.plan.options import option_name, parse_option, parse_options
from layerwise.quant.config import QuantConfig


@pytest.mark.parametrize("text, config", [
    ("int3g64", QuantConfig("int", 3, 64)),
    ("int4pc", QuantConfig("int", 4, None)),
    ("int4g64a", QuantConfig("int", 4, 64, symmetric=False)),
    ("gptq:int3g128t", QuantConfig("int", 3, 128, algorithm="gptq", remainder="tail")),
    ("awq:int4g64", QuantConfig("int", 4, 64, algorithm="awq")),
    ("nf4g32", QuantConfig("nf4", None, 32)),
    ("fp8pc", QuantConfig("fp8", None, None)),
    ("mxfp4", QuantConfig("mxfp4", None, None)),
    ("q4_0", QuantConfig("q4_0", None, None)),
    ("Q5_K", QuantConfig("q5_k", None, None)),
])
def test_option_names_parse_and_print_back(text, config):
    assert parse_option(text) == config
    assert parse_option(option_name(config)) == config


@pytest.mark.parametrize("text", ["int9g64", "int3g0", "foo", "magic:int4g64", "int4gx", ""])
def test_bad_option_names_are_errors(text):
    with pytest.raises(LayerwiseError):
        parse_option(text)


def test_option_lists():
    assert [option_name(c) for c in parse_options("int3g64, int4g64")] == ["int3g64", "int4g64"]
    with pytest.raises(LayerwiseError, match="empty"):
        parse_options(" , ")
    with pytest.raises(LayerwiseError, match="repeats"):
        parse_options("int4g64,int4g64")
