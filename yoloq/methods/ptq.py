"""Post-training calibration: observe activation statistics on a few images, then freeze scales and zero points.

Objective per quantizer (the observer decides): minmax covers the observed range; percentile drops a 1e-4 tail on
each side; mse picks the clipping range minimising E[(Q(x) - x)^2] over a histogram of x. Weights are observed once,
per output channel (mse: the clipping minimising the weights' own squared error).
"""

from __future__ import annotations

import torch

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

    def __init__(self, model: torch.nn.Module) -> None:
        self.sums: dict[QConv2d, list] = {}
        self.hooks = [m.register_forward_pre_hook(self._hook) for m in model.modules() if isinstance(m, QConv2d)]

    def _hook(self, module, args) -> None:
        x = args[0].detach().float()
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
    """Activations first, then weights (their clipping and bias correction use the input statistics)."""
    for q in quantizers:
        q.freeze()
    for m in model.modules():
        if isinstance(m, QConv2d):
            mean, sq = stats.get(m) if stats else (None, None)
            m.calibrate_weights(mean, sq, bias_correction)


@torch.no_grad()
def calibrate(model: torch.nn.Module, data: Dataset, imgsz: int, bias_correction: bool = True) -> torch.nn.Module:
    started = observe(model)
    stats = InputStats(model)
    try:
        for _, _, x in track(iter_batches(data, imgsz), len(data.images), "calibrating"):
            model(x)
    finally:
        stats.remove()
    freeze(model, started, stats, bias_correction)
    return model


def run(model: torch.nn.Module, recipe: Recipe, data: Dataset) -> torch.nn.Module:
    return calibrate(model, data, recipe.imgsz, recipe.bias_correction)
