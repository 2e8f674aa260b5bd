"""ONNX export of a quantized model.

- ``qdq``: QuantizeLinear/DequantizeLinear around every quantized tensor, int8 weight codes with per-channel scales.
  ORT fuses the patterns into QLinearConv / QLinearSigmoid / QLinearMul / QLinearConcat / QLinearAdd kernels.
- ``fake``: a float graph with the same numerics (Round/Clip arithmetic, dequantized weights): for runtimes without
  QDQ support, or to inspect numerics.
The output tensor and metadata are those of Ultralytics' own ONNX export, so ``ultralytics.YOLO(file)`` runs it.
"""

from __future__ import annotations

import copy
import warnings
from pathlib import Path

import onnx
import torch

from yoloq.checkpoint import QuantizedModel
from yoloq.core.modules import iter_quantizers
from yoloq.errors import YoloqError
from yoloq.export.qdq import pack_int4, propagate_qdq
from yoloq.io import SEEN_KEY, atomic_path
from yoloq.model import yolo
from yoloq.ui import hide_on_error, progress

FORMATS = ("qdq", "fake")
OPSET = 17
INT4_OPSET = 21  # int4 tensors in DequantizeLinear


def export_onnx(qm: QuantizedModel, out: str | Path, fmt: str = "qdq", pack: str | None = None, imgsz: int | None = None) -> dict:
    """Write the ONNX file atomically. Returns a small report (path, nodes, Q/DQ pairs propagated, int4 tensors)."""
    if fmt not in FORMATS:
        raise YoloqError(f"unknown ONNX format {fmt!r}; choose from {', '.join(FORMATS)}")
    if pack not in (None, "int4"):
        raise YoloqError(f"unknown weight packing {pack!r}; the only packing is 'int4'")
    if pack and fmt != "qdq":
        raise YoloqError("--pack int4 needs --format qdq")
    if pack == "int4" and qm.recipe.weight_bits > 4:
        raise YoloqError(f"--pack int4 needs weights of at most 4 bits; this checkpoint has {qm.recipe.weight_bits}")
    imgsz = imgsz or qm.recipe.imgsz
    yolo.check_imgsz(imgsz)
    model = copy.deepcopy(qm.model).eval()
    for _, q in iter_quantizers(model):
        q.export_mode = fmt
    report = {"path": str(out), "format": fmt, "pack": pack, "imgsz": imgsz}
    steps = ["trace", "graph passes", "check and write"]
    with atomic_path(out) as tmp, progress() as bar, hide_on_error(bar) as task:
        bar.update(task, total=len(steps), description="exporting", info=steps[0])
        m = _trace(model, tmp, imgsz)
        bar.update(task, advance=1, info=steps[1])
        if fmt == "qdq":
            report["propagated_qdq"] = propagate_qdq(m)
        if pack == "int4":
            m = onnx.version_converter.convert_version(m, INT4_OPSET)
            report["int4_tensors"] = pack_int4(m)
        extra = {"yoloq": f"{qm.recipe.name} {fmt}{' int4' if pack else ''}"}
        if qm.provenance.get("seen_images"):
            extra[SEEN_KEY] = " ".join(qm.provenance["seen_images"])
        _stamp(m, yolo.onnx_metadata(model, imgsz, extra))
        bar.update(task, advance=1, info=steps[2])
        onnx.checker.check_model(m)
        onnx.save(m, str(tmp))
        bar.update(task, advance=1, info="done")
        report["nodes"] = len(m.graph.node)
    report["bytes"] = Path(out).stat().st_size
    return report


def export_float_onnx(source: str, out: str | Path, imgsz: int = 640) -> Path:
    """The FP32 model as Ultralytics exports it (same head mode and metadata): the baseline for speed and fidelity."""
    model = yolo.prepare(yolo.load_detector(source))
    with atomic_path(out) as tmp:
        m = _trace(model, tmp, imgsz)
        _stamp(m, yolo.onnx_metadata(model, imgsz, {"yoloq": "fp32"}))
        onnx.save(m, str(tmp))
    return Path(out)


def _trace(model, path: Path, imgsz: int) -> onnx.ModelProto:
    """TorchScript-based export (what Ultralytics uses): it honours the quantizers' Q/DQ symbolics."""
    with yolo.export_head(model, imgsz), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(model, torch.zeros(1, 3, imgsz, imgsz), str(path), opset_version=OPSET,
                          input_names=["images"], output_names=["output0"], do_constant_folding=True, dynamo=False)
    return onnx.load(str(path))


def _stamp(m: onnx.ModelProto, meta: dict) -> None:
    for k, v in meta.items():
        p = m.metadata_props.add()
        p.key, p.value = k, str(v)
