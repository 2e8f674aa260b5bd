"""SparseQuantizer (TASKQ): split search, error against the plain quantizer, grids, state, gradients, phases."""

import pytest
import torch
import torch.nn.functional as F

from yoloq.core.functional import fake_quantize
from yoloq.core.modules import iter_quantizers
from yoloq.core.qspec import activation_spec
from yoloq.core.quantizer import FakeQuantizer
from yoloq.core.sparse import SparseQuantizer, choose_split, covering_qparams


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _long_tailed_silu(n: int = 40_000, outliers: int = 200, seed: int = 0) -> torch.Tensor:
    """SiLU of N(0, 1) with 0.5% of the pre-activations replaced by large values (5 to 30)."""
    g = _gen(seed)
    a = torch.randn(n, generator=g)
    a[torch.randperm(n, generator=g)[:outliers]] = 5 + 25 * torch.rand(outliers, generator=g)
    return F.silu(a)


def _calibrated(x: torch.Tensor, bits: int = 4, **kw) -> SparseQuantizer:
    q = SparseQuantizer(bits, **kw)
    q.observe()
    for chunk in x.split(10_000):
        q(chunk)
    q.freeze()
    return q


@pytest.fixture(scope="module")
def tail():
    x = _long_tailed_silu()
    return x, _calibrated(x)


# ---- choose_split ---------------------------------------------------------------------------------------------------
def test_choose_split_on_a_hand_made_histogram():
    # 1000 values uniform on [0, 1] in 100 bins of 10, and 5 outliers at 50 (0.5%)
    counts = torch.cat([torch.full((100,), 10.0), torch.zeros(99), torch.tensor([5.0])])
    edges = torch.cat([torch.linspace(0, 1, 101), torch.linspace(1, 50, 101)[1:]])
    assert edges.numel() == counts.numel() + 1
    sp = choose_split(counts, edges, bits=4)
    # the dense grid spans the bulk: cutting one more bulk bin (1%) on top of the outliers breaks the 1% budget
    assert 1.0 <= sp["t_d"] < 1.15
    assert sp["lo_d"] == 0.0 and sp["dense_zero_point"] == 0.0
    assert sp["outlier_fraction"] == pytest.approx(5 / 1005)
    # one-sided residual: zero point 0, grid up to xmax - t
    assert sp["residual_lo"] == 0.0 and sp["sparse_zero_point"] == 0.0
    assert sp["residual_hi"] == pytest.approx(50 - sp["t_d"], rel=1e-6)
    assert sp["sparse_scale"] == pytest.approx(sp["residual_hi"] / 255, rel=1e-5)
    # the bulk's grid error (step ~1/15, uniform: s^2 / 12) is what is left; a plain 4-bit grid over [0, 50] has a
    # step of 3.3 and loses the whole bulk
    assert sp["mse"] < (1.15 / 15) ** 2 / 12 * 1.2
    plain = choose_split(counts, edges, bits=4, max_outlier_fraction=0.0)  # no split admissible but the widest
    assert plain["t_d"] >= 50 and plain["outlier_fraction"] == 0.0
    assert plain["mse"] > 50 * sp["mse"]


def test_choose_split_mse_is_the_quantizers_own_error():
    # the reported error is the forward pass's error on the bin centers
    g = _gen(1)
    centers = torch.sort(F.silu(torch.randn(300, generator=g) * 2)).values
    centers = torch.cat([centers, torch.tensor([12.0, 20.0])])
    counts = torch.randint(1, 50, (302,), generator=g).float()
    counts[-2:] = 1
    sp = choose_split(counts, centers, bits=3)
    q = SparseQuantizer(3)
    q.dense.set_qparams(torch.tensor([sp["dense_scale"]]), torch.tensor([sp["dense_zero_point"]]))
    q.sparse.set_qparams(torch.tensor([sp["sparse_scale"]]), torch.tensor([sp["sparse_zero_point"]]))
    x = centers.repeat_interleave(counts.long())
    assert float(((q(x) - x) ** 2).mean()) == pytest.approx(sp["mse"], rel=1e-4)
    assert sp["outlier_fraction"] <= 0.01
    with pytest.raises(ValueError):
        choose_split(counts, centers[:-1], bits=3)


def test_covering_qparams_cover_both_ends():
    lo = torch.tensor([-0.2785, -1.0, 0.0, -0.3])
    hi = torch.tensor([2.6, 1.0, 5.0, 0.0])
    s, z = covering_qparams(lo, hi, 0, 15)
    assert torch.equal(z, torch.round(z))
    assert ((0 - z) * s <= lo).all() and ((15 - z) * s >= hi).all()
    # never coarser than needed: at most a step beyond choose_qparams' (hi - lo) / 15
    assert (s <= (hi - lo) / 15 * 1.35).all()


# ---- the long-tailed tensor -----------------------------------------------------------------------------------------
def test_beats_the_best_plain_quantizer_with_few_outliers(tail):
    x, q = tail
    plain = FakeQuantizer(activation_spec(4), observer="mse")
    plain.observe()
    plain(x)
    plain.freeze()
    mse_plain = float(((plain(x) - x) ** 2).mean())
    mse_sparse = float(((q(x) - x) ** 2).mean())
    assert mse_sparse < 0.1 * mse_plain  # measured: 0.0033 against 0.129
    lo, t = q.dense.real_range()
    outside = ((x < lo) | (x > t)).float().mean()
    assert 0.005 <= float(outside) < 0.01  # the 0.5% outliers, and few of the bulk
    assert q.outlier_fraction < 0.01 and float(outside) <= q.outlier_fraction  # an upper bound, from whole bins
    # the diagnostics predict what the tensor gets
    st = q.stats()
    assert st["mse_sparse"] == pytest.approx(mse_sparse, rel=0.1)
    assert st["mse_dense_only"] == pytest.approx(mse_plain, rel=0.1)
    assert st["t"] == t and t < 4.0  # the bulk of SiLU(N(0,1)) ends near 3; the outliers go up to 30


def test_zero_exact_in_both_branches(tail):
    _, q = tail
    for child in (q.dense, q.sparse):
        assert float(child.zero_point) == round(float(child.zero_point))
        assert float(child(torch.zeros(3)).abs().max()) == 0.0
    assert float(q.sparse.zero_point) == 0.0  # SiLU residuals are one-sided: every code goes to the tail
    assert float(q(torch.zeros(4)).abs().max()) == 0.0


def test_inside_values_carry_only_the_dense_error_and_outliers_the_sparse_step(tail):
    x, q = tail
    lo, t = q.dense.real_range()
    y = q(x)
    inside = (x >= lo) & (x <= t)
    s_d, s_r = float(q.dense.scale), float(q.sparse.scale)
    # inside: exactly the dense grid's value, within half a dense step
    assert torch.equal(y[inside], fake_quantize(x[inside], q.dense.scale, q.dense.zero_point, 0, 15))
    assert float((y[inside] - x[inside]).abs().max()) <= s_d / 2 + 1e-6
    # outside: reproduced within half an 8-bit step of the residual range [0, max - t], far below the dense step
    out = ~inside
    assert int(out.sum()) >= 200
    assert s_r == pytest.approx((float(x.max()) - t) / 255, rel=1e-4)
    assert float((y[out] - x[out]).abs().max()) <= s_r / 2 * 1.001 + 1e-6
    assert s_r < s_d


# ---- state ----------------------------------------------------------------------------------------------------------
def test_state_dict_round_trip(tail, tmp_path):
    x, q = tail
    keys = {f"{c}.{k}" for c in ("dense", "sparse") for k in ("scale", "zero_point", "calibrated")}
    assert set(SparseQuantizer(4).state_dict()) == keys == set(q.state_dict())
    torch.save(q.state_dict(), tmp_path / "q.pt")
    fresh = SparseQuantizer(4)
    assert torch.equal(fresh(x), x) and not bool(fresh.calibrated)
    fresh.load_state_dict(torch.load(tmp_path / "q.pt", weights_only=True))
    assert bool(fresh.calibrated)
    assert torch.equal(fresh(x), q(x)) and not torch.equal(fresh(x), x)


# ---- gradients: the split is the dense grid's range -----------------------------------------------------------------
def test_gradient_reaches_dense_scale_and_the_split_follows_it(tail):
    x, q0 = tail
    q = SparseQuantizer(4)
    q.load_state_dict(q0.state_dict())
    q.dense.scale.requires_grad_(True)
    lo, t = q.dense.real_range()
    # outliers strictly inside the sparse grid: one rounding to code 0 or 255 is, for torch.clamp's gradient, at the
    # grid's edge and gets t(s)'s gradient, like a value clipped at t
    s_r = float(q.sparse.scale)
    inside, outliers = x[(x > lo) & (x < t)], x[(x > t + s_r) & (x < t + 254 * s_r)]

    ((q(inside) - inside) ** 2).sum().backward()
    g = q.dense.scale.grad
    assert g is not None and torch.isfinite(g).all() and float(g.abs()) > 0
    # an outlier is t(s) + Q_sparse(x - t(s)): the threshold cancels, so no gradient. With a residual x - t that
    # carries no gradient (or another than the dense branch's), it would get the dense branch's (qmax - zp).
    q.dense.scale.grad = None
    q(outliers).sum().backward()
    assert outliers.numel() > 100 and float(q.dense.scale.grad.abs()) < 1e-3 * outliers.numel()

    # a smaller step moves the threshold down with it: values between the new and the old t become outliers
    with torch.no_grad():
        q.dense.scale.mul_(0.5)
        t_new = q.dense.real_range()[1]
        assert t_new == pytest.approx(t / 2, rel=1e-6)
        v = torch.tensor([0.75 * t])
        expected = q.dense(torch.tensor([t_new])) + q.sparse(v - t_new)
        assert torch.allclose(q(v), expected) and float(q.dense(torch.tensor([t_new]))) == pytest.approx(t_new)


# ---- phases ---------------------------------------------------------------------------------------------------------
def test_phases_enable_and_export_mode(tail):
    x, q0 = tail
    q = SparseQuantizer(4)
    assert torch.equal(q(x), x)  # not calibrated: identity
    with pytest.raises(RuntimeError):
        q.freeze()
    q.observe()
    assert q.observing and q(x) is x  # observing: the input itself
    q.freeze()
    assert not q.observing and bool(q.calibrated)
    assert q.spec == activation_spec(4)

    q.enabled = False
    assert not q.dense.enabled and not q.sparse.enabled
    assert torch.equal(q(x), x)
    q.enabled = True
    assert not torch.equal(q(x), x)
    # the sparse branch off alone: outliers pass in float beyond the dense top
    q.sparse.enabled = False
    lo, t = q.dense.real_range()
    out = x > t
    assert torch.allclose(q(x)[out], x[out], atol=1e-5)
    q.sparse.enabled = True

    q.export_mode = "qdq"
    assert q.dense.export_mode == q.sparse.export_mode == "qdq"
    names = {n for n, _ in iter_quantizers(torch.nn.Sequential(q))}
    assert names == {"0.dense", "0.sparse"}
    with pytest.raises(ValueError):
        SparseQuantizer(4, observer="kl")
