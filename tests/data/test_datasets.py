import json

import cv2
import numpy as np
import pytest

from yoloq.data.datasets import preprocess, resolve_data
from yoloq.errors import YoloqError


def _img(path, h=64, w=96):
    path.parent.mkdir(parents=True, exist_ok=True)
    cv2.imwrite(str(path), np.full((h, w, 3), 128, np.uint8))


def test_yolo_labels_and_yaml(tmp_path):
    root = tmp_path / "ds"
    _img(root / "images" / "val" / "a.jpg")
    (root / "labels" / "val").mkdir(parents=True)
    (root / "labels" / "val" / "a.txt").write_text("1 0.5 0.5 0.5 0.25\n")
    y = tmp_path / "data.yaml"
    y.write_text(f"path: {root}\nval: images/val\nnames: [cat, dog]\n")
    ds = resolve_data(y)
    assert ds.names == {0: "cat", 1: "dog"} and len(ds.images) == 1
    cls, x1, y1, x2, y2 = ds.labels[0][0]
    assert cls == 1 and (x1, y1, x2, y2) == pytest.approx((24, 24, 72, 40))  # 96x64 image, pixels


def test_coco_json_beside_images(tmp_path):
    _img(tmp_path / "train2017" / "000001.jpg")
    _img(tmp_path / "train2017" / "000002.jpg")
    ann = {"images": [{"id": 7, "file_name": "000001.jpg"}, {"id": 8, "file_name": "000002.jpg"}],
           "categories": [{"id": 1, "name": "person"}, {"id": 18, "name": "dog"}],
           "annotations": [{"id": 1, "image_id": 7, "category_id": 18, "bbox": [1, 2, 10, 20], "iscrowd": 0},
                           {"id": 2, "image_id": 7, "category_id": 1, "bbox": [0, 0, 5, 5], "iscrowd": 1}]}
    (tmp_path / "annotations").mkdir()
    (tmp_path / "annotations" / "instances_train2017.json").write_text(json.dumps(ann))
    ds = resolve_data(tmp_path)  # the dataset root: finds the split folder and the json
    assert ds.names == {0: "person", 1: "dog"}
    assert ds.labels[0].tolist() == [[1, 1, 2, 11, 22]]  # crowd box dropped, category re-indexed
    assert len(ds.labels[1]) == 0


def test_plain_images_without_labels(tmp_path):
    _img(tmp_path / "x.png")
    ds = resolve_data(tmp_path)
    assert not ds.has_labels and ds.take(5).images == ds.images


@pytest.mark.parametrize("content", ["", "train: missing\n", "[1, 2]\n"])
def test_bad_yaml(tmp_path, content):
    y = tmp_path / "d.yaml"
    y.write_text(content)
    with pytest.raises(YoloqError):
        resolve_data(y)


def test_letterbox_matches_ultralytics_shape_and_padding():
    img = np.zeros((100, 200, 3), np.uint8)
    x = preprocess(img, 64)
    assert x.shape == (1, 3, 64, 64)
    assert x[0, :, 0, 0].tolist() == pytest.approx([114 / 255] * 3)  # pad rows above the centred image
    assert x[0, :, 32, 32].tolist() == pytest.approx([0, 0, 0])
