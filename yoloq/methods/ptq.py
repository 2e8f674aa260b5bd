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
    """Put every uncalibrated quantizer in observing mode; weight quantizers see their weights right away."""
    started = []
    for name, q in iter_quantizers(model):
        if bool(q.calibrated):
            continue  # fixed grids (image input, SiLU gate) need no data
        q.observe()
        started.append(q)
    for m in model.modules():
        if hasattr(m, "weight_quantizer") and m.weight_quantizer.observing:
            m.weight_quantizer(m.conv.weight)
    return started


def freeze(model: torch.nn.Module, quantizers: list) -> None:
    for q in quantizers:
        q.freeze()
    for m in model.modules():
        if isinstance(m, QConv2d):
            m.fit_bias_to_int32()


@torch.no_grad()
def calibrate(model: torch.nn.Module, data: Dataset, imgsz: int) -> torch.nn.Module:
    started = observe(model)
    for _, _, x in track(iter_batches(data, imgsz), len(data.images), "calibrating"):
        model(x)
    freeze(model, started)
    return model


def run(model: torch.nn.Module, recipe: Recipe, data: Dataset) -> torch.nn.Module:
    return calibrate(model, data, recipe.imgsz)
