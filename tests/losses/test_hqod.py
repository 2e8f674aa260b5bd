import math

import pytest
import torch

from yoloq.losses.hqod import EPS, HQODLossConfig, hqod_loss, plain_iou

E1 = math.exp(-1.0)


def _tcorr(p, u):
    c = (p + EPS) ** u * (u + EPS) ** p - EPS
    return (1 + abs(p - u)) * (math.exp(-c) - E1)


def _hiou(u, gamma=0.8):
    return (1 + u) ** gamma * (1 - u)


def _loss(p, u, **kw):
    t = lambda v: torch.tensor(v, dtype=torch.float32, requires_grad=True)  # noqa: E731
    p, u = t(p), t(u)
    loss, parts = hqod_loss(p, u, HQODLossConfig(**{k: v for k, v in kw.items() if k != "gain"}), kw.get("gain", 1.0))
    return loss, parts, p, u


def test_hand_computed_values():
    # p = 0.9, u = 0.6: c = 0.9^0.6 * 0.6^0.9, alpha = 1.3
    c = 0.9**0.6 * 0.6**0.9
    tcorr = 1.3 * (math.exp(-c) - E1)
    hiou = 1.6**0.8 * 0.4
    loss, parts, _, _ = _loss([0.9], [0.6])
    assert parts["tcorr"] == pytest.approx(tcorr, rel=1e-5)
    assert parts["hiou"] == pytest.approx(1.5 * hiou, rel=1e-5)
    assert float(loss) == pytest.approx(tcorr + 1.5 * hiou, rel=1e-5)
    # p = u: alpha = 1; at 0.5, c = 0.5^0.5 * 0.5^0.5 = 0.5
    loss, parts, _, _ = _loss([0.5], [0.5])
    assert parts["tcorr"] == pytest.approx(math.exp(-0.5) - E1, rel=1e-5)
    assert parts["hiou"] == pytest.approx(1.5 * 1.5**0.8 * 0.5, rel=1e-5)
    # p = u = 1: c = 1, L_TCorr = 0 and L_HIoU = 0; p = u = 0: c = 1 too (x^0 = 1), L_HIoU = 1
    loss, parts, _, _ = _loss([1.0], [1.0])
    assert abs(parts["tcorr"]) < 1e-6 and abs(float(loss)) < 1e-6
    _, parts, _, _ = _loss([0.0], [0.0])
    assert abs(parts["tcorr"]) < 1e-6 and parts["hiou"] == pytest.approx(1.5)


def test_mean_over_positives_and_gain():
    ps, us = [0.9, 0.2, 0.7], [0.6, 0.8, 0.7]
    mean = sum(_tcorr(p, u) + 1.5 * _hiou(u) for p, u in zip(ps, us)) / 3
    loss, parts, _, _ = _loss(ps, us, gain=7.5 * 16)
    assert float(loss) == pytest.approx(7.5 * 16 * mean, rel=1e-5)
    assert parts["tcorr"] + parts["hiou"] == pytest.approx(float(loss), rel=1e-6)
    # any shape, flattened
    loss2, _, _, _ = _loss([[0.9, 0.2, 0.7]], [[0.6, 0.8, 0.7]], gain=7.5 * 16)
    assert float(loss2) == pytest.approx(float(loss))


def test_gamma_and_sigma_are_used():
    loss, parts, _, _ = _loss([0.5], [0.3], gamma=2.0, sigma=0.5)
    assert parts["hiou"] == pytest.approx(0.5 * 1.3**2 * 0.7, rel=1e-5)


def _analytic_grads(p, u, gamma=0.8, sigma=1.5):
    """d/dp and d/du of L_TCorr + sigma * L_HIoU with alpha held constant (float64)."""
    a, b = (p + EPS) ** u, (u + EPS) ** p
    c = a * b - EPS
    dc_dp = u * (p + EPS) ** (u - 1) * b + a * b * math.log(u + EPS)
    dc_du = a * math.log(p + EPS) * b + a * p * (u + EPS) ** (p - 1)
    alpha = 1 + abs(p - u)
    dh_du = gamma * (1 + u) ** (gamma - 1) * (1 - u) - (1 + u) ** gamma
    return -alpha * math.exp(-c) * dc_dp, -alpha * math.exp(-c) * dc_du + sigma * dh_du


@pytest.mark.parametrize("p,u", [(0.9, 0.6), (0.2, 0.8), (0.5, 0.5), (0.7, 0.05)])
def test_gradient_treats_alpha_as_constant(p, u):
    loss, _, tp, tu = _loss([p], [u])
    loss.backward()
    gp, gu = _analytic_grads(p, u)
    assert float(tp.grad) == pytest.approx(gp, rel=1e-3, abs=1e-6)
    assert float(tu.grad) == pytest.approx(gu, rel=1e-3, abs=1e-6)
    if p != u:  # a version with alpha not detached has a different gradient: d|p - u|/dp = sign(p - u)
        c = p**u * u**p
        with_alpha = gp + math.copysign(1.0, p - u) * (math.exp(-c) - E1)
        assert abs(with_alpha - gp) > 1e-3
        assert float(tp.grad) != pytest.approx(with_alpha, rel=1e-3)


@pytest.mark.parametrize("p,u", [(0.5, 0.0), (1e-6, 0.3), (0.0, 0.0), (1e-6, 0.0), (0.999, 0.0), (0.3, 1.0)])
def test_gradients_reach_both_inputs_without_nan(p, u):
    loss, _, tp, tu = _loss([p], [u])
    loss.backward()
    for g in (tp.grad, tu.grad):
        assert torch.isfinite(g).all() and (g != 0).all(), (p, u, tp.grad, tu.grad)
    assert torch.isfinite(loss)


def test_out_of_range_inputs_give_no_nan():
    loss, _, tp, tu = _loss([-1e-7, 1.0000001], [-1e-6, 1.00001])
    loss.backward()
    assert torch.isfinite(loss) and torch.isfinite(tp.grad).all() and torch.isfinite(tu.grad).all()


def test_half_precision_inputs_are_computed_in_float32():
    p = torch.tensor([0.0, 0.5], dtype=torch.float16, requires_grad=True)
    u = torch.tensor([0.0, 0.4], dtype=torch.float16, requires_grad=True)
    loss, _ = hqod_loss(p, u, HQODLossConfig())
    loss.backward()
    assert loss.dtype == torch.float32 and torch.isfinite(p.grad).all() and torch.isfinite(u.grad).all()


def test_switches():
    both, parts, _, _ = _loss([0.9, 0.3], [0.6, 0.5])
    only_t, pt, tp, tu = _loss([0.9, 0.3], [0.6, 0.5], hiou=False)
    only_h, ph, _, _ = _loss([0.9, 0.3], [0.6, 0.5], tcorr=False)
    assert pt["hiou"] == 0.0 and ph["tcorr"] == 0.0
    assert float(only_t) == pytest.approx(parts["tcorr"]) and float(only_h) == pytest.approx(parts["hiou"])
    assert float(both) == pytest.approx(float(only_t) + float(only_h))
    only_h.backward()
    none, pn, tp, tu = _loss([0.9], [0.6], tcorr=False, hiou=False)
    assert float(none) == 0.0 and pn == {"tcorr": 0.0, "hiou": 0.0}
    none.backward()
    assert tp.grad is not None and float(tp.grad) == 0.0


def test_hiou_alone_does_not_train_the_score():
    loss, _, tp, tu = _loss([0.9], [0.6], tcorr=False)
    loss.backward()
    assert float(tp.grad) == 0.0 and float(tu.grad) != 0.0


def test_no_positives_is_a_connected_zero():
    p = torch.zeros(0, requires_grad=True)
    u = torch.zeros(0, requires_grad=True)
    loss, parts = hqod_loss(p, u, HQODLossConfig(), gain=120.0)
    assert float(loss) == 0.0 and loss.grad_fn is not None and parts == {"tcorr": 0.0, "hiou": 0.0}
    loss.backward()
    assert p.grad is not None and u.grad is not None


def test_bad_inputs():
    with pytest.raises(ValueError, match="same shape"):
        hqod_loss(torch.zeros(2), torch.zeros(3), HQODLossConfig())
    with pytest.raises(ValueError, match="sigma"):
        HQODLossConfig(sigma=-1.0)


def test_plain_iou():
    b1 = torch.tensor([[0.0, 0, 10, 10], [0, 0, 10, 10], [0, 0, 10, 10]], requires_grad=True)
    b2 = torch.tensor([[5.0, 0, 15, 10], [20, 20, 30, 30], [0, 0, 10, 10]])
    iou = plain_iou(b1, b2)
    assert iou.shape == (3,)
    assert iou.tolist() == pytest.approx([50 / 150, 0.0, 1.0], abs=1e-6)
    assert (iou >= 0).all() and (iou <= 1).all()
    # a box far off still has IoU 0, never negative (CIoU would be)
    loss, _ = hqod_loss(torch.full((3,), 0.8, requires_grad=True), iou, HQODLossConfig())
    loss.backward()
    assert torch.isfinite(b1.grad).all() and b1.grad[0].abs().sum() > 0
