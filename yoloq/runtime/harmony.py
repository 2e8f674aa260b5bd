"""Harmony: does a detector's class score say how good its box is? (HQOD's diagnostic.)

For each true positive (TP) the gap is ``|class score - IoU(detection, matched ground truth)|``. A harmonious
detector scores its well-placed boxes high and its loose ones low, so its gaps are small; quantization tends to
spread them. The report holds the gaps' histogram in 10 bins of width 0.1 on [0, 1], the *harmony share* (the
fraction of TPs with gap < 0.1), the mean gap and the number of TPs, and the TPs' mean score and mean IoU, which
say which way a gap lies: against a reference model's detections its own boxes have IoU 1, so a quantized model
with looser boxes can show a smaller gap without scoring any better (docs/methods.md).

- TP: a detection matched to a ground-truth box of its class with IoU >= ``iou_thr`` (0.5), greedily as COCO
  does: per image and class, detections by descending score each take the still unmatched box they overlap most.
- Which detections: all that survive NMS with score > ``conf`` (default 0.001, the threshold mAP uses), not only
  confident ones: HQOD analyses the boxes NMS keeps, and low-score TPs are where score and IoU disagree most. A
  higher ``conf`` (say 0.25, a deployment threshold) describes only what a user would see.
- Ground truth: the labels, re-indexed to the model's classes (``evaluate.match_labels``); without usable labels,
  the reference model's detections with score > 0.25, as fidelity uses them. Then the reference's own harmony is
  undefined (it would be measured against itself) and is not reported.

Detections and ground truth use evaluate.py's formats: per image, (n, 6) ``[x1, y1, x2, y2, score, cls]`` and
(m, 5) ``[cls, x1, y1, x2, y2]`` in pixels.

>>> import numpy as np
>>> gt = [np.array([[0, 0, 0, 100, 100]], np.float32)]
>>> det = [np.array([[0, 0, 100, 85, 0.9, 0]], np.float32)]   # IoU 0.85, score 0.9: gap 0.05
>>> r = harmony(det, gt)
>>> r["tp"], r["share"], r["counts"][:2]
(1, 1.0, [1, 0])
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from yoloq.data.datasets import Dataset
from yoloq.runtime.evaluate import REFERENCE_CONF, detect, match_labels

HARMONY_THRESHOLD = 0.1  # a TP is harmonious when its gap is below this
EDGES = np.linspace(0.0, 1.0, 11)


def match_true_positives(dets: np.ndarray, gt: np.ndarray, iou_thr: float = 0.5) -> tuple[np.ndarray, np.ndarray]:
    """Scores and IoUs of one image's true positives (COCO's greedy matching, class by class).

    ``dets`` (n, 6) [x1, y1, x2, y2, score, cls], ``gt`` (m, 5) [cls, x1, y1, x2, y2].
    """
    from ultralytics.utils.metrics import bbox_ioa

    if not len(dets) or not len(gt):
        return np.zeros(0), np.zeros(0)
    dets = dets[np.argsort(-dets[:, 4], kind="mergesort")].astype(np.float64)
    gt = gt.astype(np.float64)
    ious = bbox_ioa(dets[:, :4], gt[:, 1:5], iou=True)
    ious[np.rint(dets[:, 5:6]) != np.rint(gt[None, :, 0])] = -1.0  # only boxes of the same class match
    taken = np.zeros(len(gt), bool)
    scores, matched = [], []
    for i in np.flatnonzero(ious.max(1) >= iou_thr):  # the others overlap nothing enough: they are FPs
        cand = np.where(taken, -1.0, ious[i])
        j = len(cand) - 1 - int(np.argmax(cand[::-1]))  # on a tie the later box, as pycocotools picks
        if cand[j] >= iou_thr:
            taken[j] = True
            scores.append(dets[i, 4])
            matched.append(ious[i, j])
    return np.array(scores), np.array(matched)


def harmony(detections: list[np.ndarray], ground_truth: list[np.ndarray], iou_thr: float = 0.5,
            conf: float = 0.001) -> dict:
    """Harmony of detections against ground truth, image by image (lists of equal length).

    Returns ``{"tp", "share", "mean_gap", "mean_score", "mean_iou", "counts", "edges", "iou_thr", "conf"}``:
    ``counts`` are the TPs per bin of ``edges`` (width 0.1 on [0, 1]); ``share`` (TPs with gap < 0.1) and the means
    are None when there is no TP.
    """
    if len(detections) != len(ground_truth):
        raise ValueError(f"{len(detections)} images of detections but {len(ground_truth)} of ground truth")
    scores, ious = [np.zeros(0)], [np.zeros(0)]
    for d, g in zip(detections, ground_truth):
        d = np.asarray(d).reshape(-1, 6)
        s, u = match_true_positives(d[d[:, 4] > conf], np.asarray(g).reshape(-1, 5), iou_thr)
        scores.append(s)
        ious.append(u)
    scores, ious = np.concatenate(scores), np.concatenate(ious)
    gaps = np.abs(scores - ious)
    counts, _ = np.histogram(gaps, EDGES)
    n = len(gaps)
    return {
        "tp": n,
        "share": float(np.mean(gaps < HARMONY_THRESHOLD)) if n else None,
        "mean_gap": float(gaps.mean()) if n else None,
        "mean_score": float(scores.mean()) if n else None,
        "mean_iou": float(ious.mean()) if n else None,
        "counts": counts.tolist(),
        "edges": [round(float(e), 1) for e in EDGES],
        "iou_thr": iou_thr,
        "conf": conf,
    }


def plot_harmony(reports: dict[str, dict], path: str | Path) -> Path:
    """Side-by-side bars of each report's gap histogram (as a share of its TPs), written atomically as a PNG.

    ``reports`` maps a legend label to a harmony() report, e.g. ``{"FP32": h_ref, "W8A8": h_q}``.
    """
    from matplotlib.figure import Figure  # a bare Figure: Agg canvas, no pyplot state, no display needed

    from yoloq.io import atomic_path

    if not reports:
        raise ValueError("plot_harmony needs at least one report")
    fig = Figure(figsize=(8, 4.5), layout="constrained")
    ax = fig.subplots()
    x = np.arange(len(EDGES) - 1)
    width = 0.8 / len(reports)
    for k, (label, r) in enumerate(reports.items()):
        counts = np.asarray(r["counts"], float)
        frac = counts / r["tp"] if r["tp"] else counts
        desc = (f"harmony share {r['share']:.3f} of {r['tp']} TPs (mean score {r['mean_score']:.2f}, "
                f"IoU {r['mean_iou']:.2f})" if r["tp"] else "no true positives")
        ax.bar(x + (k - (len(reports) - 1) / 2) * width, frac, width, label=f"{label}: {desc}")
    ax.set_xticks(x, [f"{a:.1f}-{b:.1f}" for a, b in zip(EDGES[:-1], EDGES[1:])], fontsize=8)
    ax.set_xlabel("|class score - IoU| of true positives")
    ax.set_ylabel("share of true positives")
    ax.set_ylim(0, 1)
    ax.set_title(f"Harmony of score and box quality (TP: IoU >= {next(iter(reports.values()))['iou_thr']})")
    ax.legend(fontsize=8)
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=120)
    return Path(path)


def reference_run(reference, ds: Dataset, conf: float, iou: float = 0.7, max_det: int = 300) -> dict:
    """The reference's detections at score > min(conf, 0.25), once: low enough for its own harmony, and
    ``for_fidelity()`` takes those above 0.25 out of them, which are the boxes a run at 0.25 gives (NMS keeps a box
    because of the higher-scoring boxes alone, all above 0.25 too), so the reference runs once, not twice."""
    c = min(conf, REFERENCE_CONF)
    dets, times = detect(reference, ds, c, iou, max_det, f"reference {reference.kind}")
    return {"label": reference.label, "names": reference.names, "dets": dets, "conf": c,
            "ms_median": float(np.median(times))}


def for_fidelity(run: dict) -> dict:
    """What evaluate.reference_detections() returns, out of a reference_run()."""
    return {"label": run["label"], "dets": [d[d[:, 4] > REFERENCE_CONF] for d in run["dets"]],
            "ms_median": run["ms_median"]}


def check_ground_truth(ds: Dataset, names: dict[int, str], have_reference: bool) -> None:
    """Raise YoloqError unless harmony has ground truth: labels matching ``names``, or a reference model."""
    from yoloq.errors import YoloqError

    gts, why = match_labels(ds, names)
    if gts is None and not have_reference:
        raise YoloqError(f"--harmony needs ground truth: {why}; give --reference to use its detections instead")


def harmony_section(dets: list[np.ndarray], names: dict[int, str], ds: Dataset, reference: dict | None = None,
                    conf: float = 0.001, iou_thr: float = 0.5) -> dict:
    """The "harmony" part of an eval report: the model's harmony (its ``dets`` at score > ``conf``) and, given a
    reference_run() and labels, the reference's. Raises YoloqError when there is no ground truth at all."""
    check_ground_truth(ds, names, reference is not None)
    out = {"iou_thr": iou_thr, "conf": conf, "notes": []}
    gts, _ = match_labels(ds, names)
    if gts is not None:
        out["ground_truth"] = "labels"
    else:
        gts = [np.concatenate([d[:, 5:6], d[:, :4]], 1) for d in for_fidelity(reference)["dets"]]
        out["ground_truth"] = f"reference detections (score > {REFERENCE_CONF})"
    out["model"] = harmony(dets, gts, iou_thr, conf)
    out["reference"] = None
    if reference is not None:
        ref_gts, ref_why = match_labels(ds, reference["names"])
        if ref_gts is None:
            out["notes"].append(f"reference harmony not computed: {ref_why} (only the evaluated model's harmony "
                                "against the reference's detections is defined)")
        else:
            out["reference"] = harmony(reference["dets"], ref_gts, iou_thr, conf)
    return out
