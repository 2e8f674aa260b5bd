"""Post-training calibration: observe activation statistics on a few images, then freeze scales and zero points.

Objective per quantizer (the observer decides): minmax covers the observed range; percentile drops a 1e-4 tail on
each side; mse picks the clipping range minimising E[(Q(x) - x)^2] over a histogram of x. Weights are frozen after
the activations, per output channel: mse clipping minimises sum_j E[x_j^2] (Q(w_j) - w_j)^2 (each weight weighted by
the power of its input channel); below 8 bits GPTQ then rounds them (min ||WX - QX||^2) and empirical bias correction
puts the expected output shift back into the bias.
"""

from __future__ import annotations

import torch

from yoloq.core.gptq import HessianAccumulator
from yoloq.core.modules import QConv2d, iter_quantizers
from yoloq.data.datasets import Dataset, iter_batches
from yoloq.recipe import Recipe
from yoloq.ui import track


def observe(model: torch.nn.Module) -> list:
    """Put every uncalibrated activation quantizer in observing mode (fixed grids need no data)."""
    started = []
    for _, q in iter_quantizers(model):
        if not bool(q.calibrated) and not q.weight:
            q.observe()
            started.append(q)
    return started


class InputStats:
    """Per-channel E[x] and E[x^2] of every QConv2d's input, gathered by forward pre-hooks during calibration."""

    def __init__(self, model: torch.nn.Module, hessians: bool = False) -> None:
        self.sums: dict[QConv2d, list] = {}
        # GPTQ needs each conv's input Hessian; grouped (depthwise) convs keep plain rounding
        self.hess = {m: HessianAccumulator(m.conv) for m in model.modules()
                     if hessians and isinstance(m, QConv2d) and m.conv.groups == 1 and m.weight_quantizer.spec.bits < 8}
        self.hooks = [m.register_forward_pre_hook(self._hook) for m in model.modules() if isinstance(m, QConv2d)]

    def _hook(self, module, args) -> None:
        x = args[0].detach().float()
        if module in self.hess:
            self.hess[module].add(x)
        s = self.sums.setdefault(module, [0.0, 0.0, 0])
        s[0] = s[0] + x.sum(dim=(0, 2, 3))
        s[1] = s[1] + (x * x).sum(dim=(0, 2, 3))
        s[2] += x.numel() // x.shape[1]

    def remove(self) -> None:
        for h in self.hooks:
            h.remove()

    def get(self, m: QConv2d) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        if m not in self.sums:
            return None, None
        s1, s2, n = self.sums[m]
        return s1 / n, s2 / n


def freeze(model: torch.nn.Module, quantizers: list, stats: InputStats | None = None, bias_correction: bool = True) -> None:
    """Activations first, then weights (their clipping, rounding and bias correction use the input statistics)."""
    for q in quantizers:
        q.freeze()
    convs = [m for m in model.modules() if isinstance(m, QConv2d)]
    for m in convs:
        m.bound_accumulator()
    for m in track(convs, len(convs), "weights"):
        mean, sq = stats.get(m) if stats else (None, None)
        h = stats.hess[m].hessian() if stats and m in stats.hess else None
        m.calibrate_weights(mean, sq, bias_correction and m.weight_quantizer.spec.bits < 8, h)


@torch.no_grad()
def calibrate(model: torch.nn.Module, data: Dataset, imgsz: int, bias_correction: bool = True,
              gptq: bool = False) -> torch.nn.Module:
    started = observe(model)
    stats = InputStats(model, hessians=gptq)
    try:
        for _, _, x in track(iter_batches(data, imgsz), len(data.images), "calibrating"):
            model(x)
    finally:
        stats.remove()
    freeze(model, started, stats, bias_correction)
    return model


def run(model: torch.nn.Module, recipe: Recipe, data: Dataset) -> torch.nn.Module:
    return calibrate(model, data, recipe.imgsz, recipe.bias_correction, recipe.weight_rounding == "gptq")
