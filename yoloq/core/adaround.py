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
    return _h_and_interior(v)[1]


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


def _h_and_interior(v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """sigmoid(V), h(V), and where h is strictly inside (0, 1) (elsewhere h is clipped and passes no gradient)."""
    sig = torch.sigmoid(v)
    u = sig * (ZETA - GAMMA) + GAMMA
    return sig, u.clamp(0.0, 1.0), (u > 0) & (u < 1)


def _to_v(grad_h: torch.Tensor, sig: torch.Tensor, interior: torch.Tensor) -> torch.Tensor:
    """d/dV from d/dh: through the clip (strict interior), the stretch and the sigmoid."""
    return torch.ops.aten.sigmoid_backward(grad_h.masked_fill_(~interior, 0).mul_(ZETA - GAMMA), sig)


class _SoftWeight(torch.autograd.Function):
    """clamp(base + h(V), qmin, qmax) * s with its gradients in one function, given sigmoid(V), h and h's interior.

    As separate differentiable ops (sigmoid, stretch, two clamps, add, mul, and the regulariser's own h(V)) every op
    kept its own tensors the size of the weight, and on the deep units (about 2M weights against a few hundred crop
    cells) these elementwise passes, not the convolutions, took most of a step. Same values and gradients, bit for
    bit, with the clamps' gradient taken as 1 strictly inside their range and 0 on and beyond the bounds
    (test_fused_rounding_equals_the_op_by_op_one).
    """

    @staticmethod
    def forward(ctx, v, base, s, qmin: int, qmax: int, sig, h, interior):  # noqa: ARG004 (v: for its gradient)
        codes = base + h
        interior = interior & (codes > qmin) & (codes < qmax)
        codes.clamp_(qmin, qmax)
        ctx.save_for_backward(sig, interior, codes, s)
        return codes * s

    @staticmethod
    def backward(ctx, grad):
        sig, interior, codes, s = ctx.saved_tensors
        gv = _to_v(grad * s, sig, interior) if ctx.needs_input_grad[0] else None
        gs = (grad * codes).sum_to_size(s.shape) if ctx.needs_input_grad[2] else None
        return gv, None, gs, None, None, None, None, None


class _Regularizer(torch.autograd.Function):
    """round_regularizer(h(V), beta) with its gradient in one function (the same values and gradients, bit for bit).

    Its pow() with a fractional beta is the most expensive elementwise op of a step; autograd kept every
    intermediate and computed h(V) once more."""

    @staticmethod
    def forward(ctx, v, beta: float, sig, h, interior):  # noqa: ARG004
        t = 2 * h - 1
        a = t.abs()
        out = (1 - a.pow(beta)).sum()
        ctx.save_for_backward(sig, interior, t, a)
        ctx.beta = beta
        return out

    @staticmethod
    def backward(ctx, grad):
        sig, interior, t, a = ctx.saved_tensors
        # autograd's chain: -grad, pow's beta * a^(beta - 1), abs's sign, the 2 of 2h (both exact, so merged)
        gh = a.pow(ctx.beta - 1).mul_(ctx.beta).mul_(-2 * grad).mul_(t.sgn())
        return _to_v(gh, sig, interior), None, None, None, None


class AdaRound(nn.Module):
    """The learnable rounding of one weight tensor, quantized per output channel (axis 0)."""

    def __init__(self, w: torch.Tensor, scale0: torch.Tensor, qmin: int, qmax: int) -> None:
        super().__init__()
        s0 = scale0.detach().reshape((-1,) + (1,) * (w.dim() - 1))
        x = w.detach() / s0
        self.register_buffer("base", torch.floor(x))
        self.v = nn.Parameter(init_v(x - torch.floor(x)))
        self.qmin, self.qmax = qmin, qmax
        self._memo = None  # (V's identity and version, sigmoid(V), h, interior): a step's forward, for its regulariser

    def _parts(self, reuse: bool = False) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        key = (self.v.data_ptr(), self.v._version)
        if reuse and self._memo is not None and self._memo[0] == key:
            parts = self._memo[1:]
        else:
            with torch.no_grad():
                parts = _h_and_interior(self.v)
        self._memo = (key, *parts) if not reuse else None
        return parts

    def forward(self, scale: torch.Tensor) -> torch.Tensor:
        """Soft-rounded weight on the grid of `scale` (per output channel); differentiable in V and scale."""
        s = scale.reshape((-1,) + (1,) * (self.base.dim() - 1))
        return _SoftWeight.apply(self.v, self.base, s, self.qmin, self.qmax, *self._parts())

    def regularizer(self, beta: float) -> torch.Tensor:
        """Computed after the step's forward pass, from its h(V) while V is unchanged since (the optimizer's update
        bumps V's version)."""
        return _Regularizer.apply(self.v, beta, *self._parts(reuse=True))

    def hard_codes(self) -> torch.Tensor:
        """Integer codes with the learned rounding made hard (h >= 0.5, i.e. V >= 0, rounds up)."""
        return torch.clamp(self.base + (self.v.detach() >= 0).float(), self.qmin, self.qmax)
