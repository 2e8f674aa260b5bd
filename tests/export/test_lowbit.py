"""4-bit activations at int8 speed: the SiLU output needs no Clip once the accumulator range is capped."""

import numpy as np
import onnx
import torch
from torch import nn

from yoloq.core.functional import silu_inverse
from yoloq.core.modules import QConv2d

from ..conftest import ort_optimized


def _calibrated_layer(seed: int = 0):
    torch.manual_seed(seed)
    m = QConv2d(nn.Conv2d(8, 16, 3, padding=1), nn.SiLU(), weight_bits=4, act_bits=4, observer="mse", input_bits=4)
    xs = [torch.randn(2, 8, 20, 20) * 3 for _ in range(3)]
    qs = [q for q in m.quantizers().values() if not bool(q.calibrated)]
    for q in qs:
        q.observe()
    for x in xs:
        m(x)
    for q in qs:
        if not q.weight:
            q.freeze()
    m.calibrate_weights()
    return m, xs


def test_silu_inverse():
    for y in (0.0, 0.3, 2.0, 17.5):
        a = silu_inverse(y)
        assert abs(a * torch.sigmoid(torch.tensor(a)).item() - y) < 1e-6


def test_bounding_a_bounded_accumulator_again_leaves_it_as_it_is():
    # fine-tuning bounds again every unit it keeps; the zero point's rounding leaves a bounded range a little above
    # its cap, which must not read as a range still to be cut
    for seed in range(8):
        m, _ = _calibrated_layer(seed)
        m.bound_accumulator()
        bounded = m.acc_quantizer.real_range()
        for _ in range(3):
            m.bound_accumulator()
        assert m.acc_quantizer.real_range() == bounded, seed


def test_capped_accumulator_keeps_output_in_range_and_drops_the_clip(tmp_path):
    m, xs = _calibrated_layer()
    out = m.output_quantizer
    acc_top_before = (255 - float(m.acc_quantizer.zero_point)) * float(m.acc_quantizer.scale)
    m.bound_accumulator()
    acc_top = (255 - float(m.acc_quantizer.zero_point)) * float(m.acc_quantizer.scale)
    assert acc_top < acc_top_before  # the cap applied: the 4-bit output clips far below the 8-bit accumulator's top
    assert round(m.max_output() / float(out.scale)) + float(out.zero_point) <= out.spec.qmax

    for q in m.quantizers().values():
        q.export_mode = "qdq"
    path = tmp_path / "l.onnx"
    torch.onnx.export(m, xs[0], str(path), opset_version=17, input_names=["x"], output_names=["y"], dynamo=False)
    clips = [n.name for n in onnx.load(str(path)).graph.node if n.op_type == "Clip"]
    assert clips and all("input_quantizer" in c for c in clips)  # only the input (no producer bound) is clipped

    sess, ops = ort_optimized(path, tmp_path)
    assert ops["QLinearSigmoid"] == 1 and ops["QLinearMul"] == 1
    for q in m.quantizers().values():
        q.export_mode = None
    for x in xs:
        ref = m(x).detach().numpy()
        got = sess.run(None, {"x": x.numpy()})[0]
        assert np.abs(got - ref).max() <= float(out.scale) * 1.001
        codes = np.round(got / float(out.scale) + float(out.zero_point))
        assert codes.max() <= 15  # nothing escaped the 4-bit range without the Clip
