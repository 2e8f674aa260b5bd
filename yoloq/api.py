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


def partial_path(out: str | Path) -> Path:
    """Where fine-tuning keeps its per-unit progress until `out` is written."""
    out = Path(out)
    return out.with_name(out.name + ".partial")


def finetune(source: str, data: str | Dataset, cfg, out: str | Path | None = None, weight_bits: int | None = None,
             act_bits: int | None = None, images: int | None = None, imgsz: int | None = None) -> tuple[QuantizedModel, dict]:
    """Fine-tune low-bit weights and activations (TASKQ and its baselines, see yoloq.methods.taskq).

    `source` is a float model (.pt or YAML: calibrated here first, with MSE ranges and weights rounded to nearest)
    or a quantized checkpoint whose weights are still unrounded. With `out`, progress is kept in `<out>.partial`
    after every unit and an interrupted run with the same arguments continues from there; the file is removed once
    `out` is written.
    """
    from yoloq.data.datasets import iter_batches
    from yoloq.methods import taskq

    ds = data if isinstance(data, Dataset) else resolve_data(data)
    payload = checkpoint.read(source) if Path(source).is_file() else None
    if payload is not None:
        recipe = Recipe.from_dict(payload["recipe"])
        for k, v in (("weight_bits", weight_bits), ("act_bits", act_bits), ("imgsz", imgsz)):
            if v is not None and v != getattr(recipe, k):
                raise YoloqError(f"{source} was calibrated with {k.replace('_', ' ')} {getattr(recipe, k)}, "
                                 f"not {v}; calibrate again or drop the flag")
    else:
        recipe = Recipe(weight_bits or 4, act_bits or 4, "mse", bias_correction=False, weight_rounding="nearest",
                        images=images or 32, imgsz=imgsz or 640)
    ds = ds.take(images or recipe.images)
    state = None
    if out is not None:
        fingerprint = {"source": str(source), "source_sha256": sha256_file(source) if Path(source).is_file() else None,
                       "images": [str(p) for p in ds.images], "recipe": recipe.to_dict()}
        state = taskq.ResumeState(partial_path(out), cfg, fingerprint)
        if state.path.exists() and not Path(source).is_file():
            raise YoloqError(f"cannot resume from {state.path}: {source} is a YAML (random init); delete the file")
    resuming = state is not None and state.path.exists()
    if resuming:
        qm = None  # rebuilt from the state file
    elif payload is not None:
        qm = checkpoint.load(source, payload)
    else:
        qm = calibrate(source, ds, recipe)
    images_ = [x for _, _, x in iter_batches(ds, recipe.imgsz)]
    qm, report = taskq.run(qm, images_, cfg, state)
    if out is not None:
        save(qm, out)
        state.remove()
    return qm, report
