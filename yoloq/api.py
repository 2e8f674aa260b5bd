"""The Python API the CLI calls: calibrate, save/load, export (evaluation lives in yoloq.runtime.evaluate).

>>> from yoloq import api
>>> from yoloq.recipe import Recipe
>>> qm = api.calibrate("yolov8n.yaml", "images/", Recipe(images=4, imgsz=160))  # doctest: +SKIP
>>> api.save(qm, "model.qpt"); api.export("model.qpt", "model.onnx")              # doctest: +SKIP
"""

from __future__ import annotations

import platform
from datetime import datetime, timezone
from pathlib import Path

import torch

from yoloq import checkpoint
from yoloq.checkpoint import QuantizedModel
from yoloq.data.datasets import Dataset, resolve_data
from yoloq.errors import YoloqError
from yoloq.io import sha256_file
from yoloq.methods import METHODS, build_quantized
from yoloq.model import yolo
from yoloq.recipe import Recipe


def load_float(source: str):
    """A prepared (fused, deployment-branch) float model from a .pt or model YAML."""
    return yolo.prepare(yolo.load_detector(source))


def calibrate(source: str, data: str | Dataset, recipe: Recipe) -> QuantizedModel:
    ds = data if isinstance(data, Dataset) else resolve_data(data)
    ds = ds.take(recipe.images)
    float_model = yolo.load_detector(source)
    model = build_quantized(yolo.prepare(float_model), recipe)
    model = METHODS[recipe.method](model, recipe, ds)
    provenance = {
        "source": str(source),
        "source_sha256": sha256_file(source) if Path(source).is_file() else None,
        "data": ds.source,
        "calibration_images": len(ds.images),
        "created": datetime.now(timezone.utc).isoformat(),
        "yoloq": __import__("yoloq").__version__,
        "torch": torch.__version__,
        "ultralytics": __import__("ultralytics").__version__,
        "python": platform.python_version(),
        "history": [{"step": "calibrate", "method": recipe.observer}],
    }
    return QuantizedModel(model, recipe, provenance, yolo.model_yaml(float_model), yolo.class_names(float_model))


def save(qm: QuantizedModel, out: str | Path) -> Path:
    return checkpoint.save(out, qm)


def load_quantized(path: str | Path) -> QuantizedModel:
    p = Path(path)
    if not p.exists():
        raise YoloqError(f"quantized checkpoint not found: {path}")
    return checkpoint.load(p)


def export(qckpt: str | Path | QuantizedModel, out: str | Path, fmt: str = "qdq", pack: str | None = None, imgsz: int | None = None) -> dict:
    from yoloq.export.onnx import export_onnx

    qm = qckpt if isinstance(qckpt, QuantizedModel) else load_quantized(qckpt)
    return export_onnx(qm, out, fmt, pack, imgsz)
