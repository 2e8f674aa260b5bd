"""Quantization methods: one config and one run() each, listed here."""

from __future__ import annotations

from yoloq.methods import ptq
from yoloq.errors import YoloqError
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
        weight_reduce_range=recipe.weight_reduce_range,
        share_concat_grids=recipe.share_concat_grids,
    )
    model = yolo.quantize_model(model, placement)
    if recipe.sparse_tensors:
        from yoloq.core.sparse import SparseQuantizer

        for path in recipe.sparse_tensors:
            try:
                m = model.get_submodule(path)
            except AttributeError:
                raise YoloqError(f"recipe names a sparse tensor that the model does not have: {path}") from None
            m.output_quantizer = SparseQuantizer(m.output_quantizer.spec.bits, recipe.observer)
    return model
