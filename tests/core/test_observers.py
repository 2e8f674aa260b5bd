"""Range observers: min/max, histogram percentile and MSE, per-channel weight MSE, factory."""

import pytest
import torch

from yoloq.core.functional import choose_qparams, fake_quantize
from yoloq.core.observers import HistogramObserver, MinMaxObserver, WeightMSEObserver, make_observer
from yoloq.core.qspec import QSpec, activation_spec, weight_spec


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _feed(x: torch.Tensor, *observers, chunk: int = 5000) -> None:
    """Stream x through the observers in chunks, as calibration batches would arrive."""
    for part in x.split(chunk):
        for obs in observers:
            obs.update(part)


def _qmse(x: torch.Tensor, lo: torch.Tensor, hi: torch.Tensor, spec: QSpec) -> float:
    s, z = choose_qparams(lo, hi, spec.qmin, spec.qmax, spec.symmetric)
    return float(((fake_quantize(x, s, z, spec.qmin, spec.qmax) - x) ** 2).mean())


# ---- MinMax ---------------------------------------------------------------------------------------------------------
def test_minmax_per_tensor_two_updates():
    obs = MinMaxObserver()
    obs.update(torch.tensor([[-1.0, 2.0], [0.5, 0.0]]))
    obs.update(torch.tensor([-0.5, 3.0, 1.0]))
    lo, hi = obs.compute(QSpec())
    assert torch.equal(lo, torch.tensor([-1.0]))
    assert torch.equal(hi, torch.tensor([3.0]))
    obs.update(torch.tensor([-7.0]))
    lo, hi = obs.compute(QSpec())
    assert torch.equal(lo, torch.tensor([-7.0])) and torch.equal(hi, torch.tensor([3.0]))


def test_minmax_per_channel_axis0_two_updates():
    obs = MinMaxObserver(per_channel=True, axis=0)
    a = torch.tensor([[1.0, 2.0, 3.0], [-1.0, 0.0, 1.0]])
    b = torch.tensor([[0.0, 5.0, 2.0], [-0.5, -3.0, 0.5]])
    obs.update(a)
    obs.update(b)
    lo, hi = obs.compute(QSpec(per_channel=True))
    assert torch.equal(lo, torch.tensor([0.0, -3.0]))
    assert torch.equal(hi, torch.tensor([5.0, 1.0]))


def test_minmax_per_channel_axis1():
    g = _gen(0)
    x1, x2 = torch.randn(2, 3, 4, 4, generator=g), torch.randn(2, 3, 4, 4, generator=g) * 3
    obs = MinMaxObserver(per_channel=True, axis=1)
    obs.update(x1)
    obs.update(x2)
    lo, hi = obs.compute(QSpec(per_channel=True, axis=1))
    both = torch.cat([x1, x2])
    assert torch.equal(lo, both.amin(dim=(0, 2, 3)))
    assert torch.equal(hi, both.amax(dim=(0, 2, 3)))


def test_compute_before_update_raises():
    for obs in (MinMaxObserver(), HistogramObserver("percentile"), HistogramObserver("mse")):
        with pytest.raises(RuntimeError):
            obs.compute(QSpec())


# ---- Histogram: percentile ------------------------------------------------------------------------------------------
def test_percentile_ignores_rare_outliers():
    # 3 outliers in 100003 values (3e-5) are lighter than the default 1e-4 tail
    x = torch.cat([torch.randn(100_000, generator=_gen(1)), torch.full((3,), 1000.0)])
    obs = make_observer("percentile")
    obs.update(x)
    lo, hi = obs.compute(activation_spec(8))
    assert 2.0 < float(hi) < 100.0
    assert -100.0 < float(lo) < -2.0
    # the brief's 10000 + 3 outliers case needs a tail above the outlier mass (3e-4)
    x = torch.cat([torch.randn(10_000, generator=_gen(2)), torch.full((3,), 1000.0)])
    obs = HistogramObserver("percentile", tail=1e-3)
    obs.update(x)
    lo, hi = obs.compute(activation_spec(8))
    assert 2.0 < float(hi) < 100.0


def test_percentile_keeps_outliers_heavier_than_tail():
    # 3 outliers in 10003 values (3e-4) are more than the 1e-4 tail: the range must reach them
    x = torch.cat([torch.randn(10_000, generator=_gen(2)), torch.full((3,), 1000.0)])
    obs = make_observer("percentile")
    obs.update(x)
    _, hi = obs.compute(activation_spec(8))
    assert float(hi) > 900.0
    assert float(hi) <= 1000.0  # never beyond the observed max


def test_percentile_within_observed_range():
    x = torch.rand(5000, generator=_gen(3)) * 2 + 1  # [1, 3]
    obs = make_observer("percentile")
    obs.update(x)
    lo, hi = obs.compute(activation_spec(8))
    assert float(x.min()) <= float(lo) < float(hi) <= float(x.max())


# ---- Histogram: MSE -------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("kind", ["cubed_normal", "exponential"])
def test_mse_clips_long_tail_and_beats_minmax(kind):
    g = _gen(4)
    if kind == "cubed_normal":
        x = torch.randn(20_000, generator=g) ** 3
    else:
        x = -torch.log(torch.rand(20_000, generator=g).clamp_min(1e-12))  # Exp(1), max ~ 10
    spec = activation_spec(4)
    mm = make_observer("minmax")
    mse = make_observer("mse")
    assert isinstance(mse, HistogramObserver)
    _feed(x, mm, mse)
    lo_m, hi_m = mm.compute(spec)
    lo, hi = mse.compute(spec)
    assert float(hi) < float(x.max())
    assert float(lo) >= float(x.min())
    assert _qmse(x, lo, hi, spec) < _qmse(x, lo_m, hi_m, spec)


def test_mse_symmetric_range():
    x = torch.randn(20_000, generator=_gen(5)) ** 3
    spec = QSpec(bits=4, signed=True, symmetric=True)
    obs = make_observer("mse", spec)
    obs.update(x)
    lo, hi = obs.compute(spec)
    assert torch.allclose(lo, -hi)
    assert float(hi) < float(x.abs().max())
    amax = x.abs().max().reshape(1)
    assert _qmse(x, lo, hi, spec) < _qmse(x, -amax, amax, spec)


# ---- Histogram re-binning -------------------------------------------------------------------------------------------
def test_histogram_rebin_keeps_counts():
    obs = HistogramObserver("percentile", bins=2048)
    a = torch.rand(1000, generator=_gen(6))  # [0, 1)
    b = -torch.rand(3000, generator=_gen(7)) * 10  # (-10, 0]
    c = torch.rand(500, generator=_gen(8)) * 0.5  # inside the current range: no re-binning
    obs.update(a)
    assert float(obs.hist.sum()) == a.numel()
    edges_a = obs.edges
    obs.update(b)
    assert obs.edges != edges_a
    assert obs.edges[0] <= float(b.min()) and obs.edges[1] >= float(a.max())
    assert float(obs.hist.sum()) == a.numel() + b.numel()
    edges_b = obs.edges
    obs.update(c)
    assert obs.edges == edges_b
    assert float(obs.hist.sum()) == a.numel() + b.numel() + c.numel()
    # the re-binned counts of the first batch stayed where that batch was: in [0, 1)
    centers = obs._centers(obs.edges)
    width = (obs.edges[1] - obs.edges[0]) / obs.bins
    in_a = (centers > -width) & (centers < 1 + width)
    expected = a.numel() + c.numel() + int((b > -2 * width).sum())
    assert abs(float(obs.hist[in_a].sum()) - expected) <= 5


def test_histogram_rebin_both_sides():
    obs = HistogramObserver("mse", bins=256)
    batches = [torch.randn(300, generator=_gen(i)) * (i + 1) for i in range(5)]
    for b in batches:
        obs.update(b)
    allx = torch.cat(batches)
    assert float(obs.hist.sum()) == allx.numel()
    assert obs.edges[0] <= float(allx.min()) and obs.edges[1] >= float(allx.max())


# ---- Weight MSE -----------------------------------------------------------------------------------------------------
def test_weight_mse_per_channel_narrower_and_better():
    g = _gen(9)
    # long-tailed (cubed normal) weights with very different per-channel magnitudes
    w = torch.randn(8, 16, 3, 3, generator=g) ** 3 * torch.linspace(0.1, 2.0, 8).view(-1, 1, 1, 1)
    spec = weight_spec(4)
    mm = make_observer("minmax", spec, weight=True)
    wm = make_observer("mse", spec, weight=True)
    assert isinstance(mm, MinMaxObserver) and not isinstance(mm, WeightMSEObserver)
    assert isinstance(wm, WeightMSEObserver)
    mm.update(w)
    wm.update(w)
    lo_m, hi_m = mm.compute(spec)
    lo, hi = wm.compute(spec)
    assert lo.shape == hi.shape == (8,)
    assert torch.equal(lo, -hi)
    amax_m = torch.maximum(-lo_m, hi_m)
    assert (hi <= amax_m).all()
    assert (hi > 0).all()

    def per_channel_err(a):
        s, z = choose_qparams(-a, a, spec.qmin, spec.qmax, True)
        return ((fake_quantize(w, s.view(-1, 1, 1, 1), z.view(-1, 1, 1, 1), spec.qmin, spec.qmax) - w) ** 2).sum(
            dim=(1, 2, 3)
        )

    err_mse, err_mm = per_channel_err(hi), per_channel_err(amax_m)
    assert (err_mse <= err_mm + 1e-6).all()
    # on long-tailed weights every channel is clipped, and gains from it
    assert (hi < amax_m).all()
    assert (err_mse < err_mm).all()


# ---- factory --------------------------------------------------------------------------------------------------------
def test_make_observer_unknown_raises():
    with pytest.raises(ValueError, match="unknown observer"):
        make_observer("kl")
    with pytest.raises(ValueError):
        make_observer("percentile99", weight=True)


def test_make_observer_kinds():
    assert type(make_observer("minmax")) is MinMaxObserver
    pc = make_observer("minmax", QSpec(per_channel=True, axis=1))
    assert pc.per_channel and pc.axis == 1
    for name in ("percentile", "mse"):
        obs = make_observer(name)
        assert isinstance(obs, HistogramObserver) and obs.mode == name
    # percentile on weights falls back to the weight MSE search
    assert isinstance(make_observer("percentile", weight_spec(8), weight=True), WeightMSEObserver)


# ---- unilateral (SiLU outputs) --------------------------------------------------------------------------------------
def test_silu_min_constant():
    from yoloq.core.observers import SILU_ARGMIN, SILU_MIN

    a = torch.linspace(-3, 0, 300_001, dtype=torch.float64)
    y = a * torch.sigmoid(a)
    assert SILU_MIN == pytest.approx(float(y.min()), abs=1e-10)
    assert SILU_ARGMIN == pytest.approx(float(a[y.argmin()]), abs=1e-4)
    assert SILU_MIN == pytest.approx(-0.2785, abs=1e-4)


@pytest.mark.parametrize("pre", ["gaussian", "cubed_gaussian"])
def test_unilateral_pins_silu_minimum_and_clips_the_tail(pre):
    from yoloq.core.observers import OBSERVERS, SILU_MIN

    assert "unilateral" in OBSERVERS
    a = torch.randn(20_000, generator=_gen(10))
    x = torch.nn.functional.silu(a if pre == "gaussian" else a**3)  # max ~4, or a long tail up to ~65
    spec = activation_spec(4)
    obs, mm = make_observer("unilateral"), make_observer("minmax")
    assert isinstance(obs, HistogramObserver) and obs.mode == "unilateral"
    _feed(x, obs, mm)
    lo, hi = obs.compute(spec)
    assert float(lo) == pytest.approx(SILU_MIN, abs=1e-3)
    assert float(hi) < 0.8 * float(x.max())
    # measured: 0.0035 vs 0.0057 (gaussian), 0.195 vs 0.311 (cubed)
    assert _qmse(x, lo, hi, spec) < 0.95 * _qmse(x, *mm.compute(spec), spec)
    # the zero point is rounded: the realised lower bound -zp * s is within half a step of the pin
    s, z = choose_qparams(lo, hi, spec.qmin, spec.qmax, False)
    assert abs(float(-z * s) - SILU_MIN) <= float(s) / 2 + 1e-6
    # through a FakeQuantizer, as a recipe would use it
    from yoloq.core.quantizer import FakeQuantizer

    q = FakeQuantizer(spec, observer="unilateral")
    q.observe()
    q(x)
    q.freeze()
    assert q.real_range()[0] == pytest.approx(float(-z * s))


def test_unilateral_lower_bound_rules():
    from yoloq.core.observers import SILU_MIN

    spec = activation_spec(8)
    g = _gen(11)
    cases = {
        "relu": torch.relu(torch.randn(5000, generator=g)),  # never below 0: keeps its own minimum
        "half_silu": 0.5 * torch.nn.functional.silu(torch.randn(5000, generator=g) * 2),  # min ~ -0.139 > pin
        "pre_activation": torch.randn(5000, generator=g) * 3,  # min ~ -10 < pin: clipped at the pin
    }
    for name, x in cases.items():
        obs = make_observer("unilateral")
        obs.update(x)
        lo, _ = obs.compute(spec)
        assert float(lo) == pytest.approx(max(SILU_MIN, float(x.min())), abs=1e-7), name
    # weights ignore the pin: per-channel symmetric MSE search
    assert isinstance(make_observer("unilateral", weight_spec(8), weight=True), WeightMSEObserver)


# ---- silu-mse (pre-SiLU accumulators) -------------------------------------------------------------------------------
def _silu_err(a: torch.Tensor, lo, hi, spec: QSpec) -> float:
    s, z = choose_qparams(lo, hi, spec.qmin, spec.qmax, spec.symmetric)
    f = torch.nn.functional.silu
    return float(((f(fake_quantize(a, s, z, spec.qmin, spec.qmax)) - f(a)) ** 2).mean())


def test_silu_mse_clips_the_flat_negative_tail():
    # a pre-activation with a long negative tail (as BN-folded convs before a SiLU have): the SiLU squashes
    # everything below about -4 to within 0.08 of 0, so the codes spent there are wasted
    g = _gen(12)
    a = torch.cat([torch.randn(20_000, generator=g) * 2, -30 * torch.rand(4000, generator=g)])
    spec = activation_spec(8)
    plain, silu = make_observer("mse"), make_observer("silu-mse")
    assert isinstance(silu, HistogramObserver) and silu.mode == "silu-mse"
    _feed(a, plain, silu, chunk=6000)
    lo_p, hi_p = plain.compute(spec)
    lo_s, hi_s = silu.compute(spec)
    assert float(lo_p) < -25  # the plain search keeps the tail: its error is measured before the SiLU
    assert -12 < float(lo_s) < -2  # judged after the SiLU, the tail is clipped
    # what the consumer sees: the error after the SiLU is several times smaller
    assert _silu_err(a, lo_s, hi_s, spec) < 0.3 * _silu_err(a, lo_p, hi_p, spec)
    # and the search is what minimises it: no other of a few ranges does better
    for lo in (-1.0, -3.0, -6.0, -15.0):
        assert _silu_err(a, lo_s, hi_s, spec) <= _silu_err(a, torch.tensor([lo]), hi_s, spec) + 1e-9


def test_silu_mse_is_internal_and_chosen_for_silu_accumulators():
    from torch import nn

    from yoloq.core.modules import QConv2d
    from yoloq.core.observers import OBSERVERS
    from yoloq.recipe import Recipe
    from yoloq.errors import YoloqError

    assert "silu-mse" not in OBSERVERS  # a placement choice, not a recipe's
    with pytest.raises(YoloqError):
        Recipe(observer="silu-mse")
    conv = nn.Conv2d(3, 4, 3)
    m = QConv2d(conv, nn.SiLU(), observer="mse")
    assert m.acc_quantizer.observer_name == "silu-mse"
    assert m.output_quantizer.observer_name == "mse"
    # other observers and other activations keep the recipe's choice
    assert QConv2d(conv, nn.SiLU(), observer="percentile").acc_quantizer.observer_name == "percentile"
    assert QConv2d(conv, nn.ReLU(), observer="mse").acc_quantizer.observer_name == "mse"
