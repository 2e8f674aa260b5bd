"""ONNX Runtime parity is a contract: the exported QDQ graph computes what the PyTorch fake-quant model computes.

- per layer: given identical inputs, ORT and PyTorch agree within one quantization step of the layer's output;
- whole model: >= 99% of the head-conv outputs agree within one step, with ORT's optimizations off and on
  (an element-wise bound over the whole depth does not hold: one-step differences compound);
- on a model that really detects (slow: the demo model), ORT's fidelity against the exact (float64) fake-quant
  numerics is as high as PyTorch float32's, within noise (see NOISE for why not the 0.99 first asked for).
"""

from __future__ import annotations

import copy

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from onnx import TensorProto, helper

from yoloq import api
from yoloq.core.modules import QConv2d, iter_quantizers
from yoloq.data.datasets import iter_batches, resolve_data
from yoloq.model import yolo

from ..conftest import FAMILIES, IMGSZ, ort_optimized

LEVELS = {"disable_all": ort.GraphOptimizationLevel.ORT_DISABLE_ALL, "enable_all": ort.GraphOptimizationLevel.ORT_ENABLE_ALL}


def _session(path, level):
    so = ort.SessionOptions()
    so.graph_optimization_level = LEVELS[level]
    so.log_severity_level = 3
    return ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])


def _run_layer_in_ort(layer, x, path, level):
    """One quantized layer exported as QDQ and run in ORT on x."""
    for q in layer.quantizers().values():
        q.export_mode = "qdq"
    torch.onnx.export(layer, x, str(path), opset_version=17, input_names=["x"], output_names=["y"], dynamo=False)
    return _session(path, level).run(None, {"x": x.numpy()})[0]


@pytest.mark.parametrize("level", LEVELS)
def test_single_layer_parity_within_one_step(level, qckpts, tmp_path):
    qm = api.load_quantized(qckpts["yolov8n.yaml"])
    layer = copy.deepcopy(qm.model.model[1])  # a trunk conv: input from layer 0, 3x3 stride 2
    assert isinstance(layer, QConv2d)
    layer.input_quantizer = copy.deepcopy(qm.model.model[0].output_quantizer)  # feed it quantized inputs, as in the model
    x = torch.rand(1, layer.conv.in_channels, 24, 24) * 3 - 0.3
    ref = layer(x).detach().numpy()
    got = _run_layer_in_ort(layer, x, tmp_path / "layer.onnx", level)
    step = float(layer.output_quantizer.scale)
    assert np.abs(got - ref).max() <= step * 1.001
    assert (np.abs(got - ref) < 1e-6).mean() > 0.95  # mostly identical, not just close


@pytest.mark.parametrize("level", LEVELS)
def test_first_conv_parity_on_bright_images(level, qckpts, tmp_path):
    # pixel codes near 255 times the first conv's largest 8-bit weights: where full-range int8 weights overflow the
    # int16 pair sums of ORT's u8s8 kernels on CPUs without VNNI (full-range codes: 53 steps off on an AVX2 EPYC)
    qm = api.load_quantized(qckpts["yolov8n.yaml"])
    layer = copy.deepcopy(qm.model.model[0])
    x = (0.9 + 0.1 * torch.rand(1, 3, 32, 32, generator=torch.Generator().manual_seed(0))).clamp(max=1.0)
    x[..., :8, :] = 1.0
    ref = layer(x).detach().numpy()
    got = _run_layer_in_ort(layer, x, tmp_path / "first.onnx", level)
    # a float tie can flip one pre-SiLU code, which SiLU (slope <= 1.1) passes on: here about two output steps
    assert np.abs(got - ref).max() <= 1.1 * float(layer.acc_quantizer.scale) * 1.001
    assert (np.abs(got - ref) < 1e-6).mean() > 0.99  # saturation moved 90% of the outputs, by up to 84 steps


def _head_outputs(model, graph_names: set[str]):
    """(ONNX tensor name, PyTorch module) for the head's final convs: the exporter names scopes '.../cv3.0.2/...'."""
    head = model.model[-1]
    finals = [seq[-1] for branch in yolo.head_branches(model).values() for seq in branch]
    pairs = []
    for rel, m in head.named_modules():
        if any(m is f for f in finals):
            suffix = f"/{rel}/Conv_output_0"
            hits = [n for n in graph_names if n.endswith(suffix)]
            assert len(hits) == 1, f"{suffix}: {hits}"
            pairs.append((hits[0], m))
    assert len(pairs) == 6
    return pairs


def _head_agreement(qm, level, images_dir, tmp_path) -> float:
    """Share of the head's final-conv outputs on which ORT and PyTorch agree within one 8-bit step of their range."""
    path = tmp_path / "m.onnx"
    api.export(qm, path)
    m = onnx.load(str(path))
    pairs = _head_outputs(qm.model, {o for n in m.graph.node for o in n.output})
    for n, _ in pairs:
        m.graph.output.append(helper.make_tensor_value_info(n, TensorProto.FLOAT, None))
    onnx.save(m, str(tmp_path / "probe.onnx"))
    sess = _session(tmp_path / "probe.onnx", level)
    captured = {}
    hooks = [mod.register_forward_hook(lambda mod, i, o, n=n: captured.__setitem__(n, o.detach().numpy())) for n, mod in pairs]
    agree, total = 0, 0
    with torch.no_grad(), yolo.export_head(qm.model, IMGSZ):
        for _, _, x in iter_batches(resolve_data(images_dir), IMGSZ):
            qm.model(x)
            outs = sess.run([n for n, _ in pairs], {"images": x.numpy()})
            for (n, mod), got in zip(pairs, outs):
                ref = captured[n]
                step = (ref.max() - ref.min()) / 255  # the head's outputs are float: an 8-bit step of their range
                close = np.abs(got - captured[n]) <= step * 1.001
                agree += close.sum()
                total += close.size
    for h in hooks:
        h.remove()
    return agree / total


@pytest.mark.parametrize("fam", FAMILIES)
@pytest.mark.parametrize("level", LEVELS)
def test_head_conv_outputs_agree_within_one_step(fam, level, qckpts, images_dir, tmp_path):
    assert _head_agreement(api.load_quantized(qckpts[fam]), level, images_dir, tmp_path) >= 0.99


@pytest.mark.parametrize("level", LEVELS)
def test_w4a4_with_shared_concat_grids_agrees_and_keeps_concats_int8(level, images_dir, tmp_path):
    from yoloq.recipe import Recipe

    qm = api.calibrate("yolo11n.yaml", str(images_dir), Recipe(4, 4, "mse", images=4, imgsz=IMGSZ, share_concat_grids=True))
    assert sum(q.shared for _, q in iter_quantizers(qm.model)) >= 8
    assert _head_agreement(qm, level, images_dir, tmp_path) >= 0.99
    # a shared quantizer's consumer gets no Clip (its inputs already lie on the grid), so ORT runs the Concat in int8
    ops = ort_optimized(tmp_path / "m.onnx", tmp_path)[1]
    inner = sum(1 for x in qm.model.modules() if yolo._concat_parts(x) is not None)
    assert ops["QLinearConcat"] >= inner, ops


# The fake-quant model is chaotic in its rounding: where a float sum lands within an ulp of a rounding boundary, a
# different summation order flips that code by one step, and the flips compound through the depth. So no
# implementation that is not bit-identical to PyTorch's own kernels reaches the 0.99 fidelity against it,
# PyTorch included: on the demo model (W8A8, 320px, 48 images) PyTorch with 1 thread instead of 2 scores 0.959
# against itself. Against the exact numerics (the same fake-quant model in float64; 64 images): PyTorch float32
# 0.956, ORT DISABLE_ALL 0.952, ORT ENABLE_ALL 0.951 (0.946 while biases were exported as floats), and 0.891 when one conv's weight scales are 10% off in the
# ONNX file. The contract is therefore relative: ORT is as close to the exact fake-quant numerics as PyTorch's
# float32 is, within NOISE; an export error in a single layer falls outside it.
NOISE = 0.04
PARITY_IMAGES = 64


class _Float64Predictor:
    """The fake-quant model evaluated in float64: rounding ties resolved by the exact values, not a kernel's order."""

    def __init__(self, model, imgsz):
        from yoloq.runtime.predictors import TorchPredictor

        self._p = TorchPredictor(copy.deepcopy(model).double(), imgsz, 2, "fake-quant float64")
        self.__dict__.update({k: getattr(self._p, k) for k in ("imgsz", "names", "end2end", "threads", "label", "kind")})

    def raw(self, x):
        return self._p.raw(x.double())


@pytest.fixture(scope="module")
def parity_case(demo_model, detection_images, tmp_path_factory):
    from yoloq.recipe import Recipe
    from yoloq.runtime.evaluate import evaluate, reference_detections
    from yoloq.runtime.predictors import TorchPredictor

    ds = resolve_data(detection_images).take(PARITY_IMAGES)
    qm = api.calibrate(demo_model, ds.take(8), Recipe(8, 8, "mse", images=8, imgsz=320))
    path = tmp_path_factory.mktemp("parity") / "m.onnx"
    api.export(qm, path)
    exact = reference_detections(_Float64Predictor(qm.model, 320), ds)
    floor = evaluate(TorchPredictor(qm.model, 320, 2, "fake-quant float32"), ds, exact, bootstrap=0)["fidelity"]
    print(f"PyTorch float32 vs float64 fidelity: {floor:.4f}")
    return ds, path, exact, floor


def _ort_fidelity(path, ds, exact, optimize: bool) -> float:
    from yoloq.runtime.evaluate import evaluate
    from yoloq.runtime.predictors import OrtPredictor

    return evaluate(OrtPredictor(path, threads=2, optimize=optimize), ds, exact, bootstrap=0)["fidelity"]


@pytest.mark.slow
@pytest.mark.parametrize("level", LEVELS)
def test_ort_is_as_close_to_the_exact_fake_quant_as_pytorch(level, parity_case):
    ds, path, exact, floor = parity_case
    fid = _ort_fidelity(path, ds, exact, level == "enable_all")
    print(f"ORT ({level}) vs float64 fake-quant fidelity: {fid:.4f}")
    assert fid >= floor - NOISE


@pytest.mark.slow
def test_parity_contract_catches_one_wrong_layer(parity_case, tmp_path):
    """The relative contract can fail: one mid-depth conv's weight scales 10% off in the ONNX file fall outside it."""
    ds, path, exact, floor = parity_case
    m = onnx.load(str(path))
    consts = {n.output[0]: n for n in m.graph.node if n.op_type == "Constant"}
    weight_dq = [n for n in m.graph.node if n.op_type == "DequantizeLinear" and any(a.name == "axis" for a in n.attribute)]
    scale = consts[weight_dq[len(weight_dq) // 3].input[1]].attribute[0].t
    arr = onnx.numpy_helper.to_array(scale) * 1.1
    scale.CopyFrom(onnx.numpy_helper.from_array(arr.astype(np.float32), scale.name))
    onnx.save(m, str(tmp_path / "broken.onnx"))
    fid = _ort_fidelity(tmp_path / "broken.onnx", ds, exact, True)
    print(f"ORT with one layer's weight scales x1.1: {fid:.4f}")
    assert fid < floor - NOISE


@pytest.mark.parametrize("level", LEVELS)
def test_whole_model_parity_with_nonzero_biases(level, lively_model, images_dir, tmp_path):
    """The tiny models fold BN into all-zero biases, which hid the bias export; real models have nonzero ones.

    Before biases were rounded to ORT's int32 grid in PyTorch, ORT with optimizations on was off by ~90 px here."""
    from yoloq.recipe import Recipe

    qm = api.calibrate(lively_model, str(images_dir), Recipe(4, 4, "mse", bias_correction=False,
                                                              weight_rounding="nearest", images=2, imgsz=IMGSZ))
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for m in qm.model.modules():
            if isinstance(m, QConv2d) and m.conv.bias is not None:
                m.conv.bias.add_(torch.randn(m.conv.bias.shape, generator=g) * 1e-3)
    api.export(qm, tmp_path / "m.onnx", imgsz=IMGSZ)
    x = torch.rand(1, 3, IMGSZ, IMGSZ, generator=g)
    with torch.no_grad():
        ref = qm.model(x)[0].numpy()
    got = _session(tmp_path / "m.onnx", level).run(None, {"images": x.numpy()})[0]
    assert np.abs(got - ref).max() < 1.0  # boxes in pixels, scores in [0, 1]


@pytest.mark.parametrize("fam", FAMILIES)
def test_every_quantized_conv_exports_an_int32_bias_on_its_input_grid(fam, qckpts, tmp_path):
    """Where a Conv reads DequantizeLinear input and weights, ORT needs an int32 bias in units of s_in * s_w: the
    export writes one (so ORT rounds nothing itself), on the grid of the very DQ that feeds the Conv."""
    from onnx import numpy_helper

    api.export(api.load_quantized(qckpts[fam]), tmp_path / "m.onnx", imgsz=IMGSZ)
    g = onnx.load(str(tmp_path / "m.onnx")).graph
    consts = {i.name: numpy_helper.to_array(i) for i in g.initializer}
    consts.update({n.output[0]: numpy_helper.to_array(n.attribute[0].t) for n in g.node if n.op_type == "Constant"})
    producer = {o: n for n in g.node for o in n.output}
    checked = 0
    for conv in (n for n in g.node if n.op_type == "Conv"):
        x, w = producer.get(conv.input[0]), producer.get(conv.input[1])
        if not (x and w and x.op_type == w.op_type == "DequantizeLinear") or len(conv.input) < 3:
            continue
        b = producer.get(conv.input[2])
        assert b is not None and b.op_type == "DequantizeLinear", f"{conv.name}: float bias"
        assert consts[b.input[0]].dtype == np.int32
        expect = np.float32(consts[x.input[1]]) * consts[w.input[1]].astype(np.float32)
        np.testing.assert_allclose(consts[b.input[1]], expect, rtol=1e-6, err_msg=conv.name)
        checked += 1
    assert checked >= 50
