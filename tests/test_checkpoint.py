import torch

from yoloq import api, checkpoint
from yoloq.core.modules import iter_quantizers
from yoloq.model import yolo

from .conftest import IMGSZ


def test_round_trip_gives_identical_outputs(qckpts, tmp_path):
    path = qckpts["yolo11n.yaml"]
    payload = torch.load(path, weights_only=True)  # plain data and tensors only
    assert payload["format"] == checkpoint.FORMAT and payload["version"] == checkpoint.VERSION
    assert {"source", "created", "calibration_images", "torch", "ultralytics"} <= set(payload["provenance"])
    a = api.load_quantized(path)
    assert all(bool(q.calibrated) for _, q in iter_quantizers(a.model))
    api.save(a, tmp_path / "again.qpt")
    b = api.load_quantized(tmp_path / "again.qpt")
    x = torch.rand(1, 3, IMGSZ, IMGSZ)
    with torch.no_grad(), yolo.export_head(a.model, IMGSZ), yolo.export_head(b.model, IMGSZ):
        assert torch.equal(a.model(x), b.model(x))
