"""QSpec: integer ranges per bit width/sign, and validation of impossible specs."""

import pytest

from yoloq.core.qspec import QSpec, activation_spec, weight_spec


@pytest.mark.parametrize("bits", range(2, 9))
def test_signed_range(bits):
    spec = QSpec(bits=bits, signed=True)
    assert spec.qrange == (-(2 ** (bits - 1)), 2 ** (bits - 1) - 1)
    assert spec.qmax - spec.qmin + 1 == spec.levels == 2**bits


@pytest.mark.parametrize("bits", range(2, 9))
def test_unsigned_range(bits):
    spec = QSpec(bits=bits, signed=False)
    assert spec.qrange == (0, 2**bits - 1)
    assert spec.qmax - spec.qmin + 1 == spec.levels == 2**bits


@pytest.mark.parametrize(
    ("bits", "signed", "expected"),
    [
        (4, True, (-8, 7)),
        (8, True, (-128, 127)),
        (2, True, (-2, 1)),
        (8, False, (0, 255)),
        (4, False, (0, 15)),
        (2, False, (0, 3)),
    ],
)
def test_known_ranges(bits, signed, expected):
    spec = QSpec(bits=bits, signed=signed)
    assert (spec.qmin, spec.qmax) == expected
    assert spec.qrange == expected


@pytest.mark.parametrize("bits", [-1, 0, 1, 9, 16, 32])
def test_bits_out_of_range_raise(bits):
    with pytest.raises(ValueError, match="bits"):
        QSpec(bits=bits)


def test_symmetric_unsigned_raises():
    with pytest.raises(ValueError, match="symmetric"):
        QSpec(bits=8, signed=False, symmetric=True)


def test_symmetric_signed_ok():
    spec = QSpec(bits=8, signed=True, symmetric=True)
    assert spec.symmetric and spec.signed


def test_weight_and_activation_specs():
    w = weight_spec(4)
    assert (w.bits, w.signed, w.symmetric, w.per_channel, w.axis) == (4, True, True, True, 0)
    assert w.qrange == (-8, 7)
    a = activation_spec(4)
    assert (a.bits, a.signed, a.symmetric, a.per_channel) == (4, False, False, False)
    assert a.qrange == (0, 15)
    with pytest.raises(ValueError):
        weight_spec(1)
    with pytest.raises(ValueError):
        activation_spec(9)


def test_dict_round_trip_and_frozen():
    spec = QSpec(bits=5, signed=True, symmetric=True, per_channel=True, axis=1)
    assert QSpec.from_dict(spec.to_dict()) == spec
    with pytest.raises(Exception):  # dataclasses.FrozenInstanceError
        spec.bits = 8  # type: ignore[misc]


def test_reduce_range_keeps_pairs_of_uint8_products_inside_int16():
    # ORT's u8s8 kernels on x86 without VNNI add two uint8 x int8 products in int16 with saturation
    spec = weight_spec(8, reduce_range=True)
    assert spec.qrange == (-64, 64) and spec.bits == 8 and spec.levels == 129
    assert 255 * 2 * max(-spec.qmin, spec.qmax) <= 2**15 - 1
    assert 255 * 2 * max(-weight_spec(8).qmin, weight_spec(8).qmax) > 2**15 - 1  # the full range does not fit
    for bits in range(2, 8):  # low-bit codes fit already and keep their whole range
        assert weight_spec(bits, reduce_range=True).qrange == weight_spec(bits).qrange


def test_reduce_range_needs_signed_codes():
    with pytest.raises(ValueError):
        QSpec(bits=8, signed=False, reduce_range=True)
