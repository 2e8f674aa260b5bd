"""Quantization methods: one config and one run() each, listed here."""

from __future__ import annotations

from yoloq.methods import ptq
from yoloq.recipe import Recipe

METHODS = {
    "ptq": ptq.run,
}


def build_quantized(model, recipe: Recipe):
    """Insert the recipe's quantizers into a prepared (fused) float model."""
    from yoloq.model import yolo

    placement = yolo.Placement(
        weight_bits=recipe.weight_bits,
        act_bits=recipe.act_bits,
        observer=recipe.observer,
        keep_first_last_8bit=recipe.keep_first_last_8bit,
        quantize_gate=recipe.quantize_gate,
    )
    return yolo.quantize_model(model, placement)
