"""HQOD losses: make a detector's class score and box quality agree (harmonious QAT for object detection).

Quantization tends to separate a positive sample's class score from the quality of its box; HQOD adds two terms on
the assigner's positive samples to pull them together. For each positive sample

- ``p``: the sigmoid score at its assigned ground-truth class (not detached: the loss trains the class branch),
- ``u``: the plain IoU of its predicted box with the target box, in [0, 1] (not detached: it trains the box
  branch). Plain IoU, not CIoU: CIoU can go negative, and a negative base or exponent below makes the powers NaN.

with ``eps = 2.2e-16``:

    c       = (p + eps)^u * (u + eps)^p - eps                  task correlation of score and IoU
    alpha   = 1 + |p - u|                                      detached: a weight, no gradient flows through it
    L_TCorr = alpha * (exp(-c) - exp(-1))                      >= 0; 0 when p = u = 1
    L_HIoU  = (1 + u)^gamma * (1 - u)                          gamma = 0.8; 0 at u = 1, 1 at u = 0
    L_HQOD  = gain * mean over positives of (L_TCorr + sigma * L_HIoU)     sigma = 1.5

``gain`` puts the sum on the box loss's scale: the caller passes Ultralytics' box gain times the batch size (as
Ultralytics scales its own loss items). With no positives the loss is a zero that is still connected to ``p`` and
``u``, so ``backward()`` works in every step.

Properties worth knowing: ``c`` is 1 (so ``L_TCorr`` is 0) at p = u = 1 and also at p = u = 0, since x^0 = 1; at
p = u = 0.5, ``c`` = 0.5 and ``L_TCorr`` > 0, so the term pushes both up, not only together. The gradient of
``(u + eps)^p`` with respect to u at u = 0 is ``p * eps^(p - 1)`` (about 3e7 at p = 0.5, about 1e13 at p = 0.1):
finite, but large; it is the definition's, not a bug. Inputs are computed in float32 (under AMP a float16
``p + eps`` would round eps away and give 0^u, whose gradient is NaN), and values are clamped to [0, 1] with the
gradient passed straight through, so an IoU of exactly 0 still gets its gradient and a stray value just outside
[0, 1] cannot make a power NaN. ``p`` must be a probability (sigmoid), not a logit.

>>> import torch
>>> p, u = torch.tensor([0.9]), torch.tensor([0.6])
>>> loss, parts = hqod_loss(p, u, HQODLossConfig())
>>> round(float(loss), 4), round(parts["tcorr"], 4), round(parts["hiou"], 4)
(1.1143, 0.2404, 0.8739)
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

EPS = 2.2e-16


@dataclass(frozen=True)
class HQODLossConfig:
    """Which HQOD terms to use, and their constants (the paper's defaults)."""

    tcorr: bool = True  # task-correlation term: score and IoU of a positive agree
    hiou: bool = True  # harmonious IoU term: extra push on the boxes with low IoU
    gamma: float = 0.8  # L_HIoU's exponent
    sigma: float = 1.5  # L_HIoU's weight against L_TCorr

    def __post_init__(self) -> None:
        for name in ("gamma", "sigma"):
            v = getattr(self, name)
            if not (math.isfinite(v) and v >= 0):
                raise ValueError(f"HQODLossConfig.{name} must be a finite number >= 0, got {v}")


def plain_iou(box1: torch.Tensor, box2: torch.Tensor) -> torch.Tensor:
    """IoU of paired xyxy boxes (..., 4) -> (...,), clamped to [0, 1]; differentiable (Ultralytics' bbox_iou)."""
    from yoloq.model.yolo import box_iou_pairs

    return box_iou_pairs(box1, box2).clamp(0.0, 1.0)


def _clamp01(x: torch.Tensor) -> torch.Tensor:
    """x clamped to [0, 1] in value, with its gradient passed straight through (torch.clamp zeroes it at 0 and 1)."""
    x = x.float()
    return x + (x.detach().clamp(0.0, 1.0) - x.detach())


def tcorr_loss(p: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    """L_TCorr per sample: alpha * (exp(-c) - exp(-1)), c = (p+eps)^u (u+eps)^p - eps, alpha = 1 + |p - u| detached."""
    c = (p + EPS).pow(u) * (u + EPS).pow(p) - EPS
    alpha = 1.0 + (p - u).abs().detach()
    return alpha * (torch.exp(-c) - math.exp(-1.0))


def hiou_loss(u: torch.Tensor, gamma: float = 0.8) -> torch.Tensor:
    """L_HIoU per sample: (1 + u)^gamma (1 - u)."""
    return (1.0 + u).pow(gamma) * (1.0 - u)


def hqod_loss(p: torch.Tensor, u: torch.Tensor, cfg: HQODLossConfig, gain: float = 1.0) -> tuple[torch.Tensor, dict]:
    """L_HQOD over positive samples: scores ``p`` and IoUs ``u`` of the same shape (any, flattened).

    Returns the loss (a float32 scalar) and its parts as floats for a progress bar, ``{"tcorr", "hiou"}``: each
    the term's contribution to the loss, gain and sigma included, so that they sum to it (0.0 for a term switched
    off).
    """
    if p.shape != u.shape:
        raise ValueError(f"p and u must have the same shape, got {tuple(p.shape)} and {tuple(u.shape)}")
    p, u = _clamp01(p.flatten()), _clamp01(u.flatten())
    zero = (p.sum() + u.sum()) * 0.0  # keeps the graph: backward() works with no positives or no term
    if p.numel() == 0:
        return zero, {"tcorr": 0.0, "hiou": 0.0}
    tc = tcorr_loss(p, u).mean() * gain if cfg.tcorr else zero
    hi = hiou_loss(u, cfg.gamma).mean() * (cfg.sigma * gain) if cfg.hiou else zero
    return tc + hi, {"tcorr": float(tc.detach()), "hiou": float(hi.detach())}
