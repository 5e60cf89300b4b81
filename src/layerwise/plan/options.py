"""Short option names for allocation, e.g. "int3g64", "gptq:int4g128", "int8pc", "q4_0", "nf4g64".

An option is one quantizer config a unit may take. On the command line options are written
compactly: an optional algorithm prefix ("rtn:", "gptq:", "awq:"), then a format: "int<bits>"
with "g<N>" (groups of N input columns) or "pc" (one scale per output row, "per channel"),
and "a" at the end for an asymmetric grid; "nf4"/"fp4" with an optional "g<N>"; or a fixed
format such as "mxfp4", "fp8", "q4_0", "q5_k". "t" after the group size allows a shorter last
group where the size does not divide a row (SmolLM2's 576 columns and groups of 128).
"drop" removes the unit altogether.
"""
from __future__ import annotations

import re

from layerwise.errors import LayerwiseError
from layerwise.quant.config import ALGORITHMS, QuantConfig
from layerwise.quant.formats import get_format, registered_formats

_INT = re.compile(r"^int(?P<bits>\d+)(?:g(?P<group>\d+)|(?P<pc>pc))?(?P<tail>t)?(?P<asym>a)?$")
_GROUPED = re.compile(r"^(?P<format>[a-z0-9_]+?)(?:g(?P<group>\d+)|(?P<pc>pc))?(?P<tail>t)?$")

# Not a quantizer: the unit is removed (its output projections zeroed; whole blocks deleted on
# export). It costs no bits; only block and sublayer units can take it.
DROP = "drop"

# The group size an option gets when its name gives none: 64 divides the rows of every
# supported architecture we have met (SmolLM2 576, Llama 4096, GPT-2 768).
DEFAULT_GROUP = 64


def parse_option(text: str) -> QuantConfig | str:
    """"gptq:int3g64" -> QuantConfig(format="int", bits=3, group_size=64, algorithm="gptq");
    "drop" -> DROP."""
    spec = text.strip().lower()
    if spec == DROP:
        return DROP
    algorithm = "rtn"
    if ":" in spec:
        algorithm, spec = spec.split(":", 1)
        if algorithm not in ALGORITHMS:
            raise LayerwiseError(f"option {text!r}: unknown algorithm {algorithm!r}; choose from {', '.join(ALGORITHMS)}")
    match = _INT.match(spec)
    if match:
        group = None if match["pc"] else int(match["group"] or DEFAULT_GROUP)
        return QuantConfig("int", int(match["bits"]), group, symmetric=not match["asym"], algorithm=algorithm,
                           remainder="tail" if match["tail"] else "error")
    match = _GROUPED.match(spec)
    if not match or match["format"] not in registered_formats():
        raise LayerwiseError(f"option {text!r} is not understood; write e.g. int3g64, int4pc, int4g64a, "
                             f"gptq:int3g64, nf4g64, q4_0 (formats: {', '.join(registered_formats())})")
    group = None if match["pc"] else int(match["group"] or DEFAULT_GROUP)
    return QuantConfig(match["format"], None if match["format"] != "int" else 4, group, algorithm=algorithm,
                       remainder="tail" if match["tail"] else "error")


def option_name(config: QuantConfig | str) -> str:
    """The inverse of `parse_option`: the short name of a config."""
    if config == DROP:
        return DROP
    prefix = "" if config.algorithm == "rtn" else f"{config.algorithm}:"
    tail = "t" if config.remainder == "tail" else ""
    if config.format == "int":
        group = "pc" if config.group_size is None else f"g{config.group_size}"
        return f"{prefix}int{config.bits}{group}{tail}{'' if config.symmetric else 'a'}"
    if get_format(config.format).fixed_group_size is not None:
        return f"{prefix}{config.format}"
    group = "pc" if config.group_size is None else f"g{config.group_size}"
    return f"{prefix}{config.format}{group}{tail}"


def parse_options(texts: str | list[str]) -> list[QuantConfig | str]:
    """A comma-separated string or a list of option names -> configs, in the order given."""
    names = [name for name in (texts.split(",") if isinstance(texts, str) else texts) if name.strip()]
    if not names:
        raise LayerwiseError("the option list is empty; give at least two, e.g. --options int3g64,int4g64,int8g64")
    configs = [parse_option(name) for name in names]
    labels = [option_name(config) for config in configs]
    repeated = sorted({label for label in labels if labels.count(label) > 1})
    if repeated:
        raise LayerwiseError(f"the option list repeats {repeated}")
    return configs
