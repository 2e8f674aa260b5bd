"""Stateless quantization math. All functions are differentiable with straight-through rounding.

>>> import torch
>>> scale, zp = choose_qparams(torch.tensor([-1.0]), torch.tensor([3.0]), 0, 255, symmetric=False)
>>> fake_quantize(torch.tensor([0.5]), scale, zp, 0, 255)
tensor([0.5020])
"""

from __future__ import annotations

import math

import torch

EPS = 1e-8


def round_ste(x: torch.Tensor) -> torch.Tensor:
    """round() whose gradient is the identity (straight-through estimator)."""
    return x + (torch.round(x) - x).detach()


def ceil_ste(x: torch.Tensor) -> torch.Tensor:
    """ceil(x) forward, identity backward (TQT's power-of-two steps)."""
    return x + (torch.ceil(x) - x).detach()


def choose_qparams(
    lo: torch.Tensor, hi: torch.Tensor, qmin: int, qmax: int, symmetric: bool
) -> tuple[torch.Tensor, torch.Tensor]:
    """Scale and zero point that map [lo, hi] onto [qmin, qmax].

    The range is widened to contain 0 so that zero (conv padding, ReLU/SiLU floor) is exactly representable.
    Symmetric ranges use zero point 0 and scale = max(|lo|, |hi|) / qmax.
    """
    lo = torch.minimum(lo.float(), torch.zeros_like(lo, dtype=torch.float32))
    hi = torch.maximum(hi.float(), torch.zeros_like(hi, dtype=torch.float32))
    if symmetric:
        scale = torch.maximum(-lo, hi) / qmax
        scale = scale.clamp_min(EPS)
        return scale, torch.zeros_like(scale)
    scale = ((hi - lo) / (qmax - qmin)).clamp_min(EPS)
    zero_point = (qmin - torch.round(lo / scale)).clamp(qmin, qmax)
    return scale, zero_point


def quantize(x: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor, qmin: int, qmax: int) -> torch.Tensor:
    """Integer codes (as float) of x: clamp(round(x / s) + z, qmin, qmax)."""
    return torch.clamp(torch.round(x / scale) + zero_point, qmin, qmax)


def dequantize(q: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor) -> torch.Tensor:
    return (q - zero_point) * scale


def fake_quantize(x: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor, qmin: int, qmax: int,
                  dither: torch.Tensor | None = None) -> torch.Tensor:
    """Quantize-dequantize with a straight-through gradient for x inside the range and zero outside it.

    A value whose code lands on qmin or qmax counts as clipped: no gradient to x, and the step's (LSQ) gradient is
    the code, as for a value beyond it. This is written out rather than left to torch.clamp, whose subgradient at its
    bounds changed between PyTorch releases (1 before 2026's #191142, 0 after). GPTQ leaves many weights exactly on
    the end codes, so the two conventions train differently: the demo W4A4 QAT default run ends at 0.51 fidelity with
    the convention here and at 0.15 with the old one (on an H100 with torch 2.11, and emulated on the CPU).
    """
    return lsq_fake_quantize(x, scale, zero_point, qmin, qmax, 1.0, dither)


def lsq_fake_quantize(
    x: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor, qmin: int, qmax: int, grad_scale: float,
    dither: torch.Tensor | None = None,
) -> torch.Tensor:
    """LSQ (Esser et al. 2020): fake_quantize whose step size is learnable, its gradient scaled by 1/sqrt(N * Qp).

    `dither` (in steps, broadcast to x): subtractive dither. The rounding happens at x / s + dither and the dither is
    taken off again inside the range, so the error there is (round(u) - u) · s with u = x / s + dither: with
    dither ~ U(-1/2, 1/2) a uniform error independent of x, as large on average as the rounding's own, but not the
    same for a given x from one call to the next. Which values are clipped (to the bounds) does not change.
    """
    if dither is not None:
        return _FakeQuantize.apply(x, scale, zero_point, qmin, qmax, grad_scale, dither)
    needs_grad = torch.is_grad_enabled() and (x.requires_grad or (torch.is_tensor(scale) and scale.requires_grad))
    if torch.onnx.is_in_onnx_export():
        return dequantize(quantize(x, scale, zero_point, qmin, qmax), scale, zero_point)
    if not needs_grad:
        return _fake_quantize_in_place(x, scale, zero_point, qmin, qmax)
    return _FakeQuantize.apply(x, scale, zero_point, qmin, qmax, grad_scale)


def _fake_quantize_in_place(x: torch.Tensor, scale, zero_point, qmin: int, qmax: int) -> torch.Tensor:
    """dequantize(quantize(x)) with the same ops in the same order, so bit-identical, but on one buffer: calibration's
    range searches run it thousands of times on large tensors, and a new tensor per op made it about twice as slow."""
    if torch.is_tensor(zero_point) and zero_point.dim() > 0 and zero_point.shape != getattr(scale, "shape", None):
        # the zero point might broadcast wider than x / scale, which an in-place op cannot grow into
        return dequantize(quantize(x, scale, zero_point, qmin, qmax), scale, zero_point)
    q = x / scale
    return q.round_().add_(zero_point).clamp_(qmin, qmax).sub_(zero_point).mul_(scale)


class _FakeQuantize(torch.autograd.Function):
    """fake_quantize's gradients in one function: written as separate differentiable ops (round_ste, where, ...) each
    op kept its own tensors for the backward pass. Same values and gradients, 1.8-3.5x faster per call; a TASKQ
    reconstruction step, where convolutions take most of the time, about 15% faster.

    d out / d x = 1 where the code is strictly inside (qmin, qmax), else 0;
    d out / d scale = (code - z) - x / scale inside (round() passes straight through), code - z where clipped.
    With a dither d, inside (decided without it) the code is round(x / scale + d) + z and the output
    (code - z - d) · scale; the gradients keep their form, with code - z - d for code - z there.
    """

    @staticmethod
    def forward(ctx, x, scale, zero_point, qmin, qmax, grad_scale, dither=None):
        xs = x / scale
        code = torch.round(xs) + zero_point
        inside = (code > qmin) & (code < qmax)
        if dither is not None:
            # inside and clipped as without it: the dither moves no value onto a bound (the code stays in range)
            dither = dither * inside
            code = torch.round(xs + dither) + zero_point
        code.clamp_(qmin, qmax).sub_(zero_point)
        if dither is not None:
            code.sub_(dither)
        out = code * scale
        ctx.scale_grad = ctx.needs_input_grad[1]
        ctx.save_for_backward(inside, code.sub_(xs * inside) if ctx.scale_grad else None)
        ctx.grad_scale, ctx.x_shape = grad_scale, x.shape
        ctx.scale_shape, ctx.scale_dtype = (scale.shape, scale.dtype) if ctx.scale_grad else (None, None)
        return out

    @staticmethod
    def backward(ctx, grad):
        inside, d_scale = ctx.saved_tensors
        gx = (grad * inside).sum_to_size(ctx.x_shape) if ctx.needs_input_grad[0] else None
        gs = None
        if ctx.scale_grad:
            gs = ((grad * d_scale).sum_to_size(ctx.scale_shape) * ctx.grad_scale).to(ctx.scale_dtype)
        return gx, gs, None, None, None, None, None


def scale_grad(t: torch.Tensor, factor: float) -> torch.Tensor:
    """t in the forward pass; its gradient multiplied by `factor` in the backward pass."""
    return t * factor + (t - t * factor).detach()


def broadcast_shape(x: torch.Tensor, axis: int) -> list[int]:
    """Shape that broadcasts a per-channel vector along `axis` of x."""
    shape = [1] * x.dim()
    shape[axis] = -1
    return shape


def silu_inverse(y: float, iters: int = 60) -> float:
    """The a >= 0 with a * sigmoid(a) = y, for y >= 0 (SiLU is increasing there), by bisection."""
    lo, hi = 0.0, max(1.0, y + 10.0)
    for _ in range(iters):
        mid = (lo + hi) / 2
        if mid / (1 + math.exp(-mid)) < y:
            lo = mid
        else:
            hi = mid
    return lo
