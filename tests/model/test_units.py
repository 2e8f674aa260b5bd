"""Reconstruction units (TASKQ): trunk blocks in model order and the Detect head as six scale x task units."""

import pytest
import torch
from torch import nn

from yoloq import api
from yoloq.model import yolo

from ..conftest import FAMILIES


@pytest.mark.parametrize("fam", FAMILIES)
def test_units_cover_every_conv_once_with_six_head_units(fam):
    m = api.load_float(fam)
    units = yolo.reconstruction_units(m)
    head = [u for u in units if u.is_head]
    assert len(head) == 6
    assert sorted(u.branches[0] for u in head) == sorted((t, s) for t in ("box", "cls") for s in range(3))
    convs = {id(c) for c in m.modules() if isinstance(c, nn.Conv2d) and "dfl" not in type(c).__name__.lower()}
    dfl = {id(c) for c in m.model[-1].dfl.modules()} if hasattr(m.model[-1], "dfl") else set()
    covered = [id(c) for u in units for p in u.paths for c in m.get_submodule(p).modules() if isinstance(c, nn.Conv2d)]
    assert len(covered) == len(set(covered))  # no conv in two units
    assert set(covered) == convs - dfl
    trunk = [int(u.paths[0].split(".")[1]) for u in units if not u.is_head]
    assert trunk == sorted(trunk)
    # each head unit is fed by the Detect input at its scale
    feeds = yolo.layer_sources(m)[-1]
    assert all(u.feeds == [feeds[u.branches[0][1]]] for u in head)
    # without STAHQ the head is one unit holding all six branches
    one = [u for u in yolo.reconstruction_units(m, head_wise=False) if u.is_head]
    assert len(one) == 1 and len(one[0].paths) == 6


def test_end2end_head_units_are_the_one_to_one_branch():
    m = api.load_float("yolo26n.yaml")
    head = [u for u in yolo.reconstruction_units(m) if u.is_head]
    assert all("one2one_cv" in u.paths[0] for u in head)


@pytest.mark.parametrize("fam", ["yolov8n.yaml", "yolo11n.yaml"])
def test_decode_boxes_matches_ultralytics_decode(fam):
    m = api.load_float(fam)
    head = m.model[-1]
    torch.manual_seed(0)
    sizes = [8, 4, 2]
    feats = [torch.randn(1, head.cv2[i][0].conv.in_channels, s, s) for i, s in enumerate(sizes)]
    with torch.no_grad():
        y, _ = head(feats)  # (1, 4 + nc, anchors): xywh in pixels
        for scale, s in enumerate(sizes):
            start = sum(x * x for x in sizes[:scale])
            ours = yolo.decode_boxes(m, head.cv2[scale](feats[scale]), scale)[0]  # (HW, 4) xyxy
            xywh = y[0, :4, start:start + s * s].T
            theirs = torch.cat([xywh[:, :2] - xywh[:, 2:] / 2, xywh[:, :2] + xywh[:, 2:] / 2], 1)
            assert torch.allclose(ours, theirs, atol=1e-3)


def test_plain_iou_of_box_pairs():
    a = torch.tensor([[0.0, 0, 10, 10], [0, 0, 10, 10]])
    b = torch.tensor([[0.0, 0, 10, 10], [5, 0, 15, 10]])
    assert torch.allclose(yolo.box_iou_pairs(a, b), torch.tensor([1.0, 1 / 3]), atol=1e-4)


@pytest.mark.parametrize("fam", FAMILIES)
def test_running_the_layers_from_a_cache_gives_the_model_output(fam):
    m = api.load_float(fam).eval()
    x = torch.rand(1, 3, 64, 64, generator=torch.Generator().manual_seed(0))

    def head(ys):
        return ys[-1][0] if isinstance(ys[-1], tuple | list) else ys[-1]

    with torch.no_grad():
        ys = yolo.run_layers(m, x)
        assert len(ys) == len(m.model)
        assert torch.allclose(head(ys), yolo.forward_raw(m, x))
        assert torch.allclose(head(yolo.run_layers(m, x, ys, 3)), head(ys))
        # layers before `start` come from the cache as given, the later ones are run on them
        stale = list(ys)
        stale[2] = torch.zeros_like(ys[2])
        again = yolo.run_layers(m, x, stale, 3)
    assert again[2] is stale[2]
    assert not torch.allclose(again[3], ys[3])
