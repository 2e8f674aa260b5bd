"""QConv2d and QuantizedOutput: calibration, numerics against float, gate grid, int32 bias fitting."""

import pytest
import torch
from torch import nn

from yoloq.core.functional import fake_quantize
from yoloq.core.modules import GATE_SPEC, QConv2d, QuantizedOutput, iter_quantizers, wire_input_grids
from yoloq.core.quantizer import MIN_ACT_SCALE, FakeQuantizer


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _calibrate(m: nn.Module, batches) -> None:
    qs = [q for _, q in iter_quantizers(m) if not bool(q.calibrated)]
    for q in qs:
        q.observe()
    with torch.no_grad():
        for x in batches:
            m(x)
    for q in qs:
        q.freeze()


def _conv(seed: int = 0, cin: int = 3, cout: int = 8) -> nn.Conv2d:
    torch.manual_seed(seed)
    return nn.Conv2d(cin, cout, 3, padding=1)


def _batches(n: int = 3, seed: int = 1):
    g = _gen(seed)
    return [torch.randn(2, 3, 8, 8, generator=g) for _ in range(n)]


def _rel_err(y: torch.Tensor, ref: torch.Tensor) -> float:
    return float((y - ref).norm() / ref.norm())


# ---- QConv2d --------------------------------------------------------------------------------------------------------
def test_qconv_quantizer_layout():
    m = QConv2d(_conv(), nn.SiLU(), weight_bits=4, act_bits=4)
    qs = m.quantizers()
    assert set(qs) == {"weight_quantizer", "acc_quantizer", "gate_quantizer", "output_quantizer"}
    assert qs["weight_quantizer"].scale.shape == (8,)
    assert qs["weight_quantizer"].spec.bits == 4 and qs["weight_quantizer"].spec.per_channel
    assert qs["output_quantizer"].spec.bits == 4
    assert qs["acc_quantizer"].spec.bits == 8
    assert len(list(iter_quantizers(m))) == 4
    # no activation: no acc/gate quantizer; input_bits adds an input quantizer
    m2 = QConv2d(_conv(), None, input_bits=8)
    assert set(m2.quantizers()) == {"input_quantizer", "weight_quantizer", "output_quantizer"}
    # ReLU: no gate
    assert "gate_quantizer" not in QConv2d(_conv(), nn.ReLU()).quantizers()
    assert "gate_quantizer" not in QConv2d(_conv(), nn.SiLU(), quantize_gate=False).quantizers()


def test_gate_quantizer_precalibrated():
    m = QConv2d(_conv(), nn.SiLU(), weight_bits=4, act_bits=4)
    gq = m.gate_quantizer
    assert gq.spec == GATE_SPEC
    assert bool(gq.calibrated)
    assert torch.allclose(gq.scale, torch.tensor([1 / 255]))
    assert torch.equal(gq.zero_point, torch.zeros(1))
    # sigmoid outputs land on the k/255 grid of [0, 1]
    s = torch.sigmoid(torch.randn(100, generator=_gen(2)) * 4)
    out = gq(s)
    assert torch.allclose(out * 255, torch.round(out * 255), atol=1e-4)
    assert (out >= 0).all() and (out <= 1 + 1e-6).all()


def test_uncalibrated_qconv_is_float():
    conv = _conv()
    m = QConv2d(conv, nn.SiLU(), weight_bits=4, act_bits=4, quantize_gate=False)
    x = _batches(1)[0]
    with torch.no_grad():
        assert torch.allclose(m(x), nn.functional.silu(conv(x)), atol=1e-6)


def test_qconv_w4a4_close_to_float():
    conv = _conv()
    m = QConv2d(conv, nn.SiLU(), weight_bits=4, act_bits=4)
    _calibrate(m, _batches())
    assert all(bool(q.calibrated) for q in m.quantizers().values())
    x = torch.randn(2, 3, 8, 8, generator=_gen(9))
    with torch.no_grad():
        ref = nn.functional.silu(conv(x))
        y = m(x)
    assert y.shape == ref.shape
    err = _rel_err(y, ref)
    assert 1e-3 < err < 0.35
    assert torch.unique(y).numel() <= 16
    # outputs lie on the 4-bit output grid
    oq = m.output_quantizer
    codes = y / oq.scale + oq.zero_point
    assert torch.allclose(codes, torch.round(codes), atol=1e-3)


def test_qconv_w8a8_closer_than_w4a4():
    x = torch.randn(2, 3, 8, 8, generator=_gen(9))
    errs = {}
    for bits in (4, 8):
        conv = _conv()
        m = QConv2d(conv, nn.SiLU(), weight_bits=bits, act_bits=bits)
        _calibrate(m, _batches())
        with torch.no_grad():
            errs[bits] = _rel_err(m(x), nn.functional.silu(conv(x)))
    assert 0 < errs[8] < 0.05
    assert errs[8] < errs[4] / 3


def test_qconv_without_act_uses_output_quantizer():
    conv = _conv()
    m = QConv2d(conv, None, weight_bits=8, act_bits=3)
    _calibrate(m, _batches())
    x = torch.randn(2, 3, 8, 8, generator=_gen(10))
    with torch.no_grad():
        y = m(x)
    assert torch.unique(y).numel() <= 8


# ---- fit_bias_to_int32 ----------------------------------------------------------------------------------------------
def test_fit_bias_to_int32():
    conv = nn.Conv2d(2, 2, 1)
    with torch.no_grad():
        conv.weight[0].fill_(1e-9)  # dead channel with a large bias
        conv.bias[0] = 50.0
        conv.weight[1] = torch.tensor([0.5, -0.3]).view(2, 1, 1)  # normal channel
        conv.bias[1] = 0.1
    m = QConv2d(conv, nn.SiLU(), weight_bits=4, act_bits=8)
    wq = m.weight_quantizer
    m.fit_bias_to_int32()  # not calibrated yet: no-op
    assert not bool(wq.calibrated) and torch.equal(wq.scale, torch.ones(2))

    _calibrate(m, [torch.randn(1, 2, 4, 4, generator=_gen(11))])
    before = wq.scale.detach().clone()
    bias = conv.bias.detach().abs()
    assert float(bias[0] / (before[0] * MIN_ACT_SCALE)) >= 2**31  # would overflow int32
    m.fit_bias_to_int32()
    after = wq.scale.detach()
    assert float(after[0]) > float(before[0])
    assert ((bias / (after.double() * MIN_ACT_SCALE)) < 2**31).all()
    assert float(after[1]) == float(before[1])
    # the dead channel's weights now round to zero; the normal channel is quantized as before
    wfq = wq(conv.weight)
    assert torch.equal(wfq[0], torch.zeros_like(wfq[0]))
    assert torch.allclose(wfq[1], fake_quantize(conv.weight[1], before[1], torch.tensor(0.0), -8, 7))


def test_fit_bias_without_bias_is_noop():
    conv = nn.Conv2d(2, 2, 1, bias=False)
    m = QConv2d(conv, nn.SiLU(), weight_bits=4)
    _calibrate(m, [torch.randn(1, 2, 4, 4, generator=_gen(12))])
    before = m.weight_quantizer.scale.detach().clone()
    m.fit_bias_to_int32()
    assert torch.equal(m.weight_quantizer.scale, before)


# ---- bias on the int32 grid ----------------------------------------------------------------------------------------
def _biased_qconv(seed: int = 0) -> QConv2d:
    conv = _conv(seed)
    with torch.no_grad():
        conv.bias.copy_(torch.randn(conv.out_channels, generator=_gen(seed + 100)) * 0.3)
    m = QConv2d(conv, nn.SiLU(), weight_bits=4, act_bits=4, input_bits=8)
    _calibrate(m, _batches())
    return m


def test_bias_rounded_to_input_step_times_weight_step():
    m = _biased_qconv()
    step = m.input_quantizer.scale * m.weight_quantizer.scale
    b_q = m.quantized_bias()
    codes = b_q / step
    assert torch.allclose(codes, codes.round(), atol=1e-3)  # integers, in units of s_in * s_w
    assert (b_q - m.conv.bias).abs().max() <= step.max() / 2 * 1.0001
    assert not torch.equal(b_q, m.conv.bias)  # a random bias is not on the grid already
    # the layer uses it: its output equals a float conv with the rounded bias
    x = _batches(1, seed=5)[0]
    ref_conv = nn.Conv2d(3, 8, 3, padding=1)
    ref_conv.weight.data, ref_conv.bias.data = m.quantized_weight().detach(), b_q.detach()
    acc = m.acc_quantizer(ref_conv(m.input_quantizer(x)))
    ref = m.output_quantizer(acc * m.gate_quantizer(torch.sigmoid(acc)))
    assert torch.allclose(m(x), ref, atol=1e-6)


def test_bias_rounding_passes_the_gradient_straight_through():
    m = _biased_qconv()
    m.conv.bias.requires_grad_(True)
    (m.quantized_bias() * torch.arange(8.0)).sum().backward()
    assert torch.allclose(m.conv.bias.grad, torch.arange(8.0))


def test_bias_stays_float_without_a_quantized_input_or_weights():
    m = _biased_qconv()
    m.input_quantizer.enabled = False  # the input is float: ORT keeps this conv float too
    assert torch.equal(m.quantized_bias(), m.conv.bias)
    m.input_quantizer.enabled, m.weight_quantizer.enabled = True, False
    assert torch.equal(m.quantized_bias(), m.conv.bias)
    no_input = QConv2d(_conv(), nn.SiLU(), weight_bits=4, act_bits=4)  # no input quantizer and not wired
    _calibrate(no_input, _batches())
    assert torch.equal(no_input.quantized_bias(), no_input.conv.bias)


class _Chain(nn.Module):
    """a -> chunk -> b; a -> maxpool -> c; cat(b, c) -> QuantizedOutput -> d: the moves a conv's input goes through."""

    def __init__(self):
        super().__init__()
        self.a = QConv2d(nn.Conv2d(3, 8, 1), nn.SiLU(), 4, 4, input_bits=8)
        self.b = QConv2d(nn.Conv2d(4, 4, 1), nn.SiLU(), 4, 4)
        self.c = QConv2d(nn.Conv2d(8, 4, 1), nn.SiLU(), 4, 4)
        self.cat = QuantizedOutput(_Cat(), 4)
        self.d = QConv2d(nn.Conv2d(8, 4, 1), None, 4, 4)
        self.pool = nn.MaxPool2d(3, 1, 1)

    def forward(self, x):
        a = self.a(x)
        b = self.b(a.chunk(2, 1)[1])
        c = self.c(self.pool(a))
        return self.d(self.cat([b, c]))


class _Cat(nn.Module):
    def forward(self, xs):
        return torch.cat(xs, 1)


def test_wire_input_grids_follows_views_pools_and_wrapped_outputs():
    torch.manual_seed(0)
    m = _Chain()
    assert wire_input_grids(m, torch.rand(1, 3, 6, 6)) == 3
    assert m.a.input_source is None  # has an input quantizer of its own
    assert m.b.input_source == (m.a, "output_quantizer")
    assert m.c.input_source == (m.a, "output_quantizer")
    assert m.d.input_source == (m.cat, "output_quantizer")
    assert m.d.input_grid() is m.cat.output_quantizer
    m.cat.output_quantizer = FakeQuantizer(m.cat.output_quantizer.spec)  # replaced later (sparse, shared grids)
    assert m.d.input_grid() is m.cat.output_quantizer


# ---- QuantizedOutput ------------------------------------------------------------------------------------------------
class _AddOne(nn.Module):
    def forward(self, x):
        return x + 1.0


def test_quantized_output():
    inner = _AddOne()
    m = QuantizedOutput(inner, bits=3)
    assert isinstance(m.output_quantizer, FakeQuantizer)
    assert m.module is inner
    x = torch.randn(4, 5, generator=_gen(13))
    assert torch.equal(m(x), x + 1.0)  # uncalibrated: passes the module's output through
    _calibrate(m, [x])
    y = m(x)
    assert not torch.equal(y, x + 1.0)
    oq = m.output_quantizer
    assert torch.allclose(y, fake_quantize(x + 1.0, oq.scale, oq.zero_point, 0, 7))
    assert torch.unique(y).numel() <= 8
    assert (y - (x + 1.0)).abs().max() <= float(oq.scale) / 2 + 1e-6
    # its range was observed on the module's output, not its input
    lo = min(float((x + 1.0).min()), 0.0)
    assert float((0 - oq.zero_point) * oq.scale) == pytest.approx(lo, abs=float(oq.scale))
