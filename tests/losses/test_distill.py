"""Distillation from the float head: zero when the outputs agree, positive and trainable when they do not."""

from __future__ import annotations

import pytest
import torch

from yoloq.losses.distill import distill_loss


def _outputs(seed: int, reg_max: int, b: int = 2, nc: int = 3, a: int = 50) -> dict:
    g = torch.Generator().manual_seed(seed)
    return {"boxes": torch.randn(b, 4 * reg_max, a, generator=g), "scores": torch.randn(b, nc, a, generator=g) * 3}


@pytest.mark.parametrize("reg_max", [16, 1])
def test_zero_when_equal_positive_when_not_and_gradient_reaches_the_student_only(reg_max):
    fp = _outputs(0, reg_max)
    same, parts = distill_loss({k: v.clone() for k, v in fp.items()}, fp, reg_max)
    assert float(same) == pytest.approx(0.0, abs=1e-5) and parts["kd_box"] == pytest.approx(0.0, abs=1e-5)

    q = {k: v.clone().requires_grad_(True) for k, v in _outputs(1, reg_max).items()}
    teacher = {k: v.clone().requires_grad_(True) for k, v in fp.items()}
    loss, parts = distill_loss(q, teacher, reg_max)
    assert float(loss) > 0.1 and parts["kd_cls"] > 0 and parts["kd_box"] > 0
    loss.backward()
    assert q["scores"].grad.abs().sum() > 0 and q["boxes"].grad.abs().sum() > 0
    assert teacher["scores"].grad is None and teacher["boxes"].grad is None


def test_confident_anchors_weigh_more():
    fp = _outputs(0, 16, b=1, a=2)
    fp["scores"][:] = torch.tensor([[8.0, -8.0]])  # anchor 0 confident, anchor 1 background
    for a, want_larger in ((0, True), (1, False)):
        q = {k: v.clone() for k, v in fp.items()}
        q["boxes"][0, 0, a] += 4.0  # one bin of one side: a different distribution (a constant shift is not)
        _, parts = distill_loss(q, fp, 16)
        assert (parts["kd_box"] > 0.1) is want_larger
