"""Range observers: they watch tensors during calibration and propose a clipping range [lo, hi].

Each observer needs one statistic (running min/max, or a histogram) and turns it into a range:
- ``minmax``: the full observed range.
- ``percentile``: the range holding all but ``tail`` of the mass on each side (from a histogram).
- ``mse``: the range whose quantization minimises the expected squared error over the histogram
  (for weights: per channel, each weight's error weighted by its input channel's E[x^2] when given).
- ``unilateral``: for SiLU outputs. The lower bound is pinned at the SiLU minimum ``SILU_MIN`` (about -0.2785),
  the least value a SiLU can emit, so it needs no search; only the upper bound is searched by MSE (1-D). A tensor
  whose observed minimum lies above the pin keeps its observed minimum (no codes spent on values it never takes).
  ``choose_qparams`` then widens the range to hold 0 and rounds the zero point to an integer, so the realised lower
  bound is -zp * s, within half a step of -0.2785. A pre-activation or any tensor reaching below the pin is clipped
  there: the observer is meant for SiLU outputs only. Weights ignore it (weight MSE search, as for percentile).
- ``silu-mse`` (internal: what ``mse`` means for a pre-SiLU accumulator): the range minimising the squared error
  *after* the SiLU, E[(silu(Q(x)) - silu(x))^2]. Below about -4 the SiLU is nearly flat, so clipping the long
  negative tail costs almost nothing there while the plain MSE search spends codes on it; on the demo YOLOv8s the
  8-bit accumulators alone (everything else float) cost 0.05 fidelity with the plain search.

>>> import torch
>>> obs = make_observer("minmax")
>>> obs.update(torch.tensor([-1.0, 2.0]))
>>> obs.compute(QSpec(bits=8))
(tensor([-1.]), tensor([2.]))
"""

from __future__ import annotations

import math

import torch

from yoloq.core.functional import choose_qparams, fake_quantize
from yoloq.core.qspec import QSpec

OBSERVERS = ("minmax", "percentile", "mse", "unilateral")
# observers the placement picks itself (not a recipe's choice)
INTERNAL_OBSERVERS = ("silu-mse",)


def _silu_argmin() -> float:
    """Where x * sigmoid(x) is smallest: the root of its derivative's factor 1 + x * (1 - sigmoid(x)), by bisection
    (positive at 0, negative at -5, decreasing in between)."""
    lo, hi = -5.0, 0.0
    for _ in range(80):
        mid = (lo + hi) / 2
        if 1 + mid * (1 - 1 / (1 + math.exp(-mid))) > 0:
            hi = mid
        else:
            lo = mid
    return (lo + hi) / 2


SILU_ARGMIN = _silu_argmin()  # about -1.27846
SILU_MIN = SILU_ARGMIN / (1 + math.exp(-SILU_ARGMIN))  # about -0.27846: no SiLU output is below it


def histogram_sq_error(
    centers: torch.Tensor, counts: torch.Tensor, lo: torch.Tensor, hi: torch.Tensor, spec: QSpec, after=None
) -> torch.Tensor:
    """sum_bins n * (f(Q(c)) - f(c))^2 for each candidate range (lo[i], hi[i]): N times the expected squared error of
    quantizing the histogram's values (each taken at its bin center) with that range, seen through `after` (f, the
    identity by default)."""
    scale, zp = choose_qparams(lo, hi, spec.qmin, spec.qmax, spec.symmetric)
    target = centers if after is None else after(centers)
    errs = []
    for chunk in range(0, scale.numel(), 256):  # candidates x bins in bounded memory
        s, z = scale[chunk : chunk + 256, None], zp[chunk : chunk + 256, None]
        q = fake_quantize(centers[None], s, z, spec.qmin, spec.qmax)
        if after is not None:
            q = after(q)
        errs.append(q.sub_(target[None]).pow_(2).mul_(counts[None]).sum(1))  # ((q - t)^2 * n), on q's buffer
    return torch.cat(errs)


def _channel_view(x: torch.Tensor, axis: int) -> torch.Tensor:
    return x.transpose(0, axis).reshape(x.shape[axis], -1)


class MinMaxObserver:
    def __init__(self, per_channel: bool = False, axis: int = 0) -> None:
        self.per_channel, self.axis = per_channel, axis
        self.lo: torch.Tensor | None = None
        self.hi: torch.Tensor | None = None

    def update(self, x: torch.Tensor) -> None:
        x = x.detach().float()
        if self.per_channel:
            v = _channel_view(x, self.axis)
            lo, hi = v.amin(1), v.amax(1)
        else:
            lo, hi = x.min().reshape(1), x.max().reshape(1)
        self.lo = lo if self.lo is None else torch.minimum(self.lo, lo)
        self.hi = hi if self.hi is None else torch.maximum(self.hi, hi)

    def compute(self, spec: QSpec) -> tuple[torch.Tensor, torch.Tensor]:
        if self.lo is None:
            raise RuntimeError("observer saw no data")
        return self.lo, self.hi


class HistogramObserver(MinMaxObserver):
    """Per-tensor histogram over a range that widens as data arrives (old counts are re-binned)."""

    def __init__(self, mode: str, bins: int = 2048, tail: float = 1e-4) -> None:
        super().__init__()
        self.mode, self.bins, self.tail = mode, bins, tail
        self.hist: torch.Tensor | None = None
        self.edges: tuple[float, float] | None = None

    def update(self, x: torch.Tensor) -> None:
        x = x.detach().float()
        super().update(x)
        lo, hi = float(self.lo), float(self.hi)
        if hi - lo < 1e-12:
            hi = lo + 1e-6
        if self.edges is None:
            self.edges, self.hist = (lo, hi), torch.zeros(self.bins)
        elif lo < self.edges[0] or hi > self.edges[1]:
            # widen with 25% headroom so a slowly growing range is not re-binned every batch
            span = hi - lo
            new = (min(lo, self.edges[0]) - 0.25 * span * (lo < self.edges[0]), max(hi, self.edges[1]) + 0.25 * span * (hi > self.edges[1]))
            self.hist = self._rebin(self.hist, self.edges, new)
            self.edges = new
        self.hist += torch.histc(x, self.bins, *self.edges)

    def _rebin(self, hist: torch.Tensor, old: tuple[float, float], new: tuple[float, float]) -> torch.Tensor:
        centers = self._centers(old)
        idx = ((centers - new[0]) / (new[1] - new[0]) * self.bins).long().clamp(0, self.bins - 1)
        return torch.bincount(idx, weights=hist, minlength=self.bins).float()

    def _centers(self, edges: tuple[float, float]) -> torch.Tensor:
        width = (edges[1] - edges[0]) / self.bins
        return edges[0] + width * (torch.arange(self.bins, dtype=torch.float64) + 0.5)

    def nonempty(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(bin centers as float32, counts) of the bins that hold data."""
        centers = self._centers(self.edges).float()
        keep = self.hist > 0
        return centers[keep], self.hist[keep]

    def compute(self, spec: QSpec) -> tuple[torch.Tensor, torch.Tensor]:
        if self.hist is None:
            raise RuntimeError("observer saw no data")
        if self.mode == "percentile":
            return self._percentile()
        if self.mode == "unilateral":
            return self._unilateral(spec)
        if self.mode == "silu-mse":
            return self._mse(spec, torch.nn.functional.silu, steps=64)
        return self._mse(spec)

    def _percentile(self) -> tuple[torch.Tensor, torch.Tensor]:
        cdf = torch.cumsum(self.hist.double(), 0)
        cdf = cdf / cdf[-1]
        centers = self._centers(self.edges)
        lo_i = int(torch.searchsorted(cdf, torch.tensor(self.tail, dtype=torch.float64)))
        hi_i = int(torch.searchsorted(cdf, torch.tensor(1 - self.tail, dtype=torch.float64)))
        lo = max(float(centers[min(lo_i, self.bins - 1)]), float(self.lo))
        hi = min(float(centers[min(hi_i, self.bins - 1)]), float(self.hi))
        return torch.tensor([lo]), torch.tensor([hi])

    def _mse(self, spec: QSpec, after=None, steps: int = 40) -> tuple[torch.Tensor, torch.Tensor]:
        """Grid search of (lo, hi) = (r_lo * min, r_hi * max) minimising sum_bins n * (f(q(c)) - f(c))^2."""
        centers, counts = self.nonempty()
        ratios = torch.linspace(0.05, 1.0, steps) if after is None else torch.linspace(1 / steps, 1.0, steps)
        lo0, hi0 = float(self.lo), float(self.hi)
        lo_c = (ratios * lo0) if lo0 < 0 else torch.tensor([lo0])
        hi_c = ratios * hi0 if hi0 > 0 else torch.tensor([hi0])
        if spec.symmetric:
            amax = max(-lo0, hi0) * ratios
            lo_c, hi_c = -amax, amax
            pairs_lo, pairs_hi = lo_c, hi_c
        else:
            pairs_lo = lo_c[:, None].expand(-1, hi_c.numel()).reshape(-1)
            pairs_hi = hi_c[None, :].expand(lo_c.numel(), -1).reshape(-1)
        best = int(torch.argmin(histogram_sq_error(centers, counts, pairs_lo, pairs_hi, spec, after)))
        return pairs_lo[best].reshape(1), pairs_hi[best].reshape(1)

    def _unilateral(self, spec: QSpec) -> tuple[torch.Tensor, torch.Tensor]:
        """Lower bound pinned at max(SILU_MIN, observed min); upper bound r * max minimising the histogram's error.

        1-D, so the grid is finer than the 2-D mse search's (128 ratios instead of 40)."""
        centers, counts = self.nonempty()
        lo, hi0 = max(SILU_MIN, float(self.lo)), float(self.hi)
        hi_c = torch.linspace(0.02, 1.0, 128) * hi0 if hi0 > 0 else torch.tensor([hi0])
        lo_c = torch.full_like(hi_c, lo)
        best = int(torch.argmin(histogram_sq_error(centers, counts, lo_c, hi_c, spec)))
        return lo_c[best].reshape(1), hi_c[best].reshape(1)


class WeightMSEObserver(MinMaxObserver):
    """Per-channel clipping of weights minimising the squared quantization error of the weights,
    sum_j a_j (Q(w_j) - w_j)^2, each weight weighted by a_j = E[x_j^2] of the input it multiplies when
    `importance` is set: the conv output's error under independent inputs, rather than the weights' own."""

    def __init__(self, axis: int = 0) -> None:
        super().__init__(per_channel=True, axis=axis)
        self.w: torch.Tensor | None = None
        self.importance: torch.Tensor | None = None  # same shape as the observed weight

    def update(self, x: torch.Tensor) -> None:
        super().update(x)
        self.w = _channel_view(x.detach().float(), self.axis)

    def compute(self, spec: QSpec) -> tuple[torch.Tensor, torch.Tensor]:
        w = self.w
        a = None if self.importance is None else _channel_view(self.importance.float(), self.axis)
        amax = torch.maximum(-self.lo, self.hi).clamp_min(1e-8)
        best_err = torch.full_like(amax, float("inf"))
        best = amax.clone()
        for r in torch.linspace(0.3, 1.0, 71):
            clip = amax * r
            scale, zp = choose_qparams(-clip, clip, spec.qmin, spec.qmax, True)
            err = fake_quantize(w, scale[:, None], zp[:, None], spec.qmin, spec.qmax).sub_(w).pow_(2)  # its own buffer
            err = (err if a is None else err.mul_(a)).sum(1)
            better = err < best_err
            best_err = torch.where(better, err, best_err)
            best = torch.where(better, clip, best)
        return -best, best


def make_observer(name: str, spec: QSpec | None = None, weight: bool = False):
    spec = spec or QSpec()
    if name not in OBSERVERS + INTERNAL_OBSERVERS:
        raise ValueError(f"unknown observer {name!r}; choose from {', '.join(OBSERVERS)}")
    if weight:
        # Weights are static: percentile (and the SiLU pin of unilateral) make no sense on them, so they fall back
        # to the exact MSE search.
        return MinMaxObserver(True, spec.axis) if name == "minmax" else WeightMSEObserver(spec.axis)
    if name == "minmax":
        return MinMaxObserver(spec.per_channel, spec.axis)
    return HistogramObserver(name)
