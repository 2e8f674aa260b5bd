"""Placement decides speed: after ORT's own optimizations every conv but the DFL decode must be an int8 kernel."""

from __future__ import annotations

import pytest
import torch

from yoloq import api
from yoloq.core.modules import QConv2d, QuantizedOutput
from yoloq.model import yolo
from yoloq.recipe import Recipe

from ..conftest import FAMILIES, ort_optimized


def _quantized(fam: str, **kw):
    m = api.load_float(fam)
    from yoloq.methods import build_quantized

    return build_quantized(m, Recipe(**kw))


@pytest.mark.parametrize("fam", FAMILIES)
def test_every_conv_is_wrapped_and_first_last_stay_8bit(fam):
    m = _quantized(fam, weight_bits=4, act_bits=4)
    plain = [n for n, x in m.named_modules() if type(x) is torch.nn.Conv2d and "dfl" not in n
             and not n.endswith(".conv")]
    assert plain == []
    first = m.model[0]
    assert isinstance(first, QConv2d) and first.weight_quantizer.spec.bits == 8
    assert first.input_quantizer.spec.bits == 8 and float(first.input_quantizer.scale) == pytest.approx(1 / 255)
    finals = [seq[-1] for branch in yolo.head_branches(m).values() for seq in branch]
    assert len(finals) == 6
    for f in finals:
        assert f.weight_quantizer.spec.bits == 8 and f.output_quantizer is None  # float into the decode
    # a trunk conv is at the requested low bits
    assert m.model[1].weight_quantizer.spec.bits == 4 and m.model[1].output_quantizer.spec.bits == 4
    assert any(isinstance(x, QuantizedOutput) for x in m.modules())


def _concat_groups(m):
    """(consumer input quantizer, producers' output quantizers) of every C2f / C3k2 / SPPF inner Concat."""
    from ultralytics.nn.modules import SPPF, C2f

    groups = []
    for x in m.modules():
        if isinstance(x, C2f):
            outs = [x.cv1] + [yolo._output_owner(b) for b in x.m]  # Bottleneck, C3k, Bottleneck + PSABlock
            groups.append((x.cv2.input_quantizer, [o.output_quantizer for o in outs]))
        elif isinstance(x, SPPF):
            groups.append((x.cv2.input_quantizer, [x.cv1.output_quantizer]))
    return groups


@pytest.mark.parametrize("fam", FAMILIES)
def test_concat_inputs_are_quantized_once_on_the_consumer_grid_below_8_bits(fam):
    groups = _concat_groups(_quantized(fam, weight_bits=4, act_bits=4, share_concat_grids=True))
    assert len(groups) >= 8
    for consumer, producers in groups:
        assert consumer.shared and all(p is consumer for p in producers)
    # 8-bit activations, or the switch off (the default, and checkpoints before version 4): a grid per tensor
    for kw in ({"weight_bits": 4, "act_bits": 8, "share_concat_grids": True}, {"weight_bits": 4, "act_bits": 4}):
        for consumer, producers in _concat_groups(_quantized(fam, **kw)):
            assert not consumer.shared and all(p is not consumer for p in producers)


def test_first_last_can_go_low_bit():
    m = _quantized("yolov8n.yaml", weight_bits=4, act_bits=4, keep_first_last_8bit=False)
    assert m.model[0].weight_quantizer.spec.bits == 4
    assert m.model[-1].cv3[0][-1].weight_quantizer.spec.bits == 4


def test_end2end_head_keeps_only_the_one_to_one_branch():
    m = api.load_float("yolo26n.yaml")
    head = m.model[-1]
    assert yolo.is_end2end(m) and head.cv2 is None and head.one2one_cv2 is not None


@pytest.mark.parametrize("fam", FAMILIES)
def test_ort_runs_every_trunk_conv_as_int8(fam, qckpts, tmp_path):
    out = tmp_path / "m.onnx"
    api.export(qckpts[fam], out)
    ops = ort_optimized(out, tmp_path)[1]
    n_convs = sum(1 for x in api.load_quantized(qckpts[fam]).model.modules() if isinstance(x, QConv2d))
    # every conv but the head's six final ones (float outputs into the decode) is an int8 kernel
    assert ops["QLinearConv"] == n_convs - 6
    dfl = 0 if "26" in fam else 1  # YOLO26 has no DFL
    assert ops["Conv"] + ops.get("FusedConv", 0) == dfl + 6
    # SiLU runs quantized too when the gate is quantized (the default)
    assert ops["QLinearSigmoid"] > 0 and ops["QLinearSigmoid"] == ops["QLinearMul"]
