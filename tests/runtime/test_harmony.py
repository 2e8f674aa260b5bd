import json
import shutil

import numpy as np
import pytest
from typer.testing import CliRunner

from yoloq.cli import app
from yoloq.data.datasets import Dataset
from yoloq.runtime.evaluate import _coco_eval
from yoloq.runtime.harmony import (EDGES, for_fidelity, harmony, harmony_section, match_true_positives,
                                   plot_harmony)

from ..test_cli import assert_clean_error

PNG = b"\x89PNG\r\n\x1a\n"


def _det(box, score, cls=0):
    return [*box, score, cls]


def _boxes_with_iou(iou, side=100.0):
    """A gt box and a det box inside it with the given IoU (same x range, shorter height)."""
    return [0.0, 0.0, side, side], [0.0, 0.0, side, side * iou]


def test_known_gaps_bins_and_share():
    g1, d1 = _boxes_with_iou(0.85)  # score 0.9: gap 0.05 -> bin 0
    g2, d2 = _boxes_with_iou(0.75)  # score 0.3: gap 0.45 -> bin 4
    g3, d3 = _boxes_with_iou(0.6)  # score 0.62: gap 0.02 -> bin 0
    off = lambda b, dx: [b[0] + dx, b[1], b[2] + dx, b[3]]  # noqa: E731
    gt = [np.array([[0, *g1], [1, *off(g2, 300)]], np.float32), np.array([[2, *g3]], np.float32)]
    dets = [
        np.array([
            _det(d1, 0.9, 0),
            _det(off(d2, 300), 0.3, 1),
            _det(d1, 0.5, 0),  # a duplicate of the first: its gt is taken, a FP
            _det(off(d2, 300), 0.8, 0),  # right place, wrong class: excluded
            _det([500, 500, 600, 600], 0.95, 0),  # overlaps nothing: FP
            _det([0, 0, 100, 30], 0.7, 0),  # IoU 0.3 < 0.5 with the first gt: FP
        ], np.float32),
        np.array([_det(d3, 0.62, 2)], np.float32),
    ]
    r = harmony(dets, gt)
    assert r["tp"] == 3
    assert r["counts"] == [2, 0, 0, 0, 1, 0, 0, 0, 0, 0]
    assert r["share"] == pytest.approx(2 / 3)
    assert r["mean_gap"] == pytest.approx((0.05 + 0.45 + 0.02) / 3, abs=1e-5)
    # which way the gaps lie: the TPs' own scores and IoUs, not those of the FPs or the wrong-class box
    assert r["mean_score"] == pytest.approx((0.9 + 0.3 + 0.62) / 3, abs=1e-6)
    assert r["mean_iou"] == pytest.approx((0.85 + 0.75 + 0.6) / 3, abs=1e-5)
    assert r["edges"] == [round(float(e), 1) for e in EDGES] and len(r["edges"]) == 11
    assert r["iou_thr"] == 0.5 and r["conf"] == 0.001
    # a stricter TP definition drops the IoU-0.6 match; a higher conf drops the 0.3-score TP
    assert harmony(dets, gt, iou_thr=0.7)["tp"] == 2
    r = harmony(dets, gt, conf=0.4)
    assert r["tp"] == 2 and r["share"] == 1.0


def test_greedy_by_score_and_best_unmatched_gt():
    gt = np.array([[0, 0, 0, 100, 100], [0, 0, 10, 100, 110]], np.float32)  # two overlapping boxes
    # the higher score takes the gt it overlaps most (the first, IoU 1); the lower one gets the second
    dets = np.array([_det([0, 5, 100, 105], 0.4), _det([0, 0, 100, 100], 0.9)], np.float32)
    s, u = match_true_positives(dets, gt)
    assert s.tolist() == pytest.approx([0.9, 0.4])
    assert u[0] == pytest.approx(1.0, abs=1e-6) and u[1] == pytest.approx(95 / 105, abs=1e-6)


def test_no_true_positives():
    gt = [np.array([[0, 0, 0, 10, 10]], np.float32), np.zeros((0, 5), np.float32)]
    r = harmony([np.zeros((0, 6), np.float32), np.array([_det([0, 0, 10, 10], 0.9)], np.float32)], gt)
    assert r["tp"] == 0 and r["share"] is None and r["mean_gap"] is None and r["counts"] == [0] * 10
    assert r["mean_score"] is None and r["mean_iou"] is None
    assert harmony([], [])["tp"] == 0
    with pytest.raises(ValueError, match="images"):
        harmony([np.zeros((0, 6))], [])


def test_matching_agrees_with_pycocotools():
    """TPs at IoU 0.5 are the ones COCOeval matches (its evalImgs' dtMatches), image by image."""
    rng = np.random.default_rng(0)
    gts, dets = [], []
    for _ in range(25):
        g = rng.uniform(0, 200, (rng.integers(0, 6), 2))
        g = np.concatenate([rng.integers(0, 3, (len(g), 1)), g, g + rng.uniform(10, 60, (len(g), 2))], 1)
        d = np.repeat(g[:, 1:5], 3, 0) + rng.normal(0, 6, (3 * len(g), 4))
        d = np.concatenate([d, rng.uniform(0, 250, (4, 4)).cumsum(1)[:, [0, 1, 2, 3]]])  # some strays
        d = np.concatenate([d, rng.uniform(0.01, 1, (len(d), 1)), rng.integers(0, 3, (len(d), 1))], 1)
        gts.append(g.astype(np.float32))
        dets.append(d.astype(np.float32))
    e = _coco_eval(gts, dets, 300)
    coco_scores = sorted(s for ev in e.evalImgs if ev is not None
                         for s, m in zip(ev["dtScores"], ev["dtMatches"][0]) if m > 0)
    ours = sorted(np.concatenate([match_true_positives(d, g)[0] for d, g in zip(dets, gts)]).tolist())
    assert len(ours) > 20
    assert ours == pytest.approx(coco_scores, rel=1e-6)
    assert harmony(dets, gts, conf=0.0)["tp"] == len(coco_scores)


def test_plot_is_a_png(tmp_path):
    h = harmony([np.array([_det([0, 0, 100, 85], 0.9)], np.float32)], [np.array([[0, 0, 0, 100, 100]], np.float32)])
    out = plot_harmony({"FP32": h, "W8A8": harmony([np.zeros((0, 6))], [np.zeros((0, 5))])}, tmp_path / "h.png")
    assert out == tmp_path / "h.png" and out.read_bytes()[:8] == PNG
    assert [p.name for p in tmp_path.iterdir()] == ["h.png"]  # no temp file left
    with pytest.raises(ValueError):
        plot_harmony({}, tmp_path / "x.png")


def _run(label, dets, names={0: "person", 1: "car"}):  # noqa: B006
    return {"label": label, "names": names, "dets": dets, "conf": 0.001, "ms_median": 1.0}


def test_section_uses_labels_and_the_reference_own_harmony():
    g, d = _boxes_with_iou(0.85)
    ds = Dataset(images=[], labels=[np.array([[1, *g]], np.float32)], names={0: "dog", 1: "car"})
    model = [np.array([_det(d, 0.9, 1)], np.float32)]  # class 1 = car in the model's names: matches
    ref = _run("fp32", [np.array([_det(g, 0.99, 1), _det(d, 0.1, 1)], np.float32)])
    h = harmony_section(model, {0: "person", 1: "car"}, ds, ref)
    assert h["ground_truth"] == "labels"
    assert h["model"]["tp"] == 1 and h["model"]["counts"][0] == 1
    assert h["reference"]["tp"] == 1 and h["reference"]["share"] == 1.0  # score 0.99, IoU 1
    assert h["notes"] == []


def test_section_without_labels_uses_reference_detections():
    g, d = _boxes_with_iou(0.55)
    ds = Dataset(images=[], labels=None)
    ref = _run("fp32", [np.array([_det(g, 0.8, 0), _det([300, 300, 400, 400], 0.2, 0)], np.float32)])
    assert [len(x) for x in for_fidelity(ref)["dets"]] == [1]  # score > 0.25 only
    h = harmony_section([np.array([_det(d, 0.8, 0), _det([300, 300, 400, 400], 0.6, 0)], np.float32)],
                        {0: "person"}, ds, ref)
    assert h["ground_truth"].startswith("reference detections")
    assert h["model"]["tp"] == 1 and h["model"]["counts"][2] == 1  # gap |0.8 - 0.55| = 0.25 -> bin 2
    assert h["reference"] is None and "not computed" in h["notes"][0]


def test_section_needs_ground_truth():
    from yoloq.errors import YoloqError

    with pytest.raises(YoloqError, match="ground truth"):
        harmony_section([], {0: "person"}, Dataset(images=[], labels=None))


runner = CliRunner()


def run(*args):
    return runner.invoke(app, [str(a) for a in args])


def test_cli_harmony_without_labels(qckpts, images_dir, tmp_path):
    j = tmp_path / "out.json"
    r = run("eval", qckpts["yolov8n.yaml"], "--data", images_dir, "--reference", "yolov8n.yaml", "--harmony",
            "--json", j)
    assert r.exit_code == 0, r.output
    rep = json.loads(j.read_text())
    h = rep["harmony"]
    assert h["ground_truth"].startswith("reference detections") and h["reference"] is None
    assert set(h["model"]) >= {"tp", "share", "mean_gap", "mean_score", "mean_iou", "counts", "edges"}
    assert len(h["model"]["counts"]) == 10
    assert h["plot"] == str(tmp_path / "out.harmony.png")
    assert (tmp_path / "out.harmony.png").read_bytes()[:8] == PNG
    assert any("reference harmony not computed" in n for n in rep["notes"])
    assert "fidelity" in rep or any("detects nothing" in n for n in rep["notes"])
    assert "harmony" in r.output and "gap < 0.1" in r.output and "mean IoU" in r.output


def test_cli_harmony_with_labels_and_explicit_plot(qckpts, images_dir, tmp_path):
    """Labels without names use the model's class indices: both the model's and the reference's harmony."""
    d = tmp_path / "ds"
    (d / "images").mkdir(parents=True)
    (d / "labels").mkdir()
    for p in sorted(images_dir.iterdir())[:2]:
        shutil.copy(p, d / "images" / p.name)
        (d / "labels" / f"{p.stem}.txt").write_text("0 0.5 0.5 0.4 0.6\n")
    plot = tmp_path / "plots.png"
    j = tmp_path / "r.json"
    r = run("eval", qckpts["yolov8n.yaml"], "--data", d / "images", "--reference", "yolov8n.yaml", "--harmony",
            "--harmony-plot", plot, "--json", j)
    assert r.exit_code == 0, r.output
    h = json.loads(j.read_text())["harmony"]
    assert h["ground_truth"] == "labels" and h["reference"] is not None and h["model"]["tp"] >= 0
    assert plot.read_bytes()[:8] == PNG and not (tmp_path / "r.harmony.png").exists()


def test_cli_harmony_errors(qckpts, images_dir, tmp_path):
    q = qckpts["yolov8n.yaml"]
    assert_clean_error(run("eval", q, "--data", images_dir, "--reference", "yolov8n.yaml", "--harmony",
                           "--harmony-plot", tmp_path / "nodir" / "h.png"), "does not exist")
    assert_clean_error(run("eval", q, "--data", images_dir, "--harmony"), "ground truth")
    assert_clean_error(run("eval", q, "--data", images_dir, "--harmony-plot", tmp_path / "h.png"), "--harmony")
    assert not list(tmp_path.rglob("*.png"))


@pytest.mark.slow
def test_reference_run_reproduces_reference_detections(demo_model, detection_images):
    """The low-conf reference pass, cut at 0.25, gives the boxes a pass at 0.25 gives (so fidelity is unchanged)."""
    from yoloq.runtime.evaluate import reference_detections
    from yoloq.runtime.harmony import reference_run
    from yoloq.runtime.predictors import load_predictor
    from yoloq.data.datasets import resolve_data

    ds = resolve_data(detection_images).take(6)
    ref = load_predictor(demo_model, 2, 320)
    direct = reference_detections(ref, ds)["dets"]
    run_ = reference_run(ref, ds, 0.001)
    assert sum(len(x) for x in run_["dets"]) > sum(len(x) for x in direct) > 0
    for a, b in zip(for_fidelity(run_)["dets"], direct):
        np.testing.assert_allclose(a, b, atol=1e-4)
    # the model against itself: every reference box above 0.25 is a TP of the low-conf detections
    h = harmony_section(run_["dets"], ref.names, Dataset(images=ds.images, labels=None), run_)
    assert h["model"]["tp"] == sum(len(x) for x in direct)
