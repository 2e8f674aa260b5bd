"""Error-compensated weight rounding (GPTQ, Frantar et al. 2023) for convolutions.

Objective per layer: min_Q ||W X - Q X||^2 over Q on the quantization grid (scales fixed), X the layer's im2col
inputs. GPTQ rounds one input column at a time and moves its rounding error onto the columns not yet rounded,
weighted by the inverse Hessian H^-1, H = X X^T / n (the constant factor of the paper's 2 X X^T cancels).
No gradients, one Cholesky per layer.

>>> import torch
>>> h = HessianAccumulator(torch.nn.Conv2d(4, 2, 1))
>>> h.add(torch.randn(1, 4, 8, 8)); h.hessian().shape
torch.Size([4, 4])
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from yoloq.core.functional import fake_quantize


class HessianAccumulator:
    """Accumulates H = E[x x^T] over im2col patches of a conv's input, on a random subset of positions."""

    def __init__(self, conv: torch.nn.Conv2d, max_positions: int = 512, seed: int = 0) -> None:
        # 512 patches per image: 64 images give 32k samples, 7x the widest YOLOv8s layer's d = 4608 (3x3x512, whose
        # 20x20 map has fewer positions anyway), at a quarter of the cost of 2048; float32 sums are ample next to
        # the 1% damping
        self.conv, self.max_positions = conv, max_positions
        d = conv.in_channels // conv.groups * conv.kernel_size[0] * conv.kernel_size[1]
        self.h = torch.zeros(d, d)
        self.n = 0
        self.gen = torch.Generator().manual_seed(seed)

    def add(self, x: torch.Tensor) -> None:
        c = self.conv
        cols = F.unfold(x.detach().float(), c.kernel_size, c.dilation, c.padding, c.stride)  # [N, d, L]
        cols = cols.transpose(1, 2).reshape(-1, cols.shape[1])  # [N*L, d]
        if cols.shape[0] > self.max_positions:
            idx = torch.randperm(cols.shape[0], generator=self.gen)[: self.max_positions]
            cols = cols[idx]
        self.h += cols.T @ cols
        self.n += cols.shape[0]

    def hessian(self) -> torch.Tensor:
        return self.h / max(self.n, 1)


def gptq_round(w: torch.Tensor, h: torch.Tensor, scale: torch.Tensor, qmin: int, qmax: int,
               damp: float = 0.01, block: int = 128) -> torch.Tensor:
    """Weights (C_out, d) rounded onto the per-row grid `scale` (zero point 0), compensating each column's error.

    Returns dequantized values on the grid, same shape as w.
    """
    s = scale[:, None]
    return fake_quantize(gptq_latent(w, h, scale, qmin, qmax, damp, block), s, torch.zeros_like(s), qmin, qmax)


def gptq_latent(w: torch.Tensor, h: torch.Tensor, scale: torch.Tensor, qmin: int, qmax: int,
                damp: float = 0.01, block: int = 128) -> torch.Tensor:
    """GPTQ's compensated weights: each column as it stood when GPTQ rounded it, with the errors of the columns
    before it moved in. Rounding them to nearest gives GPTQ's result; left unrounded, they start a learned rounding
    (AdaRound) at GPTQ's choice with each weight's distance to its neighbours on the grid intact."""
    w = w.clone().float()
    h = h.clone().float()
    d = w.shape[1]
    dead = torch.diag(h) == 0
    h[dead, dead] = 1.0
    w[:, dead] = 0.0
    h += torch.eye(d) * damp * torch.diag(h).mean()
    try:
        hinv = torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(h)), upper=True)
    except RuntimeError:  # numerically singular even after damping: the weights as they are (rounded to nearest)
        return w
    s, z = scale[:, None], torch.zeros_like(scale)[:, None]
    latent = torch.zeros_like(w)
    for i1 in range(0, d, block):
        i2 = min(i1 + block, d)
        w1, hinv1 = w[:, i1:i2].clone(), hinv[i1:i2, i1:i2]
        err1 = torch.zeros_like(w1)
        for i in range(i2 - i1):
            col = w1[:, i : i + 1]
            qc = fake_quantize(col, s, z, qmin, qmax)
            latent[:, i1 + i : i1 + i + 1] = col
            e = (col - qc) / hinv1[i, i]
            w1[:, i:] -= e @ hinv1[i : i + 1, i:]
            err1[:, i : i + 1] = e
        w[:, i2:] -= err1 @ hinv[i1:i2, i2:]
    return latent
