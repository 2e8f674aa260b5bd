import torch

from yoloq import api, checkpoint
from yoloq.core.modules import QConv2d, iter_quantizers
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


def test_eight_bit_weight_codes_are_reduced_range(qckpts):
    qm = api.load_quantized(qckpts["yolov8n.yaml"])
    assert qm.recipe.weight_reduce_range
    convs = [m for m in qm.model.modules() if isinstance(m, QConv2d)]
    assert convs and all(m.weight_quantizer.spec.qrange == (-64, 64) for m in convs)
    codes = torch.cat([m.weight_quantizer.int_repr(m.conv.weight).flatten().float() for m in convs])
    assert codes.abs().max() == 64  # the grid is used to its end, not just bounded


def test_version_2_checkpoint_loads_with_full_range_weights(qckpts, tmp_path):
    payload = torch.load(qckpts["yolov8n.yaml"], weights_only=True)
    payload["version"] = 2
    del payload["recipe"]["weight_reduce_range"]
    torch.save(payload, tmp_path / "v2.qpt")
    qm = api.load_quantized(tmp_path / "v2.qpt")
    assert not qm.recipe.weight_reduce_range
    assert all(m.weight_quantizer.spec.qrange == (-128, 127) for m in qm.model.modules() if isinstance(m, QConv2d))


def test_version_3_checkpoint_loads_with_a_grid_per_concat_input(images_dir, tmp_path):
    """Before version 4 every Concat input had its own quantizer: loading one must not tie them (the saved producer
    and consumer ranges differ, and a tied model would keep only one of them)."""
    from yoloq.recipe import Recipe

    qm = api.calibrate("yolov8n.yaml", str(images_dir), Recipe(4, 4, "mse", images=2, imgsz=64))
    api.save(qm, tmp_path / "untied.qpt")
    payload = torch.load(tmp_path / "untied.qpt", weights_only=True)
    payload["version"] = 3
    del payload["recipe"]["share_concat_grids"]
    torch.save(payload, tmp_path / "v3.qpt")
    back = api.load_quantized(tmp_path / "v3.qpt")
    assert not back.recipe.share_concat_grids
    c2f = back.model.model[2]
    assert c2f.cv1.output_quantizer is not c2f.cv2.input_quantizer
    assert float(c2f.cv1.output_quantizer.scale) == float(qm.model.model[2].cv1.output_quantizer.scale)
    assert float(c2f.cv1.output_quantizer.scale) != float(c2f.cv2.input_quantizer.scale)
    # and a version-4 W4A4 checkpoint comes back tied, with the calibrated shared range
    tied = api.calibrate("yolov8n.yaml", str(images_dir), Recipe(4, 4, "mse", images=2, imgsz=64,
                                                                share_concat_grids=True))
    api.save(tied, tmp_path / "tied.qpt")
    c2f = api.load_quantized(tmp_path / "tied.qpt").model.model[2]
    assert c2f.cv1.output_quantizer is c2f.cv2.input_quantizer
    assert float(c2f.cv2.input_quantizer.scale) == float(tied.model.model[2].cv2.input_quantizer.scale)
