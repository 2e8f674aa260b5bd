"""The Python API the CLI calls: calibrate, save/load, export (evaluation lives in yoloq.runtime.evaluate).

>>> from yoloq import api
>>> from yoloq.recipe import Recipe
>>> qm = api.calibrate("yolov8n.yaml", "images/", Recipe(images=4, imgsz=160))  # doctest: +SKIP
>>> api.save(qm, "model.qpt"); api.export("model.qpt", "model.onnx")              # doctest: +SKIP
"""

from __future__ import annotations

import platform
import time
from dataclasses import replace
from datetime import datetime, timezone
from pathlib import Path

import torch

from yoloq import checkpoint
from yoloq.checkpoint import QuantizedModel
from yoloq.data.datasets import Dataset, resolve_data
from yoloq.errors import YoloqError
from yoloq.io import image_digests, sha256_file
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
        "seen_images": image_digests(ds.images),
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


def _check_recipe(source: str, recipe: Recipe, **requested) -> None:
    """A flag given for a quantized checkpoint must agree with what it was calibrated with."""
    for k, v in requested.items():
        if v is not None and v != getattr(recipe, k):
            raise YoloqError(f"{source} was calibrated with {k.replace('_', ' ')} {getattr(recipe, k)}, "
                             f"not {v}; calibrate again or drop the flag")


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
        _check_recipe(source, recipe, weight_bits=weight_bits, act_bits=act_bits, imgsz=imgsz)
    else:
        recipe = _reconstruction_recipe(weight_bits, act_bits, images, imgsz)
    ds = ds.take(images or recipe.images)
    cfg = cfg.for_bits(recipe.act_bits)
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
    _record_seen(qm, ds)
    if out is not None:
        save(qm, out)
        state.remove()
    return qm, report


def _record_seen(qm: QuantizedModel, ds: Dataset) -> None:
    """Add the images a method trained on to those the checkpoint has seen: `yoloq eval` says when it meets them."""
    qm.provenance["seen_images"] = sorted(set(qm.provenance.get("seen_images", [])) | set(image_digests(ds.images)))


def _reconstruction_recipe(weight_bits: int | None, act_bits: int | None, images: int | None,
                           imgsz: int | None) -> Recipe:
    """The calibration a reconstruction starts from: MSE ranges, weights rounded to nearest (it learns the rounding)."""
    return Recipe(weight_bits or 4, act_bits or 4, "mse", bias_correction=False, weight_rounding="nearest",
                  images=images or Recipe.images, imgsz=imgsz or 640)


def _qat_start_recipe(rebuilt: bool, weight_bits: int | None, act_bits: int | None, images: int) -> Recipe:
    """How a float model is quantized before QAT: reconstructed (TASKQ), or calibrated with the calibrate defaults."""
    return (_reconstruction_recipe(weight_bits, act_bits, images, None) if rebuilt
            else Recipe(weight_bits or 4, act_bits or 4, images=images))


def float_of(qm: QuantizedModel):
    """The float model a checkpoint was made from: its source file when still there unchanged (sha256), else the
    checkpoint's own weights with the quantizers off (exact unless they were rounded in place, as GPTQ does)."""
    from yoloq.methods.taskq import float_reference

    src, sha = qm.provenance.get("source"), qm.provenance.get("source_sha256")
    if src and sha and Path(src).is_file() and sha256_file(src) == sha:
        return load_float(src)
    return float_reference(qm.model)


def pseudo_labels(float_model, ds: Dataset, imgsz: int, conf: float = 0.25, iou: float = 0.7) -> list:
    """The float model's detections (conf >= `conf`, after NMS) as labels, (n, 5) [cls, x1, y1, x2, y2] per image."""
    from yoloq.runtime.evaluate import detect
    from yoloq.runtime.predictors import TorchPredictor

    pred = TorchPredictor(float_model, imgsz, torch.get_num_threads(), "float")
    dets, _ = detect(pred, ds, conf, iou, 300, "pseudo-labels", multi_label=False)  # one label per object
    return [d[:, [5, 0, 1, 2, 3]] for d in dets]


def training_labels(ds: Dataset, names: dict, float_model, use_pseudo: bool, imgsz: int) -> tuple[list, str]:
    """Labels to train on, re-indexed to the model's classes, and where they come from."""
    from yoloq.runtime.evaluate import match_labels

    if use_pseudo:
        return pseudo_labels(float_model, ds, imgsz), "pseudo-labels from the float model (conf >= 0.25)"
    labels, why = match_labels(ds, names)
    if labels is None:
        raise YoloqError(f"cannot train on {ds.source}: {why}; add --pseudo-labels to train on the float model's "
                         "own detections")
    return labels, why or "labels from the data"


def qat(source: str, data: str | Dataset, cfg, out: str | Path, weight_bits: int | None = None,
        act_bits: int | None = None, images: int | None = None) -> tuple[QuantizedModel, dict]:
    """Quantization-aware training (HQOD or plain LSQ/TQT, see yoloq.methods.qat); writes `out`.

    `source` is a float model (.pt or YAML; W4A4 by default), quantized here first as `cfg.start` says (TASKQ
    reconstruction by default, or calibration with the calibrate defaults), or a quantized checkpoint. Progress is
    kept in `<out>.start.qpt` (the TASKQ start, itself resumable) and `<out>.partial` (after every epoch), and
    re-running with the same arguments continues from there; under torchrun only rank 0 writes.
    """
    import shutil

    from yoloq.data.datasets import write_yolo
    from yoloq.methods import qat as qat_method

    dist = qat_method.Dist.from_env(cfg.device)
    ds = data if isinstance(data, Dataset) else resolve_data(data)
    ds = ds.take(images)
    payload = checkpoint.read(source) if Path(source).is_file() else None
    if payload is not None:
        if cfg.start is not None:
            raise YoloqError(f"--start applies to a float model; {source} is a quantized checkpoint, its own start")
        qm = checkpoint.load(source, payload)
        _check_recipe(source, qm.recipe, weight_bits=weight_bits, act_bits=act_bits)
        float_model = float_of(qm)
        recipe = qm.recipe
        rebuilt = qat_method.reconstructed(qm.provenance.get("history", []))
    else:
        float_model, qm = load_float(source), None
        cfg = replace(cfg, start=cfg.start or "taskq")
        rebuilt = cfg.start == "taskq"
        recipe = _qat_start_recipe(rebuilt, weight_bits, act_bits, min(len(ds.images), Recipe.images))
    cfg = cfg.for_start(recipe, rebuilt)
    work = Path(f"{out}.data")
    fingerprint = {"source": str(source), "source_sha256": sha256_file(source) if Path(source).is_file() else None,
                   "images": [str(p) for p in ds.images], "recipe": recipe.to_dict()}
    state = qat_method.QATState(partial_path(out), cfg, fingerprint)
    resuming = state.path.exists()
    note = "labels of the interrupted run"
    if dist.main and not (resuming and (work / "images").is_dir()):  # first: unusable labels fail before any work
        if cfg.pseudo_labels and cfg.device == "cuda":  # labelling 64 images at 640 on a busy CPU took minutes
            float_model.to(f"cuda:{dist.rank}")
        labels, note = training_labels(ds, yolo.class_names(float_model), float_model, cfg.pseudo_labels, recipe.imgsz)
        write_yolo(ds.images, labels, work)
    dist.barrier()
    start_path = Path(f"{out}.start.qpt")
    start_seconds = None  # the start's own time, where this call made it (the QAT's is the report's "seconds")
    if qm is None and not resuming:
        made_here = not (rebuilt and start_path.exists())
        t = time.perf_counter()
        qm = (_taskq_start(source, fingerprint["source_sha256"], ds, recipe, cfg, start_path, dist) if rebuilt
              else calibrate(source, ds, recipe))
        start_seconds = round(time.perf_counter() - t, 1) if made_here else None
    qm, report = qat_method.run(qm, work / "images", cfg, state, dist, float_model if cfg.distill else None)
    _record_seen(qm, ds)
    if dist.main:
        report["labels"] = note
        report["start"] = {"taskq": f"TASKQ reconstruction ({cfg.start_iters} steps per unit)", "ptq": "calibration",
                           None: str(source)}[cfg.start]
        report["start_seconds"] = start_seconds
        save(qm, out)
        state.remove()
        start_path.unlink(missing_ok=True)
        shutil.rmtree(work, ignore_errors=True)
    dist.barrier()
    return qm, report


def _taskq_start(source: str, source_sha256: str | None, ds: Dataset, recipe: Recipe, cfg, path: Path,
                 dist) -> QuantizedModel:
    """TASKQ reconstruction of a float model as the start of QAT, kept at `path` until the training ends: run by the
    main process (resumable as any `finetune --out`), read by every process."""
    from yoloq.methods.taskq import TaskQConfig

    if dist.main:
        if path.exists():
            done = checkpoint.read(path)
            bits = (recipe.weight_bits, recipe.act_bits)
            if done is None or done["provenance"].get("source_sha256") != source_sha256 \
                    or (done["recipe"]["weight_bits"], done["recipe"]["act_bits"]) != bits:
                raise YoloqError(f"{path} is left from a run with another model or bits; delete it")
        else:
            finetune(source, ds, TaskQConfig(iters=cfg.start_iters, seed=cfg.seed), path, recipe.weight_bits,
                     recipe.act_bits, recipe.images, recipe.imgsz)
    dist.barrier()
    return checkpoint.load(path)
