"""FakeQuantizer: phases, state_dict round trip, per-channel weights, int codes, activation scale floor."""

import math

import pytest
import torch

from yoloq.core.functional import choose_qparams, fake_quantize
from yoloq.core.qspec import QSpec, activation_spec, weight_spec
from yoloq.core.quantizer import MIN_ACT_SCALE, FakeQuantizer


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _calibrated(spec: QSpec, *batches: torch.Tensor, **kw) -> FakeQuantizer:
    q = FakeQuantizer(spec, **kw)
    q.observe()
    for b in batches:
        q(b)
    q.freeze()
    return q


# ---- phases ---------------------------------------------------------------------------------------------------------
def test_phases():
    q = FakeQuantizer(activation_spec(4))
    x = torch.randn(2, 3, 5, 5, generator=_gen(0))
    assert not bool(q.calibrated) and not q.observing
    # before calibration: identity
    assert torch.equal(q(x), x)

    q.observe()
    assert q.observing
    out = q(x)
    assert out is x  # observation returns its input unchanged
    q(x * 2)
    assert not bool(q.calibrated)

    q.freeze()
    assert bool(q.calibrated) and not q.observing
    y = q(x)
    assert not torch.equal(y, x)
    # the range came from both observed batches (min/max of x*2 widened to include 0)
    lo, hi = torch.minimum((x * 2).min(), x.min()), torch.maximum((x * 2).max(), x.max())
    s, z = choose_qparams(lo.reshape(1), hi.reshape(1), 0, 15, symmetric=False)
    assert torch.allclose(q.scale, s) and torch.equal(q.zero_point, z)
    assert torch.allclose(y, fake_quantize(x, s, z, 0, 15))
    assert torch.unique(y).numel() <= 16

    # disabling returns to identity
    q.enabled = False
    assert torch.equal(q(x), x)


def test_freeze_without_observe_raises():
    q = FakeQuantizer(activation_spec(8))
    with pytest.raises(RuntimeError):
        q.freeze()
    # freezing twice needs a second observe()
    q.observe()
    q(torch.randn(10, generator=_gen(1)))
    q.freeze()
    with pytest.raises(RuntimeError):
        q.freeze()


def test_per_tensor_with_channels_raises():
    with pytest.raises(ValueError):
        FakeQuantizer(activation_spec(8), channels=4)


# ---- state_dict -----------------------------------------------------------------------------------------------------
def test_state_dict_keys_fixed_at_construction():
    q = FakeQuantizer(activation_spec(8))
    assert set(q.state_dict()) == {"scale", "zero_point", "calibrated"}
    q.observe()
    q(torch.randn(10, generator=_gen(2)))
    q.freeze()
    assert set(q.state_dict()) == {"scale", "zero_point", "calibrated"}


@pytest.mark.parametrize("via_file", [False, True])
@pytest.mark.parametrize("kind", ["activation", "weight"])
def test_state_dict_round_trip(tmp_path, via_file, kind):
    if kind == "activation":
        spec, kw = activation_spec(4), {}
        x = torch.randn(2, 4, 6, 6, generator=_gen(3))
    else:
        spec, kw = weight_spec(4), {"channels": 5, "weight": True}
        x = torch.randn(5, 3, 3, 3, generator=_gen(3))
    q = _calibrated(spec, x, **kw)
    sd = q.state_dict()
    if via_file:
        path = tmp_path / "q.pt"
        torch.save(sd, path)
        sd = torch.load(path, weights_only=True)
    fresh = FakeQuantizer(spec, **kw)
    assert torch.equal(fresh(x), x)  # not calibrated yet
    fresh.load_state_dict(sd)
    assert bool(fresh.calibrated)
    assert torch.equal(fresh.scale, q.scale) and torch.equal(fresh.zero_point, q.zero_point)
    assert not torch.equal(fresh(x), x)
    assert torch.equal(fresh(x), q(x))


# ---- per-channel weights --------------------------------------------------------------------------------------------
def test_per_channel_weight_quantizer():
    C = 6
    w = torch.randn(C, 3, 3, 3, generator=_gen(4)) * torch.linspace(0.01, 1.0, C).view(-1, 1, 1, 1)
    q = FakeQuantizer(weight_spec(4), channels=C, weight=True)
    assert q.scale.shape == (C,) and q.zero_point.shape == (C,)
    q.observe()
    q(w)
    q.freeze()
    assert q.scale.shape == (C,)
    assert torch.equal(q.zero_point, torch.zeros(C))
    amax = w.abs().amax(dim=(1, 2, 3))
    assert torch.allclose(q.scale, amax / 7)
    wq = q(w)
    for c in range(C):
        codes = wq[c] / q.scale[c]
        assert torch.allclose(codes, torch.round(codes), atol=1e-4)
        assert torch.unique(wq[c]).numel() <= 16
        # each channel uses its own scale: error bounded by half of that channel's step
        assert (wq[c] - w[c]).abs().max() <= q.scale[c] / 2 + 1e-6


# ---- int_repr -------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("spec", "dtype"),
    [
        (QSpec(bits=8, signed=True, symmetric=True), torch.int8),
        (QSpec(bits=4, signed=True, symmetric=True), torch.int8),
        (QSpec(bits=8, signed=False), torch.uint8),
        (QSpec(bits=3, signed=False), torch.uint8),
    ],
)
def test_int_repr(spec, dtype):
    x = torch.randn(200, generator=_gen(5)) * 3
    q = _calibrated(spec, x[:100])  # the second half goes beyond the calibrated range
    codes = q.int_repr(x)
    assert codes.dtype == dtype
    assert int(codes.min()) >= spec.qmin and int(codes.max()) <= spec.qmax
    assert int(codes.min()) == spec.qmin or int(codes.max()) == spec.qmax  # saturation reached
    # dequantized codes equal the fake-quantized values
    deq = (codes.float() - q.zero_point) * q.scale
    assert torch.allclose(deq, q(x), atol=1e-6)


def test_int_repr_per_channel_int8():
    w = torch.randn(4, 2, 3, 3, generator=_gen(6))
    q = _calibrated(weight_spec(8), w, channels=4, weight=True)
    codes = q.int_repr(w)
    assert codes.dtype == torch.int8
    # symmetric minmax: each channel's largest |w| maps to +-127
    assert torch.equal(codes.abs().amax(dim=(1, 2, 3)).to(torch.int32), torch.full((4,), 127, dtype=torch.int32))


# ---- activation scale floor -----------------------------------------------------------------------------------------
@pytest.mark.parametrize("bits", [2, 4, 8])
@pytest.mark.parametrize("offset", [1e-7, -1e-7, 0.0, 5.0])
def test_min_act_scale_floor(bits, offset):
    x = offset + torch.rand(64, generator=_gen(7)) * 1e-8  # nearly constant
    q = _calibrated(activation_spec(bits), x)
    # scale is float32: the floor is MIN_ACT_SCALE as float32 can hold it (9.99999975e-05)
    floor32 = torch.tensor(MIN_ACT_SCALE, dtype=torch.float32)
    assert (q.scale >= floor32).all()
    assert float(q.scale) >= MIN_ACT_SCALE * (1 - 1e-6)
    # the data stays representable: fake quantization is within half a step
    assert (q(x) - x).abs().max() <= float(q.scale) / 2 + 1e-6


def test_min_act_scale_not_applied_to_weights():
    w = torch.full((2, 1, 1, 1), 1e-7)
    q = _calibrated(weight_spec(8), w, channels=2, weight=True)
    assert (q.scale < MIN_ACT_SCALE).all()
    assert torch.allclose(q.scale, torch.full((2,), 1e-7 / 127))


def test_min_act_scale_leaves_normal_ranges_alone():
    x = torch.linspace(-1, 1, 101)
    q = _calibrated(activation_spec(8), x)
    assert torch.allclose(q.scale, torch.tensor([2.0 / 255]))


def test_tqt_learns_a_power_of_two_step_in_log2_space_and_saves_it_as_a_plain_step():
    q = FakeQuantizer(QSpec(bits=4, signed=False, symmetric=False))
    q.set_qparams(torch.tensor([0.3]), torch.tensor([0.0]))
    keys = set(q.state_dict())
    q.learn(True, "tqt")
    assert q.learning and float(q.log2_scale) == pytest.approx(math.ceil(math.log2(0.3)))  # 0.5: nothing clipped
    x = torch.linspace(0, 8, 101)
    y = q(x)
    torch.testing.assert_close(y, torch.clamp(torch.round(x / 0.5), 0, 15) * 0.5)
    y.sum().backward()
    assert q.log2_scale.grad is not None and float(q.log2_scale.grad) != 0 and q.scale.grad is None
    with torch.no_grad():
        q.log2_scale.fill_(-2.3)  # ceil -> 2^-2
    q.learn(False)
    assert float(q.scale) == 0.25 and q.log2_scale is None and not q.learning
    assert set(q.state_dict()) == keys
