"""What to do to one weight matrix: a number format, and the algorithm that picks its codes."""
from __future__ import annotations

from dataclasses import asdict, dataclass, replace

from layerwise.errors import LayerwiseError

ALGORITHMS = ("rtn", "gptq", "awq")
REMAINDERS = ("error", "tail", "fallback")

# What llama.cpp's llama-quantize writes instead of a K-quant when a row is not a multiple of 256
# weights (llama-quant.cpp in the llama.cpp that llama-cpp-python 0.3.36 ships, the one CI builds:
# the fallback switch in its tensor-type choice).
K_QUANT_FALLBACKS = {"q4_k": "q5_0", "q5_k": "q5_1", "q6_k": "q8_0", "q2_k": "q4_0", "q3_k": "q4_0"}


@dataclass(frozen=True)
class QuantConfig:
    """A quantizer setting, validated on creation.

    format: a registered number format ("int", "nf4", "fp4", "mxfp4", "fp8", or a GGUF type such
        as "q4_0"); `layerwise list formats` shows them.
    bits: code width for formats that take one ("int": 2..8); fixed formats ignore it.
    group_size: input columns that share one scale; None = one scale per output row.
    symmetric: "int" only: a signed grid with no zero point (True) or min/max with a zero point.
    algorithm: how codes are chosen: "rtn" (round to nearest), "gptq" (error feedback through
        the calibration Hessian), "awq" (activation-aware channel scaling, then rounding).
    remainder: when group_size does not divide a row: "error", "tail" (a shorter last group), or
        "fallback" (GGUF K-quants: the type llama.cpp's llama-quantize falls back to, see
        `K_QUANT_FALLBACKS`).
    """

    format: str = "int"
    bits: int | None = 4
    group_size: int | None = 128
    symmetric: bool = True
    algorithm: str = "rtn"
    remainder: str = "error"

    def __post_init__(self) -> None:
        from layerwise.quant.formats import get_format

        spec = get_format(self.format)
        if spec.fixed_bits is not None:
            object.__setattr__(self, "bits", spec.fixed_bits)
        elif self.bits not in spec.allowed_bits:
            raise LayerwiseError(
                f"bits={self.bits} is outside format {self.format!r}'s range; allowed: "
                f"{', '.join(map(str, spec.allowed_bits))}"
            )
        if spec.fixed_group_size is not None:
            object.__setattr__(self, "group_size", spec.fixed_group_size)
        elif self.group_size is not None and self.group_size <= 0:
            raise LayerwiseError(f"group_size must be positive or None (per row), got {self.group_size}")
        if self.algorithm not in ALGORITHMS:
            raise LayerwiseError(f"unknown algorithm {self.algorithm!r}; choose from {', '.join(ALGORITHMS)}")
        # GPTQ rounds GGUF types on the grids llama.cpp's quantizer chooses (quant/gptq.py); AWQ's
        # rescaling has no place in a GGUF block.
        if self.algorithm != "rtn" and not spec.supports_error_feedback and \
                not (self.algorithm == "gptq" and spec.packed):
            raise LayerwiseError(f"format {self.format!r} supports only algorithm 'rtn', not {self.algorithm!r}")
        if self.remainder not in REMAINDERS:
            raise LayerwiseError(f"unknown remainder {self.remainder!r}; choose from {', '.join(REMAINDERS)}")

    def for_columns(self, columns: int) -> "QuantConfig":
        """The config that really applies to rows of `columns` weights: itself, or with
        remainder="fallback", llama.cpp's fallback type for a K-quant the rows do not fit."""
        if self.remainder != "fallback" or self.format not in K_QUANT_FALLBACKS or columns % 256 == 0:
            return self
        return QuantConfig(K_QUANT_FALLBACKS[self.format], algorithm=self.algorithm)

    def replace(self, **changes) -> "QuantConfig":
        return replace(self, **changes)

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> "QuantConfig":
        unknown = set(data) - set(cls.__dataclass_fields__)
        if unknown:
            raise LayerwiseError(f"unknown quantizer field(s) {sorted(unknown)}; known: {', '.join(cls.__dataclass_fields__)}")
        return cls(**data)

    @property
    def label(self) -> str:
        """A short human name: 'gptq int3 g64 sym', 'rtn q4_0', 'rtn nf4 g64'."""
        spec_bits = "" if self.format != "int" else str(self.bits)
        group = "" if self.format.startswith("q") else (" per-row" if self.group_size is None else f" g{self.group_size}")
        sym = "" if self.format != "int" else (" sym" if self.symmetric else " asym")
        return f"{self.algorithm} {self.format}{spec_bits}{group}{sym}"
