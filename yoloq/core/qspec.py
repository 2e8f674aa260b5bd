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
    # Signed 8-bit codes limited to [-64, 64] (ONNX Runtime's reduce_range). On x86 CPUs without VNNI (AVX2, and
    # AVX-512 without VNNI) ORT's u8s8 kernels add each pair of uint8 x int8 products in int16 with saturation
    # (VPMADDUBSW): 255 * (64 + 64) fits, 255 * (127 + 127) does not. Below 8 bits the codes fit already.
    reduce_range: bool = False

    def __post_init__(self) -> None:
        if not 2 <= self.bits <= 8:
            raise ValueError(f"bits must be between 2 and 8, got {self.bits}")
        if self.symmetric and not self.signed:
            raise ValueError("symmetric quantization needs a signed integer range")
        if self.reduce_range and not self.signed:
            raise ValueError("reduce_range applies to signed (weight) codes")

    @property
    def qmin(self) -> int:
        if self._reduced:
            return -64
        return -(2 ** (self.bits - 1)) if self.signed else 0

    @property
    def qmax(self) -> int:
        if self._reduced:
            return 64
        return 2 ** (self.bits - 1) - 1 if self.signed else 2**self.bits - 1

    @property
    def _reduced(self) -> bool:
        return self.reduce_range and self.bits == 8

    @property
    def qrange(self) -> tuple[int, int]:
        return self.qmin, self.qmax

    @property
    def levels(self) -> int:
        return self.qmax - self.qmin + 1

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "QSpec":
        return cls(**d)


def weight_spec(bits: int, reduce_range: bool = False) -> QSpec:
    """Per-output-channel symmetric int weights: zero point 0, so ORT's U8S8 kernels take them as they are.

    >>> weight_spec(8, reduce_range=True).qrange, weight_spec(4, reduce_range=True).qrange
    ((-64, 64), (-8, 7))
    """
    return QSpec(bits=bits, signed=True, symmetric=True, per_channel=True, axis=0, reduce_range=reduce_range)


def activation_spec(bits: int) -> QSpec:
    """Per-tensor asymmetric uint activations: ORT fuses uint8 activations into QLinear* kernels, int8 ones it does not."""
    return QSpec(bits=bits, signed=False, symmetric=False)
