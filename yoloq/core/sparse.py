"""TASKQ sparse activation quantization: a low-bit dense grid for the bulk, an 8-bit sparse branch for the outliers.

A long-tailed activation x (SiLU outputs: a bulk below ~3, a few values at 10-30) is split at a threshold t::

    d = clip(x, lo, t)          dense part: every element, quantized at the target bits (activation_spec(bits))
    r = x - clip(x, lo, t)      sparse part: zero except for the outliers (< 1% of the elements), quantized at 8 bits
    y = Q_dense(d) + Q_sparse(r)

The threshold is not separate state: [lo, t] is the dense quantizer's own real range
[(qmin - zp) * s, (qmax - zp) * s], so a dense step learned later (LSQ on ``dense.scale``) moves the split with it.
The outliers pass no gradient to s (see forward): the sparse branch reproduces them whatever t is.

The residual quantizer is uint8 asymmetric (activation_spec(8)) over [min(0, xmin - lo), max(0, xmax - t)]:
- a SiLU residual is >= 0 (its low side never reaches below the SiLU minimum), so the range is [0, xmax - t], the zero
  point is 0 and all 256 codes go to the tail, where a symmetric int8 grid would waste half of them on r < 0;
- a tensor with outliers on both sides still works: the zero point moves inside the range;
- zero is exactly representable either way (the range holds 0 and the zero point is an integer), so the ~99% of
  elements inside [lo, t] get exactly 0 from the sparse branch;
- both branches are uint8, the type ORT fuses DQ + DQ -> Add -> Q into QLinearAdd with.

Calibration (``freeze``) searches (lo, t) over the observed histogram for the least expected squared error of the
whole quantizer E[(y - x)^2] (dense error inside [lo, t], 8-bit residual error outside), among the splits that leave
at most ``max_outlier_fraction`` (default 1%) of the mass outside [lo, t]: beyond that the branch is no longer sparse.
Both grids cover their ranges' ends (``covering_qparams``), so no calibration value falls off either grid.

ONNX: the clip exports as a Clip with constant bounds, each branch as its child's QuantizeLinear -> DequantizeLinear,
joined by an Add. The dense child is told its producer is bounded by t (``input_max``), so it adds no second Clip.

>>> import torch
>>> q = SparseQuantizer(bits=4)
>>> q.observe(); _ = q(torch.cat([torch.linspace(0, 2, 1000), torch.tensor([20.0])])); q.freeze()
>>> q.dense.real_range()[1] < 3 and q.outlier_fraction < 0.01
True
"""

from __future__ import annotations

import torch
from torch import nn

from yoloq.core.functional import fake_quantize
from yoloq.core.observers import OBSERVERS, HistogramObserver, MinMaxObserver, histogram_sq_error
from yoloq.core.qspec import QSpec, activation_spec
from yoloq.core.quantizer import MIN_ACT_SCALE, FakeQuantizer


def covering_qparams(lo: torch.Tensor, hi: torch.Tensor, qmin: int, qmax: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Scale and integer zero point of the smallest grid whose real range covers [min(lo, 0), max(hi, 0)].

    choose_qparams rounds the zero point to the nearest integer, which can leave up to half a step of [lo, hi] outside
    the grid. Here those values would become outliers, and SiLU outputs pile up at their minimum (about 7% of a
    Gaussian pre-activation lies within 0.005 of it), so each end is covered: s = max(-lo / (zp - qmin),
    hi / (qmax - zp)) for the better of the two integers around the real-valued zero point. The scale is floored at
    MIN_ACT_SCALE as FakeQuantizer.set_range does (a coarser grid covers more, so the cover still holds).
    """
    lo, hi = lo.double().clamp(max=0), hi.double().clamp(min=0)
    zf = qmin + (qmax - qmin) * -lo / (hi - lo).clamp_min(1e-30)
    best_s, best_z = None, None
    for z in (zf.floor(), zf.ceil()):
        z = z.clamp(qmin, qmax)
        # a side with no codes (zp at qmin or qmax) covers only 0: inf unless that bound is 0
        below = torch.where(z > qmin, -lo / (z - qmin).clamp_min(1), torch.where(lo < 0, torch.inf, 0.0))
        above = torch.where(z < qmax, hi / (qmax - z).clamp_min(1), torch.where(hi > 0, torch.inf, 0.0))
        s = torch.maximum(below, above)
        if best_s is None:
            best_s, best_z = s, z
        else:
            better = s < best_s
            best_s, best_z = torch.where(better, s, best_s), torch.where(better, z, best_z)
    # float32 rounding of s must not uncover the ends by an ulp
    return (best_s * (1 + 1e-6)).clamp_min(MIN_ACT_SCALE).float(), best_z.float()


def choose_split(
    hist: torch.Tensor,
    edges_or_centers: torch.Tensor,
    bits: int,
    sparse_bits: int = 8,
    max_outlier_fraction: float = 0.01,
    *,
    xmin: float | None = None,
    xmax: float | None = None,
    n_t: int = 128,
    n_lo: int = 16,
) -> dict:
    """The dense range [lo, t] minimising the sparse quantizer's expected squared error over a histogram.

    hist: bin counts; edges_or_centers: ascending bin edges (len(hist) + 1) or centers (len(hist)); each bin's values
    are taken at its center for the error. xmin/xmax: the data's true extremes (default: the outer edges, else
    centers, of the non-empty bins); the residual grid reaches them, so no calibrated outlier is clipped.

    Candidates: t on a grid from the (1 - max_outlier_fraction) quantile up to xmax, quadratically spaced (dense near
    the bulk, where the optimum lies); lo likewise from xmin up to the max_outlier_fraction quantile (only xmin when
    xmin >= 0). Both grids get covering_qparams, so the pair (xmin, xmax) leaves nothing outside. A pair is
    admissible when the mass outside its realised range is at most max_outlier_fraction, a bin that the range cuts
    counting whole: with edges the bound holds for the data, not just for the bin centers. Each pair's error is the
    forward pass's own, Q_dense(clip(c)) + Q_sparse(c - clip(c)) against c, with the residual grid covering
    [min(0, xmin - lo_d), max(0, xmax - t_d)].

    Returns floats: lo_d, t_d (the dense grid's realised range), dense_scale, dense_zero_point, residual_lo,
    residual_hi, sparse_scale, sparse_zero_point, outlier_fraction (an upper bound with edges) and mse (the expected
    squared error per element).
    """
    counts = torch.as_tensor(hist, dtype=torch.float64).flatten()
    pts = torch.as_tensor(edges_or_centers, dtype=torch.float64).flatten()
    if pts.numel() == counts.numel() + 1:
        centers, left, right = (pts[1:] + pts[:-1]) / 2, pts[:-1], pts[1:]
    elif pts.numel() == counts.numel():
        centers = left = right = pts
    else:
        raise ValueError(f"{pts.numel()} edges or centers for {counts.numel()} bins")
    keep = counts > 0
    if not bool(keep.any()):
        raise ValueError("empty histogram")
    n = counts[keep]
    xmin = float(left[keep][0]) if xmin is None else float(xmin)
    xmax = float(right[keep][-1]) if xmax is None else float(xmax)
    # the outer bins hold no value beyond the true extremes
    c, left, right = (v[keep].clamp(xmin, xmax) for v in (centers, left, right))
    total = float(n.sum())
    cdf = torch.cumsum(n, 0) / total

    # the most clipping each side can take alone; the joint budget is checked on the realised ranges below
    t_floor = float(c[min(int(torch.searchsorted(cdf, 1 - max_outlier_fraction)), c.numel() - 1)])
    t_c = t_floor + (xmax - t_floor) * torch.linspace(0, 1, n_t, dtype=torch.float64) ** 2
    if xmin < 0:
        lo_ceil = min(float(c[min(int(torch.searchsorted(cdf, max_outlier_fraction)), c.numel() - 1)]), 0.0)
        lo_c = xmin + (lo_ceil - xmin) * torch.linspace(0, 1, n_lo, dtype=torch.float64) ** 2
    else:
        lo_c = torch.tensor([xmin], dtype=torch.float64)
    lo_p = lo_c[:, None].expand(-1, t_c.numel()).reshape(-1)
    t_p = t_c[None, :].expand(lo_c.numel(), -1).reshape(-1)

    # float32 from here on, as in forward, so the error is the one the module will make
    dense, res = activation_spec(bits), activation_spec(sparse_bits)
    s_d, z_d = covering_qparams(lo_p, t_p, dense.qmin, dense.qmax)
    lo_d, t_d = (dense.qmin - z_d) * s_d, (dense.qmax - z_d) * s_d
    r_lo, r_hi = (xmin - lo_d).clamp(max=0), (xmax - t_d).clamp(min=0)
    s_r, z_r = covering_qparams(r_lo, r_hi, res.qmin, res.qmax)
    x, w, left, right = c.float()[None], n[None], left.float()[None], right.float()[None]
    errs, outside = [], []
    with torch.no_grad():
        for i in range(0, lo_p.numel(), 256):  # candidates x bins in bounded memory
            sl = slice(i, i + 256)
            inner = torch.clamp(x, lo_d[sl, None], t_d[sl, None])
            y = fake_quantize(inner, s_d[sl, None], z_d[sl, None], dense.qmin, dense.qmax)
            y = y + fake_quantize(x - inner, s_r[sl, None], z_r[sl, None], res.qmin, res.qmax)
            errs.append(((y - x).double() ** 2 * w).sum(1))
            cut = (left < lo_d[sl, None]) | (right > t_d[sl, None])
            outside.append((cut.double() * w).sum(1))
    err, out = torch.cat(errs) / total, torch.cat(outside) / total
    ok = out <= max_outlier_fraction + 1e-12
    # the widest pair (xmin, xmax) is always admissible (its grid covers all data); the fallback is for rounding
    best = int(torch.argmin(torch.where(ok, err, torch.inf))) if bool(ok.any()) else int(torch.argmin(out))
    return {
        "lo_d": float(lo_d[best]), "t_d": float(t_d[best]),
        "dense_scale": float(s_d[best]), "dense_zero_point": float(z_d[best]),
        "residual_lo": float(r_lo[best]), "residual_hi": float(r_hi[best]),
        "sparse_scale": float(s_r[best]), "sparse_zero_point": float(z_r[best]),
        "outlier_fraction": float(out[best]), "mse": float(err[best]),
    }


class SparseQuantizer(nn.Module):
    """y = dense(clip(x, lo, t)) + sparse(x - clip(x, lo, t)), [lo, t] being the dense child's real range.

    State lives in the two FakeQuantizer children (``dense.*``, ``sparse.*``: scale, zero_point, calibrated), so
    ``state_dict`` round-trips and iter_quantizers finds them (export modes are set on them). The calibration
    diagnostics ``outlier_fraction``, ``mse_dense_only`` and ``mse_sparse`` are plain attributes, not saved.
    """

    def __init__(self, bits: int, observer: str = "mse", sparse_bits: int = 8, max_outlier_fraction: float = 0.01):
        super().__init__()
        if observer not in OBSERVERS:
            raise ValueError(f"unknown observer {observer!r}; choose from {', '.join(OBSERVERS)}")
        # `observer` is the plain dense quantizer this one is compared with (mse_dense_only), and the dense child's
        # own observer should it ever be calibrated alone
        self.observer_name, self.max_outlier_fraction = observer, max_outlier_fraction
        self.dense = FakeQuantizer(activation_spec(bits), observer=observer)
        self.sparse = FakeQuantizer(activation_spec(sparse_bits))
        self.outlier_fraction: float | None = None  # share of calibration values outside [lo, t] (upper bound)
        self.mse_dense_only: float | None = None  # E[(Q(x) - x)^2] of the plain dense quantizer, same bits
        self.mse_sparse: float | None = None  # E[(y - x)^2] of this quantizer
        self._observer: HistogramObserver | None = None

    def extra_repr(self) -> str:
        return f"uint{self.dense.spec.bits} dense + uint{self.sparse.spec.bits} sparse, observer={self.observer_name}"

    # ---- the FakeQuantizer interface ----------------------------------------------------------------------------
    @property
    def spec(self) -> QSpec:
        return self.dense.spec

    @property
    def calibrated(self) -> torch.Tensor:
        return self.dense.calibrated & self.sparse.calibrated

    @property
    def enabled(self) -> bool:
        return self.dense.enabled and self.sparse.enabled

    @enabled.setter
    def enabled(self, value: bool) -> None:
        self.dense.enabled = self.sparse.enabled = value

    @property
    def export_mode(self) -> str | None:
        return self.dense.export_mode

    @export_mode.setter
    def export_mode(self, value: str | None) -> None:
        self.dense.export_mode = self.sparse.export_mode = value

    @property
    def observing(self) -> bool:
        return self._observer is not None

    # ---- phases -------------------------------------------------------------------------------------------------
    def observe(self) -> None:
        # minmax needs a histogram too (the split search does), which the mse-mode observer keeps as well
        self._observer = HistogramObserver("mse" if self.observer_name == "minmax" else self.observer_name)

    def freeze(self) -> None:
        obs = self._observer
        if obs is None:
            raise RuntimeError("freeze() called before observe()")
        # all bins with their edges: a bin the split cuts counts whole towards the outlier budget
        edges = torch.linspace(obs.edges[0], obs.edges[1], obs.bins + 1, dtype=torch.float64)
        xmin, xmax = float(obs.lo), float(obs.hi)
        split = choose_split(obs.hist, edges, self.dense.spec.bits, self.sparse.spec.bits, self.max_outlier_fraction,
                             xmin=xmin, xmax=xmax)
        # set_qparams, not set_range: the covering grids choose_split evaluated, not choose_qparams' rounded ones
        self.dense.set_qparams(torch.tensor([split["dense_scale"]]), torch.tensor([split["dense_zero_point"]]))
        self.sparse.set_qparams(torch.tensor([split["sparse_scale"]]), torch.tensor([split["sparse_zero_point"]]))
        centers, counts = obs.nonempty()
        spec = self.dense.spec
        b_lo, b_hi = MinMaxObserver.compute(obs, spec) if self.observer_name == "minmax" else obs.compute(spec)
        self.mse_dense_only = float(histogram_sq_error(centers, counts, b_lo, b_hi, spec)[0] / counts.sum())
        self.outlier_fraction, self.mse_sparse = split["outlier_fraction"], split["mse"]
        self._observer = None

    def stats(self) -> dict:
        """Calibration diagnostics: does the sparse branch pay on this tensor (mse_sparse well below mse_dense_only)?"""
        lo, t = self.dense.real_range() if bool(self.dense.calibrated) else (None, None)
        return {"outlier_fraction": self.outlier_fraction, "mse_dense_only": self.mse_dense_only,
                "mse_sparse": self.mse_sparse, "lo": lo, "t": t}

    # ---- numerics -----------------------------------------------------------------------------------------------
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self._observer is not None:
            self._observer.update(x)
            return x
        d, s = self.dense, self.sparse
        # a child disabled alone is an ablation: its branch passes through in float (dense off: y = clip + Q(r))
        if not (d.enabled or s.enabled) or not bool(self.calibrated):
            return x
        if d.export_mode is not None:
            # Python floats: the bounds export as the Clip's constants, nothing for constant folding to rewrite.
            # They equal the float32 tensors below: (integer * float32 scale) is exact in double.
            lo, hi = d.real_range()
            # the clip bounds the dense child's input by its own top, so its QDQ needs no Clip of its own
            d.input_max = hi
            inner = torch.clamp(x, lo, hi)
            return d(inner) + s(x - inner)
        step = d.scale.detach()
        inner = torch.clamp(x, (d.spec.qmin - d.zero_point) * step, (d.spec.qmax - d.zero_point) * step)
        y_d = d(inner)
        # The residual of an outlier is taken against the dense branch's output, which there is the bound t = t(s)
        # itself (same value, so the same numbers as x - inner), but with whatever gradient the dense child gives its
        # step (STE, LSQ's scaled one): y = t(s) + Q_sparse(x - t(s)) then passes no gradient to s, as y ~ x does
        # not depend on it, and the split follows a learned step without the outliers pulling on it.
        r = torch.where(inner == x, torch.zeros_like(x), x - y_d)
        return y_d + s(r)
