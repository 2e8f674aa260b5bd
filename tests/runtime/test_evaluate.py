import numpy as np
import pytest

from yoloq.data.datasets import Dataset, resolve_data
from yoloq.runtime.evaluate import coco_map, match_labels

GT = [np.array([[0, 10, 10, 50, 50], [1, 60, 60, 90, 100]], np.float32), np.array([[0, 5, 5, 25, 45]], np.float32)]


def _dets(gts, shift=0.0, score=0.9):
    return [np.array([[x1 + shift, y1, x2 + shift, y2, score, c] for c, x1, y1, x2, y2 in g], np.float32) for g in gts]


def test_perfect_detections_score_one_and_shifted_less():
    assert coco_map(GT, _dets(GT))["map"] == pytest.approx(1.0)
    shifted = coco_map(GT, _dets(GT, shift=6.0))
    assert 0 < shifted["map"] < 0.9 and shifted["map50"] == pytest.approx(1.0)


def test_wrong_class_and_no_detections():
    wrong = [np.array([[x1, y1, x2, y2, 0.9, 1 - c] for c, x1, y1, x2, y2 in g], np.float32) for g in GT]
    assert coco_map(GT, wrong)["map"] == pytest.approx(0.0)
    assert coco_map(GT, [np.zeros((0, 6), np.float32)] * 2)["map"] == 0.0
    assert coco_map([np.zeros((0, 5))] * 2, _dets(GT)) is None


def test_bootstrap_interval_brackets_the_estimate():
    rng = np.random.default_rng(1)
    gts = [np.array([[0, *(b := rng.uniform(0, 100, 2)), *(b + rng.uniform(10, 40, 2))]], np.float32) for _ in range(30)]
    dets = _dets(gts, shift=0.0)
    for d in dets[::3]:
        d[:, :4] += 8  # a third of the images get poor boxes
    r = coco_map(gts, dets, bootstrap=100)
    lo, hi = r["ci"]
    assert lo <= r["map"] <= hi and hi - lo > 0.01


def test_labels_are_matched_to_model_classes_by_name():
    ds = Dataset(images=[], labels=[np.array([[0, 1, 1, 2, 2], [1, 3, 3, 4, 4]], np.float32)], names={0: "dog", 1: "Person"})
    out, note = match_labels(ds, {0: "person", 1: "fall"})
    assert out[0].tolist() == [[0, 3, 3, 4, 4]] and "1 of 2" in note
    none, why = match_labels(ds, {0: "car"})
    assert none is None and "do not match" in why


def test_a_box_is_kept_once_per_class_above_conf_as_ultralytics_validates():
    import torch

    from yoloq.model import yolo

    # one anchor at (50, 50), 20x20, scoring 0.6 for class 0 and 0.5 for class 1, in Ultralytics' (1, 4+nc, n) layout
    raw = torch.tensor([[[50.0], [50.0], [20.0], [20.0], [0.6], [0.5]]])
    multi = yolo.postprocess(raw, False, 0.25, 0.7, 300, 2)[0]
    single = yolo.postprocess(raw, False, 0.25, 0.7, 300, 2, multi_label=False)[0]
    assert sorted(multi[:, 5].tolist()) == [0.0, 1.0] and sorted(multi[:, 4].tolist()) == pytest.approx([0.5, 0.6])
    assert single[:, 5].tolist() == [0.0] and single[:, 4].tolist() == pytest.approx([0.6])
    assert yolo.postprocess(raw, False, 0.55, 0.7, 300, 2)[0].shape[0] == 1  # the second class is under conf


def test_eval_says_how_many_images_the_model_was_calibrated_on(qckpts, images_dir, tmp_path):
    """Images are known by content (a renamed copy counts as seen), and the exported ONNX carries them."""
    import shutil

    from yoloq import api
    from yoloq.runtime.evaluate import evaluate
    from yoloq.runtime.predictors import load_predictor

    qckpt = qckpts["yolov8n.yaml"]  # calibrated on all four images
    onnx = tmp_path / "m.onnx"
    api.export(str(qckpt), onnx)
    data = tmp_path / "data"
    data.mkdir()
    shutil.copy(images_dir / "bus.jpg", data / "renamed.jpg")
    (data / "new.jpg").write_bytes((images_dir / "zidane.jpg").read_bytes() + b"\0")  # other bytes: a new image
    ds = resolve_data(str(data))
    for model in (qckpt, onnx):
        rep = evaluate(load_predictor(str(model)), ds)
        assert rep["seen_images"] == 1, model
        assert any(n.startswith("1 of these 2 images were used to calibrate or fine-tune") for n in rep["notes"])
    float_rep = evaluate(load_predictor("yolov8n.yaml", imgsz=rep["imgsz"]), ds)
    assert "seen_images" not in float_rep and not any("fine-tune" in n for n in float_rep["notes"])
