"""One interface over the three kinds of MODEL every command accepts: a float .pt/.yaml, a yoloq quantized
checkpoint (PyTorch fake-quant), and an .onnx file run in ONNX Runtime on the CPU.

>>> p = load_predictor("model.onnx", threads=2)   # doctest: +SKIP
>>> raw = p.raw(x)                                 # (1, 4+nc, anchors) or (1, max_det, 6) when end2end
"""

from __future__ import annotations

import ast
from pathlib import Path

import numpy as np
import torch

from yoloq.errors import YoloqError
from yoloq.io import SEEN_KEY


class TorchPredictor:
    kind = "pytorch"

    def __init__(self, model, imgsz: int, threads: int, label: str, seen=()) -> None:
        from yoloq.model import yolo

        self.model, self.imgsz, self.threads, self.label = model.eval(), imgsz, threads, label
        self.seen = frozenset(seen)  # digests of the images the model was calibrated or trained on (io.image_digest)
        self.names = yolo.class_names(model)
        self.end2end = yolo.is_end2end(model)
        self._yolo = yolo

    @torch.no_grad()
    def raw(self, x: torch.Tensor) -> np.ndarray:
        before = torch.get_num_threads()
        torch.set_num_threads(self.threads)  # the timed thread count, for this call only: the caller keeps its own
        try:
            with self._yolo.export_head(self.model, self.imgsz):
                device = next(self.model.parameters()).device
                return self._yolo.forward_raw(self.model, x.to(device)).cpu().numpy()
        finally:
            torch.set_num_threads(before)


class OrtPredictor:
    kind = "onnxruntime"

    def __init__(self, path: str | Path, threads: int, optimize: bool = True) -> None:
        import onnxruntime as ort

        so = ort.SessionOptions()
        so.intra_op_num_threads = threads
        so.inter_op_num_threads = 1
        so.log_severity_level = 3
        if not optimize:
            so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
        try:
            self.session = ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])
        except Exception as e:  # noqa: BLE001
            raise YoloqError(f"ONNX Runtime cannot load {path}: {str(e).splitlines()[0][:200]}") from None
        meta = self.session.get_modelmeta().custom_metadata_map
        inp = self.session.get_inputs()[0]
        self.input_name = inp.name
        shape = inp.shape
        self.imgsz = int(shape[2]) if isinstance(shape[2], int) else int(ast.literal_eval(meta.get("imgsz", "[640]"))[0])
        self.names = {int(k): v for k, v in ast.literal_eval(meta["names"]).items()} if "names" in meta else {}
        out_shape = self.session.get_outputs()[0].shape
        self.end2end = meta.get("end2end", "False") == "True" or (len(out_shape) == 3 and out_shape[-1] == 6)
        self.threads, self.label = threads, str(path)
        self.seen = frozenset(meta.get(SEEN_KEY, "").split())

    def raw(self, x: torch.Tensor) -> np.ndarray:
        return self.session.run(None, {self.input_name: x.numpy()})[0]


def load_predictor(model: str | Path, threads: int = 2, imgsz: int | None = None):
    """Predictor for a .onnx, a yoloq checkpoint, or an Ultralytics .pt / model YAML."""
    from yoloq import checkpoint
    from yoloq.model import yolo

    p = Path(model)
    if p.suffix == ".onnx":
        if not p.exists():
            raise YoloqError(f"model file not found: {model}")
        return OrtPredictor(p, threads)
    if p.is_file():
        payload = checkpoint.read(p)
        if payload is not None:
            qm = checkpoint.load(p, payload)
            if imgsz:
                yolo.check_imgsz(imgsz)
            return TorchPredictor(qm.model, imgsz or qm.recipe.imgsz, threads, f"{p} ({qm.recipe.name} fake-quant)",
                                  qm.provenance.get("seen_images", ()))
    size = imgsz or 640
    yolo.check_imgsz(size)
    return TorchPredictor(yolo.prepare(yolo.load_detector(str(model))), size, threads, str(model))
