"""SparseQuantizer in ONNX: Clip -> two Q/DQ branches joined by an Add, and ORT computes what PyTorch does."""

from __future__ import annotations

import collections

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from torch import nn

from yoloq.core.modules import iter_quantizers
from yoloq.core.sparse import SparseQuantizer

LEVELS = {
    "disable_all": ort.GraphOptimizationLevel.ORT_DISABLE_ALL,
    "enable_all": ort.GraphOptimizationLevel.ORT_ENABLE_ALL,
}


class _Net(nn.Module):
    """conv -> SiLU -> SparseQuantizer -> conv; returns the quantized activation too, to compare it directly."""

    def __init__(self) -> None:
        super().__init__()
        self.c1, self.act, self.q = nn.Conv2d(3, 8, 3, padding=1), nn.SiLU(), SparseQuantizer(4)
        self.c2 = nn.Conv2d(8, 4, 1)

    def forward(self, x):
        y = self.q(self.act(self.c1(x)))
        return y, self.c2(y)


def _batch(g: torch.Generator) -> torch.Tensor:
    # 1% of the inputs ten times larger: the SiLU output gets a long tail for the sparse branch
    x = torch.randn(2, 3, 16, 16, generator=g)
    return torch.where(torch.rand(x.shape, generator=g) < 0.01, 10 * x, x)


@pytest.fixture(scope="module")
def net():
    torch.manual_seed(0)
    g = torch.Generator().manual_seed(0)
    m = _Net().eval()
    m.q.observe()
    with torch.no_grad():
        for _ in range(4):
            m(_batch(g))
    m.q.freeze()
    x = _batch(g)
    with torch.no_grad():
        ref = [r.numpy() for r in m(x)]
    return m, x, ref


def _export(m, x, mode, path):
    for _, q in iter_quantizers(m):  # only the children: the SparseQuantizer itself is no FakeQuantizer
        q.export_mode = mode
    try:
        torch.onnx.export(m, x, str(path), opset_version=17, input_names=["x"], output_names=["y", "z"], dynamo=False)
    finally:
        for _, q in iter_quantizers(m):
            q.export_mode = None
    return onnx.load(str(path))


def _session(path, level):
    so = ort.SessionOptions()
    so.graph_optimization_level = LEVELS[level]
    so.log_severity_level = 3
    return ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])


def test_the_sparse_branch_is_exercised(net):
    m, x, ref = net
    st = m.q.stats()
    assert 0 < st["outlier_fraction"] < 0.01 and st["mse_sparse"] < st["mse_dense_only"]
    with torch.no_grad():
        a = m.act(m.c1(x))
    assert int((a > st["t"]).sum()) >= 5  # the test batch has outliers beyond the dense range too


def test_qdq_graph_is_clip_two_qdq_branches_and_add(net, tmp_path):
    m, x, _ = net
    g = _export(m, x, "qdq", tmp_path / "m.onnx").graph
    ops = collections.Counter(n.op_type for n in g.node)
    assert ops["QuantizeLinear"] == 2 and ops["DequantizeLinear"] == 2
    assert ops["Clip"] == 1  # the split's clip; the dense branch knows its input is bounded and adds none
    producer = {o: n for n in g.node for o in n.output}
    adds = [n for n in g.node if n.op_type == "Add" and all(producer[i].op_type == "DequantizeLinear" for i in n.input)]
    assert len(adds) == 1
    q_inputs = {producer[producer[i].input[0]].input[0] for i in adds[0].input}  # DQ <- Q <- branch input
    clip = next(n for n in g.node if n.op_type == "Clip")
    sub = next(n for n in g.node if n.op_type == "Sub")
    assert q_inputs == {clip.output[0], sub.output[0]}  # dense: clip(x); sparse: x - clip(x)
    assert sub.input[1] == clip.output[0]
    # both branches are uint8 (ORT fuses DQ + DQ -> Add -> Q into QLinearAdd for equal types)
    consts = {n.output[0]: onnx.numpy_helper.to_array(n.attribute[0].t) for n in g.node if n.op_type == "Constant"}
    for n in g.node:
        if n.op_type == "QuantizeLinear":
            assert consts[n.input[2]].dtype == np.uint8


@pytest.mark.parametrize("level", LEVELS)
@pytest.mark.parametrize("mode", ["qdq", "fake"])
def test_ort_matches_pytorch(net, mode, level, tmp_path):
    m, x, (ref_y, ref_z) = net
    g = _export(m, x, mode, tmp_path / "m.onnx").graph
    if mode == "fake":
        assert not any(n.op_type in ("QuantizeLinear", "DequantizeLinear") for n in g.node)
    got_y, got_z = _session(tmp_path / "m.onnx", level).run(None, {"x": x.numpy()})
    step = float(m.q.dense.scale)
    diff = np.abs(got_y - ref_y)
    assert diff.max() <= step * 1.001
    assert (diff < 1e-6).mean() > 0.99  # measured: all identical
    assert np.allclose(got_z, ref_z, atol=1e-4)
