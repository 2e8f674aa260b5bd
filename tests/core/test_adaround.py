import pytest
import torch

from yoloq.core.adaround import GAMMA, ZETA, AdaRound, BetaSchedule, init_v, rectified_sigmoid, round_regularizer


def test_rectified_sigmoid_reaches_both_ends_and_inverts_init():
    assert float(rectified_sigmoid(torch.tensor(-20.0))) == 0.0
    assert float(rectified_sigmoid(torch.tensor(20.0))) == 1.0
    frac = torch.tensor([0.0, 0.1, 0.5, 0.9, 0.999])
    assert torch.allclose(rectified_sigmoid(init_v(frac)), frac, atol=2e-6)
    assert (ZETA, GAMMA) == (1.1, -0.1)


def test_soft_weight_starts_at_the_float_weight_and_hard_codes_round_by_v():
    torch.manual_seed(0)
    w = torch.randn(4, 3, 3, 3)
    s = w.abs().amax(dim=(1, 2, 3)) / 7
    r = AdaRound(w, s, -8, 7)
    assert torch.allclose(r(s), w, atol=1e-5)  # inside the range: exactly w at initialisation
    with torch.no_grad():
        r.v.fill_(5.0)  # all round up
    base = torch.floor(w / s.view(-1, 1, 1, 1))
    assert torch.equal(r.hard_codes(), torch.clamp(base + 1, -8, 7))
    with torch.no_grad():
        r.v.fill_(-5.0)
    assert torch.equal(r.hard_codes(), torch.clamp(base, -8, 7))


def test_codes_are_clipped_and_gradients_reach_v_and_scale():
    w = torch.tensor([[[[100.0]], [[-100.0]], [[0.3]]]]).reshape(3, 1, 1, 1)
    s = torch.tensor([1.0, 1.0, 1.0], requires_grad=True)
    r = AdaRound(w, s.detach(), -8, 7)
    y = r(s)
    assert y.flatten()[:2].tolist() == [7.0, -8.0]
    y.sum().backward()
    assert r.v.grad is not None and r.v.grad[2].abs().item() > 0
    assert s.grad is not None and s.grad.abs().sum() > 0


def test_regularizer_is_zero_at_the_ends_and_largest_at_half():
    h = torch.tensor([0.0, 1.0])
    assert float(round_regularizer(h, 2.0)) == 0.0
    assert float(round_regularizer(torch.tensor([0.5]), 2.0)) == pytest.approx(1.0)
    # large beta: flat (close to 1) except near the ends; small beta: a parabola
    assert float(round_regularizer(torch.tensor([0.9]), 20.0)) == pytest.approx(1 - 0.8**20)
    assert float(round_regularizer(torch.tensor([0.9]), 2.0)) == pytest.approx(1 - 0.64)


def test_beta_schedule_warms_up_then_anneals_from_20_to_2():
    b = BetaSchedule(total=100, warmup=0.2)
    assert all(b(t) is None for t in range(20))
    assert b(20) == pytest.approx(20.0)
    assert b(99) == pytest.approx(2.0, abs=0.25)
    vals = [b(t) for t in range(20, 100)]
    assert all(x >= y for x, y in zip(vals, vals[1:]))


def _op_by_op(r: AdaRound, s: torch.Tensor, beta: float):
    """The soft weight and the regulariser as plain differentiable ops, with the clamps' gradient written out: 1
    strictly inside the range, 0 on and beyond the bounds (PyTorch's own clamp gradient at the bounds has changed)."""
    def clip(x, lo, hi):
        inside = (x > lo) & (x < hi)
        return torch.where(inside, x, x.detach().clamp(lo, hi))

    def h():  # once for each, as the unfused code had it (the two gradients then add up at V, not at h)
        return clip(torch.sigmoid(r.v) * (ZETA - GAMMA) + GAMMA, 0.0, 1.0)

    w = clip(r.base + h(), r.qmin, r.qmax) * s.reshape(-1, 1, 1, 1)
    return w, (1 - (2 * h() - 1).abs().pow(beta)).sum()


@pytest.mark.parametrize("beta", [20.0, 7.3, 2.0])
def test_fused_rounding_equals_the_op_by_op_one(beta):
    torch.manual_seed(0)
    w = torch.randn(16, 8, 3, 3) * 0.1
    s0 = w.abs().amax(dim=(1, 2, 3)) / 12  # the largest weights beyond the range
    r = AdaRound(w, s0, -8, 7)
    with torch.no_grad():
        r.v.add_(torch.randn_like(r.v) * 3)  # h clipped at 0 and 1 in places, codes on both bounds
    g = torch.randn_like(w)
    got = []
    for fused in (False, True):
        r.v.grad = None
        s = (s0 * 1.1).requires_grad_(True)
        wq, reg = (r(s), r.regularizer(beta)) if fused else _op_by_op(r, s, beta)
        ((wq * g).sum() + 0.5 * reg).backward()
        got.append((wq.detach(), reg.detach(), r.v.grad.clone(), s.grad.clone()))
    codes = got[1][0] / (s0 * 1.1).reshape(-1, 1, 1, 1)
    assert (codes <= -7.999).any() and (codes >= 6.999).any() and (got[1][2] == 0).any()  # the cases that matter
    for a, b in zip(*got):
        assert torch.equal(a, b)  # bit for bit: the fold results measured before the fusion stand


def test_regularizer_after_an_update_uses_the_new_v():
    torch.manual_seed(1)
    w = torch.randn(4, 2, 3, 3)
    r = AdaRound(w, w.abs().amax(dim=(1, 2, 3)) / 7, -8, 7)
    s = w.abs().amax(dim=(1, 2, 3)) / 7
    r(s)  # the step's forward pass leaves sigmoid(V) for the regulariser
    with torch.no_grad():
        r.v.add_(0.7)  # the optimizer's update, between this forward pass and the next step's regulariser
    assert float(r.regularizer(4.0)) == float(round_regularizer(rectified_sigmoid(r.v), 4.0))
