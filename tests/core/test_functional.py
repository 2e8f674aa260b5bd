"""Stateless quantization math: qparams, fake quantization, STE gradients, LSQ."""

import pytest
import torch

from yoloq.core.functional import (
    broadcast_shape,
    choose_qparams,
    dequantize,
    fake_quantize,
    lsq_fake_quantize,
    quantize,
    round_ste,
    scale_grad,
)

T = torch.tensor


def _is_integer(t: torch.Tensor) -> bool:
    return bool(torch.equal(t, torch.round(t)))


# ---- choose_qparams -------------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("lo", "hi", "qmin", "qmax"),
    [
        (1.0, 3.0, 0, 255),  # all positive: lo widened to 0
        (-3.0, -1.0, 0, 255),  # all negative: hi widened to 0
        (-1.0, 3.0, 0, 15),
        (0.3, 0.7, 0, 3),
        (-0.7, -0.2, -8, 7),
    ],
)
def test_range_includes_zero_exactly(lo, hi, qmin, qmax):
    scale, zp = choose_qparams(T([lo]), T([hi]), qmin, qmax, symmetric=False)
    assert _is_integer(zp)
    assert qmin <= float(zp) <= qmax
    # the represented range [(qmin - z) s, (qmax - z) s] contains 0; it matches the (zero-widened) range up to
    # the half step lost to rounding the zero point to an integer
    rep_lo, rep_hi = float((qmin - zp) * scale), float((qmax - zp) * scale)
    assert rep_lo <= 0.0 <= rep_hi
    half = float(scale) / 2 + 1e-6
    assert abs(rep_lo - min(lo, 0.0)) <= half and abs(rep_hi - max(hi, 0.0)) <= half
    assert float(fake_quantize(T([0.0]), scale, zp, qmin, qmax)) == 0.0


def test_positive_range_widened_to_zero():
    scale, zp = choose_qparams(T([1.0]), T([3.0]), 0, 255, symmetric=False)
    assert torch.allclose(scale, T([3.0 / 255]))
    assert float(zp) == 0.0


def test_asymmetric_scale_formula():
    lo, hi = T([-1.0, -0.5]), T([3.0, 0.25])
    for qmin, qmax in [(0, 255), (0, 15), (-8, 7), (0, 3)]:
        scale, zp = choose_qparams(lo, hi, qmin, qmax, symmetric=False)
        assert torch.allclose(scale, (hi - lo) / (qmax - qmin))
        assert torch.equal(zp, (qmin - torch.round(lo / scale)).clamp(qmin, qmax))


def test_symmetric_qparams():
    lo, hi = T([-2.0, -0.5, 0.0]), T([1.0, 3.0, 0.7])
    scale, zp = choose_qparams(lo, hi, -8, 7, symmetric=True)
    assert torch.equal(zp, torch.zeros(3))
    assert torch.allclose(scale, T([2.0, 3.0, 0.7]) / 7)


def test_degenerate_range_gives_positive_scale():
    scale, zp = choose_qparams(T([0.0]), T([0.0]), 0, 255, symmetric=False)
    assert float(scale) > 0
    out = fake_quantize(T([0.0, 1.0]), scale, zp, 0, 255)
    assert torch.isfinite(out).all()
    assert float(out[0]) == 0.0


# ---- fake_quantize ---------------------------------------------------------------------------------------------------
@pytest.mark.parametrize(("qmin", "qmax"), [(0, 255), (0, 15), (-8, 7), (0, 3)])
def test_fake_quantize_on_grid(qmin, qmax):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(500, generator=g) * 2
    scale, zp = choose_qparams(T([-1.5]), T([2.5]), qmin, qmax, symmetric=False)
    out = fake_quantize(x, scale, zp, qmin, qmax)
    codes = out / scale + zp
    assert torch.allclose(codes, torch.round(codes), atol=1e-4)
    codes = torch.round(codes)
    assert codes.min() >= qmin and codes.max() <= qmax
    # matches quantize -> dequantize
    assert torch.allclose(out, dequantize(quantize(x, scale, zp, qmin, qmax), scale, zp))
    # in-range values move by at most half a step
    inside = (x >= -1.5) & (x <= 2.5)
    assert (out[inside] - x[inside]).abs().max() <= float(scale) / 2 + 1e-6


def test_fake_quantize_saturates():
    scale, zp = T([0.1]), T([3.0])
    qmin, qmax = 0, 15
    lo_end, hi_end = (qmin - 3.0) * 0.1, (qmax - 3.0) * 0.1  # -0.3, 1.2
    out = fake_quantize(T([-100.0, -0.31, 5.0, 1e6]), scale, zp, qmin, qmax)
    assert torch.allclose(out, T([lo_end, lo_end, hi_end, hi_end]))


def test_broadcast_shape():
    x = torch.zeros(2, 3, 4, 5)
    assert broadcast_shape(x, 0) == [-1, 1, 1, 1]
    assert broadcast_shape(x, 1) == [1, -1, 1, 1]
    assert broadcast_shape(torch.zeros(6, 7), 1) == [1, -1]


@pytest.mark.parametrize("axis", [0, 1])
def test_per_channel_fake_quantize_matches_per_slice(axis):
    g = torch.Generator().manual_seed(1)
    x = torch.randn(3, 4, 5, 5, generator=g)
    C = x.shape[axis]
    v = x.transpose(0, axis).reshape(C, -1)
    scale, zp = choose_qparams(v.amin(1), v.amax(1), 0, 15, symmetric=False)
    assert scale.shape == (C,)
    shape = broadcast_shape(x, axis)
    out = fake_quantize(x, scale.view(shape), zp.view(shape), 0, 15)
    assert out.shape == x.shape
    for c in range(C):
        xs = x.select(axis, c)
        ref = fake_quantize(xs, scale[c], zp[c], 0, 15)
        assert torch.allclose(out.select(axis, c), ref)
    # different channels really use different scales: per-tensor would give a different result
    s_t, z_t = choose_qparams(x.min().reshape(1), x.max().reshape(1), 0, 15, symmetric=False)
    assert not torch.allclose(out, fake_quantize(x, s_t, z_t, 0, 15))


def test_two_bit_unsigned_has_four_levels():
    x = torch.linspace(-1, 3, 1000)
    scale, zp = choose_qparams(T([-1.0]), T([3.0]), 0, 3, symmetric=False)
    out = fake_quantize(x, scale, zp, 0, 3)
    values = torch.unique(out)
    assert values.numel() <= 4
    assert values.numel() == 4  # the whole range is covered, so every level is used
    assert 0.0 in values.tolist()


# ---- gradients ------------------------------------------------------------------------------------------------------
def test_round_ste():
    x = T([-1.7, -0.5, 0.2, 0.5, 1.49, 2.6], requires_grad=True)
    y = round_ste(x)
    assert torch.equal(y.detach(), torch.round(x.detach()))
    y.sum().backward()
    assert torch.equal(x.grad, torch.ones_like(x))


def test_fake_quantize_ste_gradient():
    scale, zp = choose_qparams(T([-1.0]), T([1.0]), 0, 255, symmetric=False)
    rep_lo, rep_hi = float((0 - zp) * scale), float((255 - zp) * scale)
    x = T([-5.0, rep_lo - 0.5, -0.5, 0.0, 0.3, 0.9, rep_hi + 0.5, 10.0], requires_grad=True)
    fake_quantize(x, scale, zp, 0, 255).sum().backward()
    inside = (x.detach() > rep_lo) & (x.detach() < rep_hi)
    assert inside.tolist() == [False, False, True, True, True, True, False, False]
    assert torch.allclose(x.grad[inside], torch.ones(int(inside.sum())))
    assert torch.equal(x.grad[~inside], torch.zeros(int((~inside).sum())))


def test_codes_on_the_end_of_the_range_count_as_clipped_whatever_torch_clamp_does():
    # torch.clamp's subgradient at its bounds changed between releases (1, then 0); GPTQ puts many weights exactly on
    # the end codes, so fake_quantize fixes the convention itself: the end codes pass no gradient to x, and the step
    # gets the code (LSQ's clipped case). 4-bit signed, step 0.5: -4.0 and 3.5 sit on -8 and 7, -3.8 rounds to -8.
    x = T([-4.0, 3.5, -3.8, 1.0, 1.2], requires_grad=True)
    scale = T([0.5]).requires_grad_(True)
    y = fake_quantize(x, scale, T([0.0]), -8, 7)
    assert y.detach().tolist() == [-4.0, 3.5, -4.0, 1.0, 1.0]
    y.sum().backward()
    assert x.grad.tolist() == [0.0, 0.0, 0.0, 1.0, 1.0]
    # dy/ds: the code when clipped, round(x/s) - x/s inside: -8 + 7 - 8 + 0 + (2 - 2.4)
    assert float(scale.grad) == pytest.approx(-9.4, abs=1e-6)


def test_lsq_forward_matches_and_scale_gets_gradient():
    g = torch.Generator().manual_seed(2)
    x = torch.randn(64, generator=g)
    scale0, zp = choose_qparams(x.min().reshape(1), x.max().reshape(1), 0, 15, symmetric=False)
    scale = scale0.clone().requires_grad_(True)
    grad_scale = 1.0 / (x.numel() * 15) ** 0.5
    out = lsq_fake_quantize(x, scale, zp, 0, 15, grad_scale)
    ref = fake_quantize(x, scale0, zp, 0, 15)
    assert torch.allclose(out, ref, atol=1e-6)
    ((out - x) ** 2).sum().backward()
    assert scale.grad is not None
    assert torch.isfinite(scale.grad).all()
    assert float(scale.grad.abs()) > 0

    # the gradient is the plain fake_quantize gradient times grad_scale
    scale2 = scale0.clone().requires_grad_(True)
    ((fake_quantize(x, scale2, zp, 0, 15) - x) ** 2).sum().backward()
    assert torch.allclose(scale.grad, scale2.grad * grad_scale, rtol=1e-4, atol=1e-8)


def _fake_quantize_op_by_op(x, scale, zp, qmin, qmax, grad_scale, dither=None):
    """The same maths as separate differentiable ops: what _FakeQuantize's hand-written backward must equal. With a
    dither: round at x / s + d and take d off again, where the plain code is inside the range."""
    s = scale_grad(scale, grad_scale)
    v = round_ste(x / s) + zp
    inside = (v > qmin) & (v < qmax)
    kept = v if dither is None else round_ste(x / s + dither) + zp - dither
    return (torch.where(inside, kept, v.detach().clamp(qmin, qmax)) - zp) * s


@pytest.mark.parametrize(("x_shape", "s_shape", "dtype"), [
    ((4, 8, 5, 5), (), torch.float32),  # per tensor
    ((4, 8, 5, 5), (1, 8, 1, 1), torch.float32),  # activation per channel
    ((8, 3, 3, 3), (8, 1, 1, 1), torch.float32),  # weight per output channel
    ((4, 8, 5, 5), (1, 8, 1, 1), torch.float64),  # the parity test's float64 model, float32 steps
])
def test_fused_gradients_equal_the_op_by_op_ones(x_shape, s_shape, dtype):
    g = torch.Generator().manual_seed(0)
    x = (3 * torch.randn(x_shape, generator=g, dtype=dtype)).requires_grad_(True)
    scale = (0.1 + 0.5 * torch.rand(s_shape, generator=g)).requires_grad_(True)
    zp, up = torch.full(s_shape, 2.0), torch.randn(x_shape, generator=g, dtype=dtype)
    got = []
    for fn in (_fake_quantize_op_by_op, lsq_fake_quantize):
        x.grad = scale.grad = None
        y = fn(x, scale, zp, 0, 15, 0.1)
        y.backward(up)
        got.append((y.detach(), x.grad.clone(), scale.grad.clone()))
    (y0, gx0, gs0), (y1, gx1, gs1) = got
    assert torch.allclose(y1, y0, atol=1e-6)
    assert torch.allclose(gx1, gx0, atol=1e-6)
    assert gs1.shape == scale.shape and gs1.dtype == scale.dtype
    assert torch.allclose(gs1, gs0, rtol=1e-5, atol=1e-5)
    assert (x.grad == 0).any() and (x.grad != 0).any()  # both clipped and inside values were exercised


def test_without_gradients_fake_quantize_takes_the_plain_path():
    x, scale = torch.randn(16, requires_grad=True), T([0.25])
    with torch.no_grad():
        y = fake_quantize(x, scale, T([3.0]), 0, 15)
    assert y.grad_fn is None
    assert torch.equal(y, (torch.clamp(torch.round(x.detach() / 0.25) + 3, 0, 15) - 3) * 0.25)


@pytest.mark.parametrize(("x_shape", "s_shape", "z_shape"), [
    ((1, 300), (64, 1), (64, 1)),  # a range search: candidates x histogram bins
    ((8, 27), (8, 1), (8, 1)),  # weights per output channel
    ((2, 8, 5, 5), (), ()),  # per tensor
    ((16,), (), (4, 16)),  # a zero point wider than x / scale: the op-by-op path
])
def test_without_gradients_fake_quantize_is_bit_identical_to_quantize_then_dequantize(x_shape, s_shape, z_shape):
    g = torch.Generator().manual_seed(0)
    x = 4 * torch.randn(x_shape, generator=g)
    scale = 0.05 + torch.rand(s_shape, generator=g)
    zp = torch.randint(0, 16, z_shape, generator=g).float()
    want = dequantize(quantize(x, scale, zp, 0, 15), scale, zp)
    got = fake_quantize(x, scale, zp, 0, 15)
    assert torch.equal(got, want) and not torch.equal(got, x)


def test_dither_makes_the_rounding_error_independent_of_x_with_the_fused_gradients():
    g = torch.Generator().manual_seed(0)
    x = torch.linspace(0.2, 4.0, 50_001).requires_grad_(True)  # inside [0, 15] steps of 0.3 (zero point 0)
    scale, zp = torch.tensor(0.3, requires_grad=True), torch.tensor(0.0)
    d = torch.rand(x.shape, generator=g) - 0.5
    y = lsq_fake_quantize(x, scale, zp, 0, 15, 0.1, d)
    err, frac = ((y - x) / 0.3).detach(), (torch.round(x / 0.3) - x / 0.3).detach()
    # plain rounding's error is a function of x; the dithered one is uniform noise of the same size, unrelated to it
    assert float(err.abs().max()) <= 0.5 + 1e-5
    assert float(err.std()) == pytest.approx(12 ** -0.5, rel=0.02)
    assert abs(float(torch.corrcoef(torch.stack([err, frac]))[0, 1])) < 0.02
    # the codes are whole steps once the dither is taken off again
    codes = y.detach() / 0.3 + d
    assert torch.allclose(codes, codes.round(), atol=1e-4)
    up = torch.randn(x.shape, generator=g)
    y.backward(up)
    gx, gs = x.grad.clone(), scale.grad.clone()
    x.grad = scale.grad = None
    y0 = _fake_quantize_op_by_op(x, scale, zp, 0, 15, 0.1, d)
    y0.backward(up)
    assert torch.allclose(y.detach(), y0.detach(), atol=1e-6)
    assert torch.allclose(gx, x.grad) and torch.allclose(gs, scale.grad, rtol=1e-4)


def test_dither_clips_what_the_plain_rounding_clips_and_nothing_else():
    x, scale, zp = torch.tensor([-5.0, 0.0, 0.61, 9.0, -0.6]), torch.tensor(0.25), torch.tensor(3.0)
    y = fake_quantize(x, scale, zp, 0, 15, torch.tensor([0.4, 0.4, 0.4, 0.4, -0.4]))
    assert y[0] == -0.75 and y[3] == 3.0  # beyond the range: the bounds, (0 - 3) and (15 - 3) steps, no dither
    # inside: round(x/s + d) - d steps, also where the dithered code lands on a bound (-2.4 - 0.4 -> -3 + 0.4)
    assert y[1:3].tolist() == pytest.approx([-0.1, 0.65]) and float(y[4]) == pytest.approx(-0.65)
    assert torch.equal(fake_quantize(x, scale, zp, 0, 15, torch.zeros(5)), fake_quantize(x, scale, zp, 0, 15))
