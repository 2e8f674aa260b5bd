"""AdaRound: learned up/down rounding of weights (Nagel et al. 2020), with a learnable step size.

For a weight w with calibrated step s0 (fixed when the rounding is set up) and a learnable step s:

    w_q = s * clamp(floor(w / s0) + h(V), qmin, qmax),   h(V) = clamp(sigmoid(V) * (ZETA - GAMMA) + GAMMA, 0, 1)

V starts where h(V) equals the fractional part of w / s0, so before training w_q is w (up to clipping and s = s0).
The regulariser lambda * sum(1 - |2h - 1|^beta) pushes every h to 0 or 1; beta is annealed from 20 (the regulariser
is nearly flat, h moves freely) to 2 (every h is pulled to an end) after a warm-up without it. At the end the
rounding is made hard (h >= 0.5 rounds up), which equals V >= 0.

>>> import torch
>>> r = AdaRound(torch.tensor([[0.26, -0.74]]), torch.tensor([0.5]), -8, 7)
>>> r(torch.tensor([0.5]))
tensor([[ 0.2600, -0.7400]], grad_fn=<MulBackward0>)
>>> r.hard_codes()
tensor([[ 1., -1.]])
"""

from __future__ import annotations

import math

import torch
from torch import nn

ZETA, GAMMA = 1.1, -0.1


def rectified_sigmoid(v: torch.Tensor) -> torch.Tensor:
    """h(V): a sigmoid stretched to (GAMMA, ZETA) and clipped to [0, 1], so exact 0 and 1 are reachable."""
    return torch.clamp(torch.sigmoid(v) * (ZETA - GAMMA) + GAMMA, 0.0, 1.0)


def init_v(frac: torch.Tensor) -> torch.Tensor:
    """V with h(V) = frac, for frac in [0, 1)."""
    p = ((frac - GAMMA) / (ZETA - GAMMA)).clamp(1e-6, 1 - 1e-6)
    return torch.log(p / (1 - p))


def round_regularizer(h: torch.Tensor, beta: float) -> torch.Tensor:
    """sum(1 - |2h - 1|^beta): 0 when every h is 0 or 1, largest at h = 0.5."""
    return (1 - (2 * h - 1).abs().pow(beta)).sum()


class BetaSchedule:
    """beta for step t of `total`: None (no regulariser) during the warm-up, then linear from `start` to `end`."""

    def __init__(self, total: int, warmup: float = 0.2, start: float = 20.0, end: float = 2.0) -> None:
        self.total, self.warmup_steps, self.start, self.end = total, int(math.ceil(warmup * total)), start, end

    def __call__(self, t: int) -> float | None:
        if t < self.warmup_steps:
            return None
        span = max(1, self.total - self.warmup_steps)
        frac = min(1.0, (t - self.warmup_steps) / span)
        return self.start + (self.end - self.start) * frac


class AdaRound(nn.Module):
    """The learnable rounding of one weight tensor, quantized per output channel (axis 0)."""

    def __init__(self, w: torch.Tensor, scale0: torch.Tensor, qmin: int, qmax: int) -> None:
        super().__init__()
        s0 = scale0.detach().reshape((-1,) + (1,) * (w.dim() - 1))
        x = w.detach() / s0
        self.register_buffer("base", torch.floor(x))
        self.v = nn.Parameter(init_v(x - torch.floor(x)))
        self.qmin, self.qmax = qmin, qmax

    def h(self) -> torch.Tensor:
        return rectified_sigmoid(self.v)

    def forward(self, scale: torch.Tensor) -> torch.Tensor:
        """Soft-rounded weight on the grid of `scale` (per output channel); differentiable in V and scale."""
        s = scale.reshape((-1,) + (1,) * (self.base.dim() - 1))
        return torch.clamp(self.base + self.h(), self.qmin, self.qmax) * s

    def regularizer(self, beta: float) -> torch.Tensor:
        return round_regularizer(self.h(), beta)

    def hard_codes(self) -> torch.Tensor:
        """Integer codes with the learned rounding made hard (h >= 0.5, i.e. V >= 0, rounds up)."""
        return torch.clamp(self.base + (self.v.detach() >= 0).float(), self.qmin, self.qmax)
