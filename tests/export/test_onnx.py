"""Exported files: Ultralytics can run them; fake and QDQ graphs agree; int4 packing."""

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch

from yoloq import api
from yoloq.recipe import Recipe

from ..conftest import IMGSZ, ort_optimized


def test_ultralytics_runs_the_export(qckpts, images_dir, tmp_path):
    from ultralytics import YOLO

    out = tmp_path / "m.onnx"
    api.export(qckpts["yolov8n.yaml"], out)
    meta = {p.key: p.value for p in onnx.load(str(out)).metadata_props}
    assert meta["task"] == "detect" and "names" in meta and meta["imgsz"] == f"[{IMGSZ}, {IMGSZ}]"
    res = YOLO(str(out), task="detect").predict(str(images_dir / "bus.jpg"), imgsz=IMGSZ, verbose=False)
    assert len(res) == 1 and res[0].boxes is not None


def test_end2end_output_layout(qckpts, tmp_path):
    out = tmp_path / "m.onnx"
    api.export(qckpts["yolo26n.yaml"], out)
    s = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"])
    y = s.run(None, {"images": np.zeros((1, 3, IMGSZ, IMGSZ), np.float32)})[0]
    assert y.shape[0] == 1 and y.shape[2] == 6  # (batch, max_det, [x1, y1, x2, y2, score, class])


def test_fake_and_qdq_agree(qckpts, tmp_path):
    for fmt in ("qdq", "fake"):
        api.export(qckpts["yolov8n.yaml"], tmp_path / f"{fmt}.onnx", fmt=fmt)
    x = {"images": np.random.default_rng(0).random((1, 3, IMGSZ, IMGSZ), dtype=np.float32)}
    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    a = ort.InferenceSession(str(tmp_path / "qdq.onnx"), so, providers=["CPUExecutionProvider"]).run(None, x)[0]
    b = ort.InferenceSession(str(tmp_path / "fake.onnx"), so, providers=["CPUExecutionProvider"]).run(None, x)[0]
    assert np.abs(a - b).max() < 1e-3
    ops = {n.op_type for n in onnx.load(str(tmp_path / "fake.onnx")).graph.node}
    assert "QuantizeLinear" not in ops and "Round" in ops


def test_int4_packing(images_dir, tmp_path):
    qm = api.calibrate("yolov8n.yaml", str(images_dir), Recipe(4, 8, "minmax", images=2, imgsz=IMGSZ))
    api.export(qm, tmp_path / "i8.onnx")
    rep = api.export(qm, tmp_path / "i4.onnx", pack="int4")
    m = onnx.load(str(tmp_path / "i4.onnx"))
    assert rep["int4_tensors"] > 50 and any(i.data_type == onnx.TensorProto.INT4 for i in m.graph.initializer)
    assert (tmp_path / "i4.onnx").stat().st_size < 0.7 * (tmp_path / "i8.onnx").stat().st_size
    x = {"images": np.random.default_rng(0).random((1, 3, IMGSZ, IMGSZ), dtype=np.float32)}
    a = ort.InferenceSession(str(tmp_path / "i8.onnx"), providers=["CPUExecutionProvider"]).run(None, x)[0]
    b = ort.InferenceSession(str(tmp_path / "i4.onnx"), providers=["CPUExecutionProvider"]).run(None, x)[0]
    assert np.abs(a - b).max() < 1e-3


def test_low_bit_activations_stay_in_range(qckpts, images_dir, tmp_path):
    qm = api.calibrate("yolov8n.yaml", str(images_dir), Recipe(4, 4, "mse", images=2, imgsz=IMGSZ))
    out = tmp_path / "m.onnx"
    api.export(qm, out)
    g = onnx.load(str(out)).graph
    producer = {o: n for n in g.node for o in n.output}
    users = {}
    for n in g.node:
        for i in n.input:
            users.setdefault(i, []).append(n)
    clips = [n for n in g.node if n.op_type == "Clip"]
    assert clips, "4-bit activations need a Clip on their uint8 codes"
    # on the codes, between Q and DQ: a float Clip in front of the Q would stop ORT's QLinearAdd/QLinearConcat fusion
    for c in clips:
        assert producer[c.input[0]].op_type == "QuantizeLinear", c.name
        assert {u.op_type for u in users[c.output[0]]} == {"DequantizeLinear"}, c.name
    # and ORT runs the residual Adds and the Concats in int8 as it does at W8A8
    api.export(qckpts["yolov8n.yaml"], tmp_path / "w8a8.onnx")
    fused = {}
    for name, path in (("w4a4", out), ("w8a8", tmp_path / "w8a8.onnx")):
        ops = ort_optimized(path, tmp_path)[1]
        fused[name] = (ops["QLinearAdd"], ops["QLinearConcat"], ops["QLinearConv"])
    assert fused["w4a4"] == fused["w8a8"] and min(fused["w4a4"]) > 0, fused
    q = qm.model.model[1].output_quantizer
    x = torch.randn(1000) * 10
    codes = torch.round(q(x) / q.scale + q.zero_point)
    assert codes.min() >= 0 and codes.max() <= 15
