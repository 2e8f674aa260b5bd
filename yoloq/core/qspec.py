"""What a quantized tensor looks like: bit width, sign, symmetry and granularity.

>>> QSpec(bits=4, signed=True, symmetric=True).qrange
(-8, 7)
"""

from __future__ import annotations

from dataclasses import asdict, dataclass


@dataclass(frozen=True)
class QSpec:
    bits: int = 8
    signed: bool = False
    symmetric: bool = False
    per_channel: bool = False
    axis: int = 0  # channel axis for per-channel quantization

    def __post_init__(self) -> None:
        if not 2 <= self.bits <= 8:
            raise ValueError(f"bits must be between 2 and 8, got {self.bits}")
        if self.symmetric and not self.signed:
            raise ValueError("symmetric quantization needs a signed integer range")

    @property
    def qmin(self) -> int:
        return -(2 ** (self.bits - 1)) if self.signed else 0

    @property
    def qmax(self) -> int:
        return 2 ** (self.bits - 1) - 1 if self.signed else 2**self.bits - 1

    @property
    def qrange(self) -> tuple[int, int]:
        return self.qmin, self.qmax

    @property
    def levels(self) -> int:
        return 2**self.bits

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "QSpec":
        return cls(**d)


def weight_spec(bits: int) -> QSpec:
    """Per-output-channel symmetric int weights: zero point 0, so ORT's U8S8 kernels take them as they are."""
    return QSpec(bits=bits, signed=True, symmetric=True, per_channel=True, axis=0)


def activation_spec(bits: int) -> QSpec:
    """Per-tensor asymmetric uint activations: ORT fuses uint8 activations into QLinear* kernels, int8 ones it does not."""
    return QSpec(bits=bits, signed=False, symmetric=False)
