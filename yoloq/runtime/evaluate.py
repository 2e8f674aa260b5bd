"""Evaluation: mAP against labels, fidelity against a reference model, and latency.

Fidelity is mAP50-95 of the model's detections when the reference model's own detections with conf >= 0.25 serve
as ground truth (class = the reference's predicted class). It needs no labels, so it works on any images; 1.0 means
the quantized model reproduces the reference. Its 95% interval comes from a bootstrap over images.
mAP is computed with pycocotools (COCO 101-point AP, IoU 0.50:0.95, all areas).
"""

from __future__ import annotations

import contextlib
import io
import time

import numpy as np

from yoloq.data.datasets import Dataset, iter_batches
from yoloq.io import image_digest
from yoloq.ui import track

REFERENCE_CONF = 0.25


def detect(predictor, ds: Dataset, conf: float, iou: float, max_det: int, desc: str = "evaluating",
           multi_label: bool = True):
    """Detections per image, (n, 6) [x1, y1, x2, y2, conf, cls] in original pixels, and per-image latency in ms.

    multi_label as in Ultralytics' validator: a box is kept once per class scoring above ``conf``, so a box whose
    two best classes nearly tie is not lost to the other class by a tiny change of its scores.
    """
    from yoloq.model import yolo

    dets, times = [], []
    nc = max(len(predictor.names), 1)
    x0 = next(iter_batches(ds.take(1), predictor.imgsz))[2]
    predictor.raw(x0)  # warm-up: first ORT run allocates and first torch run builds anchors
    for _, shape, x in track(iter_batches(ds, predictor.imgsz), len(ds.images), desc):
        t = time.perf_counter()
        raw = predictor.raw(x)
        times.append((time.perf_counter() - t) * 1e3)
        d = yolo.postprocess(raw, predictor.end2end, conf, iou, max_det, nc, multi_label)[0]
        if len(d):
            d[:, :4] = yolo.scale_boxes(d[:, :4], x.shape[2:], shape)
        dets.append(d[:, :6].numpy().reshape(-1, 6))
    return dets, np.array(times)


def _coco_eval(gts: list[np.ndarray], dets: list[np.ndarray], max_det: int):
    """COCOeval after evaluate(): gts (n, 5) [cls, x1, y1, x2, y2]; dets (n, 6). None when there is no ground truth."""
    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval

    images, anns, cats = [], [], set()
    for i, g in enumerate(gts):
        images.append({"id": i})
        for c, x1, y1, x2, y2 in g:
            w, h = x2 - x1, y2 - y1
            anns.append({"id": len(anns) + 1, "image_id": i, "category_id": int(c), "bbox": [x1, y1, w, h],
                         "area": w * h, "iscrowd": 0})
            cats.add(int(c))
    if not anns:
        return None
    res = [{"image_id": i, "category_id": int(c), "bbox": [x1, y1, x2 - x1, y2 - y1], "score": s}
           for i, d in enumerate(dets) for x1, y1, x2, y2, s, c in d.tolist()]
    with contextlib.redirect_stdout(io.StringIO()):
        gt = COCO()
        gt.dataset = {"images": images, "annotations": anns, "categories": [{"id": c} for c in sorted(cats)]}
        gt.createIndex()
        if not res:
            return "empty"
        dt = gt.loadRes(res)
        e = COCOeval(gt, dt, "bbox")
        e.params.areaRng, e.params.areaRngLbl = [[0, 1e10]], ["all"]
        e.params.maxDets = [max_det]
        e.evaluate()
    return e


def _summary(e) -> tuple[float, float]:
    with contextlib.redirect_stdout(io.StringIO()):
        e.accumulate()
    p = e.eval["precision"][:, :, :, 0, 0]  # [iou, recall, class]
    valid = p > -1
    m = float(p[valid].mean()) if valid.any() else 0.0
    m50 = float(p[0][valid[0]].mean()) if valid[0].any() else 0.0
    return m, m50


def coco_map(gts, dets, max_det: int = 300, bootstrap: int = 0, seed: int = 0) -> dict | None:
    """{'map': mAP50-95, 'map50': mAP50, 'ci': (lo, hi) of mAP50-95 over `bootstrap` resamples of images}."""
    e = _coco_eval(gts, dets, max_det)
    if e is None:
        return None
    if e == "empty":
        return {"map": 0.0, "map50": 0.0, "ci": (0.0, 0.0)}
    m, m50 = _summary(e)
    out = {"map": m, "map50": m50}
    if bootstrap:
        n_img = len(gts)
        k, a = len(e.params.catIds), len(e.params.areaRng)
        base = e.evalImgs
        rng = np.random.default_rng(seed)
        samples = []
        for _ in range(bootstrap):
            idx = rng.integers(0, n_img, n_img)
            # accumulate() reads evalImgs as [category][area][image]; resampling the image axis resamples images
            e.evalImgs = [base[ki * a * n_img + ai * n_img + j] for ki in range(k) for ai in range(a) for j in idx]
            samples.append(_summary(e)[0])
        e.evalImgs = base
        out["ci"] = (float(np.percentile(samples, 2.5)), float(np.percentile(samples, 97.5)))
    return out


def match_labels(ds: Dataset, model_names: dict[int, str]) -> tuple[list[np.ndarray] | None, str]:
    """Labels re-indexed to the model's classes, keeping the classes both share. (None, why) when they cannot match."""
    if not ds.has_labels:
        return None, "no labels in the data"
    if ds.names is None:
        if all(len(g) == 0 or g[:, 0].max() < len(model_names) for g in ds.labels):
            return ds.labels, "label class names unknown: assumed to use the model's class indices"
        return None, "label classes exceed the model's classes and have no names"
    by_name = {v.lower(): k for k, v in model_names.items()}
    remap = {k: by_name[v.lower()] for k, v in ds.names.items() if v.lower() in by_name}
    if not remap:
        return None, "the labels' class names do not match the model's"
    out = []
    for g in ds.labels:
        keep = np.array([int(c) in remap for c in g[:, 0]], bool) if len(g) else np.zeros(0, bool)
        g = g[keep].copy()
        g[:, 0] = [remap[int(c)] for c in g[:, 0]]
        out.append(g)
    note = "" if len(remap) == len(model_names) else f"mAP over the {len(remap)} of {len(model_names)} model classes the labels name"
    return out, note


def reference_detections(reference, ds: Dataset, iou: float = 0.7, max_det: int = 300) -> dict:
    """The reference model's detections with conf >= REFERENCE_CONF: compute once, pass to evaluate() for many models."""
    dets, times = detect(reference, ds, REFERENCE_CONF, iou, max_det, f"reference {reference.kind}")
    return {"label": reference.label, "dets": dets, "ms_median": float(np.median(times))}


def evaluate(predictor, ds: Dataset, reference=None, conf: float = 0.001, iou: float = 0.7, max_det: int = 300,
             bootstrap: int = 200) -> dict:
    """Report for one model. `reference` is a predictor, or reference_detections() computed beforehand."""
    dets, times = detect(predictor, ds, conf, iou, max_det, f"evaluating {predictor.kind}")
    report = {
        "model": predictor.label,
        "runtime": predictor.kind,
        "images": len(ds.images),
        "imgsz": predictor.imgsz,
        "threads": predictor.threads,
        "ms_median": float(np.median(times)),
        "ms_p90": float(np.percentile(times, 90)),
        "notes": list(ds.notes),
    }
    if getattr(predictor, "seen", None):
        seen = sum(image_digest(p) in predictor.seen for p in ds.images)
        report["seen_images"] = seen
        if seen:
            report["notes"].append(
                f"{seen} of these {len(ds.images)} images were used to calibrate or fine-tune this model: judge it on "
                "images it has not seen (the demo's fine-tuned 4-bit models score 0.1-0.25 higher on their own "
                "images than on new ones; docs/methods.md, 'Scores on seen images')")
    gts, why = match_labels(ds, predictor.names)
    if gts is not None:
        r = coco_map(gts, dets, max_det)
        if r is not None:
            report["map50_95"], report["map50"] = r["map"], r["map50"]
    if why:
        report["notes"].append(why)
    if reference is not None:
        ref = reference if isinstance(reference, dict) else reference_detections(reference, ds, iou, max_det)
        pseudo = [np.concatenate([d[:, 5:6], d[:, :4]], 1) for d in ref["dets"]]
        r = coco_map(pseudo, dets, max_det, bootstrap=bootstrap)
        report["reference"] = ref["label"]
        report["reference_ms_median"] = ref["ms_median"]
        if r is None:
            report["notes"].append("the reference model detects nothing on these images: fidelity undefined")
        else:
            report["fidelity"], report["fidelity_ci"] = r["map"], list(r.get("ci", (r["map"], r["map"])))
    return report
