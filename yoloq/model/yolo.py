"""The only module that touches Ultralytics internals: loading, fusing, quantizer placement, head and export settings.

Placement (why each quantizer exists is in docs/placement.md):
- every Conv (incl. DWConv): weights per output channel, the pre-SiLU accumulator (8 bit), the SiLU gate, the output;
- new tensors built from quantized ones get a quantizer: residual Adds (Bottleneck, PSABlock, SPPF shortcut) and
  Concat layers by wrapping the module; concatenations inside C2f/C3k2/C3/SPPF/C2PSA, which each feed exactly one
  conv, through that conv's input quantizer; the sum in front of Attention.proj and PSABlock.ffn likewise;
- value-preserving ops (Split/chunk, MaxPool, nearest Upsample, Reshape) need no quantizer in PyTorch: the ONNX pass in
  export/qdq.py repeats the producer's Q/DQ after them so ORT keeps them in int8;
- the image input is exactly representable on a uint8 grid of step 1/255, so the first conv's input quantizer is fixed;
- the first conv and the head's last 1x1 convs (and the tensors feeding them) stay at 8 bits by default;
- the head's decode (DFL, anchors, sigmoid, concat, top-k) stays in float; the attention MatMuls and Softmax too.
"""

from __future__ import annotations

import contextlib
import copy
import io
import os
from dataclasses import dataclass
from pathlib import Path

# Never let Ultralytics pip-install anything at run time; set before it is imported anywhere.
os.environ.setdefault("YOLO_AUTOINSTALL", "false")
os.environ.setdefault("YOLO_VERBOSE", "false")

import torch  # noqa: E402
from torch import nn  # noqa: E402

from yoloq.core.modules import QConv2d, QuantizedOutput, wire_input_grids  # noqa: E402
from yoloq.core.quantizer import FakeQuantizer  # noqa: E402
from yoloq.errors import YoloqError  # noqa: E402

from ultralytics.nn.modules.block import PSABlock  # noqa: E402
from ultralytics.nn.modules import (  # noqa: E402  (after the environment settings above)
    C2PSA,
    C3,
    SPPF,
    Attention,
    Bottleneck,
    C2f,
    Concat,
    Conv,
    Detect,
)
from ultralytics.nn.tasks import DetectionModel  # noqa: E402

SUPPORTED_FAMILIES = "YOLOv8, YOLO11, YOLO26"
WIRE_IMGSZ = 64  # the tracing pass of _wire: the smallest size every stride-32 model runs at


@dataclass
class Placement:
    """Bit widths of the quantizers that quantize_model creates."""

    weight_bits: int = 8
    act_bits: int = 8
    observer: str = "minmax"
    keep_first_last_8bit: bool = True
    quantize_gate: bool = True
    weight_reduce_range: bool = True  # 8-bit weight codes in [-64, 64] (see QSpec.reduce_range)
    share_concat_grids: bool = False  # below 8 bits, a module's inner Concat inputs use the grid of the conv they feed


# ---- loading ---------------------------------------------------------------------------------------------------------
def _quiet():
    return contextlib.redirect_stdout(io.StringIO())


def load_detector(source: str) -> DetectionModel:
    """A float DetectionModel from a checkpoint (.pt) or a model YAML (random init). Raises YoloqError otherwise."""
    from ultralytics import YOLO
    from ultralytics.utils.downloads import GITHUB_ASSETS_NAMES

    path = Path(source)
    is_yaml = path.suffix in (".yaml", ".yml")
    if not is_yaml and not path.exists() and path.name not in GITHUB_ASSETS_NAMES:
        raise YoloqError(f"model file not found: {source}")
    if path.exists() and path.is_dir():
        raise YoloqError(f"model path is a directory, not a checkpoint: {source}")
    if path.exists() and not os.access(path, os.R_OK):
        raise YoloqError(f"model file is not readable: {source}")
    try:
        with _quiet():
            yolo = YOLO(source, task="detect") if is_yaml else YOLO(source)
    except Exception as e:  # noqa: BLE001  (Ultralytics raises many kinds for a bad file)
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        if not is_yaml and not path.exists():  # an official name Ultralytics tried to download
            raise YoloqError(f"could not download {source} (offline?): {first[:160]}") from None
        if isinstance(e, FileNotFoundError):
            raise YoloqError(f"model not found: {source} ({first[:160]})") from None
        raise YoloqError(f"not a YOLO detection checkpoint: {source} ({first[:160]})") from None
    model = yolo.model
    if not isinstance(model, DetectionModel) or type(model.model[-1]) is not Detect:
        task = getattr(yolo, "task", "?")
        raise YoloqError(f"not a YOLO detection model ({SUPPORTED_FAMILIES}): {source} has task '{task}'")
    return model.float().eval()


def model_from_yaml(cfg: dict, names: dict) -> DetectionModel:
    """A DetectionModel rebuilt from its YAML dict (weights are loaded afterwards)."""
    with _quiet():
        model = DetectionModel(cfg=copy.deepcopy(cfg), ch=cfg.get("channels", 3), nc=len(names), verbose=False)
    model.names = dict(names)
    return model.float().eval()


def prepare(model: DetectionModel) -> DetectionModel:
    """Deployment form: the end-to-end (one-to-one) branch selected where the head has one, Conv+BN fused."""
    model = copy.deepcopy(model).float().eval()
    head = model.model[-1]
    if getattr(head, "one2one_cv2", None) is not None:
        head.end2end = True  # as Ultralytics' exporter does; fuse() then drops the one-to-many branch
    with _quiet():
        model.fuse(verbose=False)
    for p in model.parameters():
        p.requires_grad_(False)
    return model


def is_end2end(model: DetectionModel) -> bool:
    return bool(getattr(model.model[-1], "end2end", False))


def model_yaml(model: DetectionModel) -> dict:
    return copy.deepcopy(model.yaml)


def class_names(model: DetectionModel) -> dict[int, str]:
    return {int(k): str(v) for k, v in model.names.items()}


# ---- placement -------------------------------------------------------------------------------------------------------
def head_branches(model: DetectionModel) -> dict[str, nn.ModuleList]:
    """The deployed head branches: box ('cv2') and class ('cv3'), one Sequential per scale."""
    head = model.model[-1]
    if is_end2end(model):
        return {"box": head.one2one_cv2, "cls": head.one2one_cv3}
    return {"box": head.cv2, "cls": head.cv3}


def _last_conv(m: nn.Module) -> nn.Module:
    convs = [x for x in m.modules() if isinstance(x, Conv)]
    return convs[-1]


def quantize_model(model: DetectionModel, p: Placement) -> DetectionModel:
    """Insert quantizers in place (see the module docstring for where and why). Returns the model."""
    eight = 8 if p.keep_first_last_8bit else None
    first = model.model[0]  # the layer that sees the image
    needs_input: set[int] = set()
    for m in model.modules():
        if isinstance(m, C2f | SPPF | C2PSA):
            needs_input.add(id(m.cv2))
        elif isinstance(m, C3):
            needs_input.add(id(m.cv3))
        elif isinstance(m, Attention):
            needs_input.add(id(m.proj))
        elif isinstance(m, PSABlock) and m.add:
            needs_input.add(id(m.ffn[0]))

    # the last 1x1 convs of each head branch, and the conv feeding each of them, at 8 bits
    final_convs: dict[int, int] = {}  # id -> weight bits
    feeders: set[int] = set()
    for task, branch in head_branches(model).items():
        for seq in branch:
            final_convs[id(seq[-1])] = eight or p.weight_bits
            if eight:
                feeders.add(id(_last_conv(seq[-2])))

    def make(conv: nn.Conv2d, act, owner) -> QConv2d:
        wbits = p.weight_bits
        in_bits = p.act_bits if id(owner) in needs_input else None
        is_first = owner is first
        if is_first:
            wbits, in_bits = eight or p.weight_bits, 8
        out_bits = 8 if id(owner) in feeders else p.act_bits
        q = QConv2d(conv, act, wbits, out_bits, 8, p.observer, in_bits, p.quantize_gate, p.weight_reduce_range)
        if is_first:
            # pixels are k/255, k = 0..255: exactly representable, so no calibration and no error
            q.input_quantizer.set_qparams(torch.tensor([1 / 255]), torch.tensor([0.0]))
            q.input_quantizer.fixed = True
        return q

    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if isinstance(child, Conv):
                _replace(parent, name, make(child.conv, child.act, child))
            elif isinstance(child, nn.Conv2d) and id(child) in final_convs:
                # The head's outputs stay float: they feed the float decode (DFL, sigmoid), and quantizing them
                # cost fidelity (demo YOLOv8s W8A8 in ORT: 0.945 -> 0.956 without them) for no speed (these 1x1
                # convs run as float convs on dequantized int8 inputs, measured equal in ORT).
                _replace(parent, name, QConv2d(child, None, final_convs[id(child)], None, 8, p.observer, None,
                                                     weight_reduce_range=p.weight_reduce_range))

    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if isinstance(child, QuantizedOutput):
                continue
            wrap = (
                isinstance(child, Concat)
                or (isinstance(child, Bottleneck | PSABlock) and child.add)
                or (isinstance(child, SPPF) and getattr(child, "add", False))
            )
            if wrap:
                _replace(parent, name, QuantizedOutput(child, p.act_bits, p.observer))
    if p.share_concat_grids and p.act_bits < 8:
        share_concat_grids(model)
    _wire(model)
    return model


def _wire(model: DetectionModel) -> None:
    """Tell each conv which quantizer makes its input (its bias lies on that grid times its weights'; see QConv2d)."""
    training = model.training
    example = torch.rand(1, model.yaml.get("channels", 3), WIRE_IMGSZ, WIRE_IMGSZ, generator=torch.Generator().manual_seed(0))
    try:
        wire_input_grids(model.eval(), example)
    finally:
        model.train(training)


def _output_owner(m: nn.Module) -> nn.Module | None:
    """The module whose `output_quantizer` makes m's output, or None where m's output has no single one."""
    if isinstance(m, QConv2d | QuantizedOutput):
        return m if isinstance(getattr(m, "output_quantizer", None), FakeQuantizer) else None
    if isinstance(m, nn.Sequential) and len(m):
        return _output_owner(m[-1])
    if isinstance(m, Bottleneck) and not m.add:
        return _output_owner(m.cv2)
    if isinstance(m, C3):
        return _output_owner(m.cv3)
    return None


def _concat_parts(m: nn.Module) -> tuple[nn.Module, list[nn.Module]] | None:
    """(the conv reading the module's inner Concat, the modules making its inputs), for the modules that have one."""
    if isinstance(m, C2f):  # C3k2 too: cat(chunks of cv1, every m[i]) -> cv2
        return m.cv2, [m.cv1, *m.m]
    if isinstance(m, SPPF):  # cat(cv1, its max-pools, which keep its grid) -> cv2
        return m.cv2, [m.cv1]
    if isinstance(m, C2PSA):  # cat(cv1's first half, m(second half)) -> cv2
        return m.cv2, [m.cv1, m.m]
    if isinstance(m, C3):  # cat(m(cv1), cv2) -> cv3
        return m.cv3, [m.m, m.cv2]
    return None


def share_concat_grids(model: nn.Module) -> int:
    """Quantize each inner Concat's inputs straight onto the grid of the conv that reads it (one shared quantizer).

    Otherwise every input is rounded twice: to its producer's grid, then again to the consumer's, and at 4 bits that
    second rounding adds about as much noise as the first (demo YOLOv8s W4A4, PyTorch, held-out images: 0.327
    fidelity; 0.383 with the consumer quantizers of these Concats switched off, an upper bound). The producers then
    use the consumer's range, which covers them all. The shared quantizer is marked `shared`: its consumer never
    needs a Clip (its input already lies on the grid), and the sparse branch leaves it alone. Returns the number of
    producers tied.
    """
    tied = 0
    for m in model.modules():
        parts = _concat_parts(m)
        if parts is None:
            continue
        consumer, producers = parts
        q = consumer.input_quantizer if isinstance(consumer, QConv2d) else None
        owners = [_output_owner(p) for p in producers]
        if q is None or any(o is None or o.output_quantizer.spec != q.spec for o in owners):
            continue
        for o in owners:
            o.output_quantizer = q
        q.shared = True
        tied += len(owners)
    return tied


def _replace(parent: nn.Module, name: str, new: nn.Module) -> None:
    """Swap a child, carrying the attributes DetectionModel's layer walker reads (from-index, index, type)."""
    old = getattr(parent, name)
    for attr in ("f", "i", "type", "np"):
        if hasattr(old, attr):
            setattr(new, attr, getattr(old, attr))
    setattr(parent, name, new)


# ---- head, export, prediction ----------------------------------------------------------------------------------------
@contextlib.contextmanager
def export_head(model: DetectionModel, imgsz: int, max_det: int = 300):
    """Put the Detect head in Ultralytics' ONNX export mode: one output tensor, static shape."""
    head = model.model[-1]
    saved = {k: getattr(head, k) for k in ("export", "format", "dynamic", "max_det")}
    anchors = sum((imgsz // int(s)) ** 2 for s in model.stride.tolist())
    head.export, head.format, head.dynamic, head.max_det = True, "onnx", False, min(max_det, anchors)
    try:
        yield model
    finally:
        for k, v in saved.items():
            setattr(head, k, v)


def onnx_metadata(model: DetectionModel, imgsz: int, extra: dict | None = None) -> dict:
    """The metadata Ultralytics' own ONNX export writes, so ultralytics.YOLO('model.onnx') can run the file."""
    from datetime import datetime

    from ultralytics import __version__

    meta = {
        "description": "Ultralytics YOLO model quantized by yoloq",
        "author": "yoloq",
        "date": datetime.now().astimezone().isoformat(),
        "version": __version__,
        "license": "AGPL-3.0 License (https://ultralytics.com/license)",
        "docs": "https://docs.ultralytics.com",
        "stride": int(max(model.stride)),
        "task": "detect",
        "head": "Detect",
        "batch": 1,
        "imgsz": [imgsz, imgsz],
        "names": class_names(model),
        "args": {"batch": 1, "half": False, "int8": True, "dynamic": False, "nms": False},
        "channels": 3,
        "end2end": is_end2end(model),
    }
    meta.update(extra or {})
    return meta


def forward_raw(model: DetectionModel, x: torch.Tensor) -> torch.Tensor:
    """Inference output tensor: (B, 4+nc, anchors) xywh+scores, or (B, max_det, 6) for end-to-end heads."""
    y = model(x)
    return y[0] if isinstance(y, tuple | list) else y


def postprocess(raw, end2end: bool, conf: float, iou: float, max_det: int, nc: int,
                multi_label: bool = True) -> list[torch.Tensor]:
    """(n, 6) [x1, y1, x2, y2, conf, cls] per image in letterboxed pixels. multi_label=True as Ultralytics' validator
    makes them (a box once per class above ``conf``), False as its predictor does (once, at its best class)."""
    from ultralytics.utils.nms import non_max_suppression

    raw = torch.as_tensor(raw)
    if end2end:
        out = []
        for r in raw:
            r = r[r[:, 4] > conf]
            out.append(r[:max_det])
        return out
    return non_max_suppression(raw, conf, iou, max_det=max_det, nc=nc, multi_label=multi_label)


def scale_boxes(boxes: torch.Tensor, from_shape, to_shape) -> torch.Tensor:
    from ultralytics.utils.ops import scale_boxes as _scale

    return _scale(from_shape, boxes.clone(), to_shape)


def letterbox(image, imgsz: int):
    """Ultralytics' LetterBox as its validator/predictor uses it for a square static input (pad value 114)."""
    from ultralytics.data.augment import LetterBox

    return LetterBox(new_shape=(imgsz, imgsz), auto=False, scaleup=True, center=True, stride=32)(image=image)


def check_imgsz(imgsz: int) -> None:
    if imgsz <= 0 or imgsz % 32:
        raise YoloqError(f"image size must be a positive multiple of 32, got {imgsz}")


# ---- fine-tuning: reconstruction units and the layer walk ------------------------------------------------------------
@dataclass
class Unit:
    """A piece of the model reconstructed on its own against the float model.

    Trunk units are Ultralytics layers (model.model[i]); head units are groups of Detect branches, each branch a
    (task, scale) pair fed by the Detect input at that scale. `paths` name the module(s) in both models.
    """

    name: str
    paths: list[str]
    feeds: list[int]  # layer indices whose outputs are the unit's inputs (one per path for head units)
    branches: list[tuple[str, int]]  # (task, scale) of each head branch; empty for trunk units

    @property
    def is_head(self) -> bool:
        return bool(self.branches)


def _sources(m: nn.Module, i: int) -> list[int]:
    f = m.f if isinstance(m.f, list) else [m.f]
    return [i - 1 if j == -1 else (j if j >= 0 else i + j) for j in f]


def layer_sources(model: DetectionModel) -> list[list[int]]:
    """For every layer, the indices of the layers whose outputs it reads (-1 for the image)."""
    return [_sources(m, i) for i, m in enumerate(model.model)]


def run_layer(model: DetectionModel, i: int, inputs: list[torch.Tensor]) -> torch.Tensor:
    """Layer i on its inputs (as listed by layer_sources): a list for multi-input layers such as Concat."""
    m = model.model[i]
    return m(inputs if isinstance(m.f, list) else inputs[0])


def run_layers(model: DetectionModel, x: torch.Tensor, outputs: list | None = None, start: int = 0,
               stop: int | None = None) -> list:
    """Every layer's output on image x (layers before `stop`, default all), as the model's own forward computes
    them, with layers before `start` taken from `outputs` (an earlier call's result) instead of being run again."""
    sources, ys = layer_sources(model), list(outputs[:start]) if start else []
    for i in range(start, len(model.model) if stop is None else stop):
        ys.append(run_layer(model, i, [x if j == -1 else ys[j] for j in sources[i]]))
    return ys


def reconstruction_units(model: DetectionModel, head_wise: bool = True) -> list[Unit]:
    """Trunk layers that have convs, in order, then the Detect head: six units (box and class branch at each
    of three scales) with head_wise, else one unit with all branches."""
    units = []
    head_idx = len(model.model) - 1
    for i, m in enumerate(model.model[:-1]):
        if any(isinstance(x, nn.Conv2d) for x in m.modules()):
            units.append(Unit(f"layer {i} {type(m).__name__}", [f"model.{i}"], _sources(m, i), []))
    head = model.model[-1]
    prefix = "one2one_" if is_end2end(model) else ""
    feeds = _sources(head, head_idx)
    branches = [(task, s) for s in range(len(feeds)) for task in ("box", "cls")]
    attr = {"box": f"{prefix}cv2", "cls": f"{prefix}cv3"}
    paths = [f"model.{head_idx}.{attr[t]}.{s}" for t, s in branches]
    strides = [int(x) for x in model.stride.tolist()]
    if head_wise:
        for (t, s), p in zip(branches, paths):
            units.append(Unit(f"head {t} P{strides[s].bit_length() - 1}", [p], [feeds[s]], [(t, s)]))
    else:
        units.append(Unit("head", paths, [feeds[s] for _, s in branches], branches))
    return units


def decode_boxes(model: DetectionModel, box_out: torch.Tensor, scale: int) -> torch.Tensor:
    """xyxy boxes in input pixels, (B, H*W, 4), from one scale's raw box-branch output (DFL where the head has it)."""
    from ultralytics.utils.tal import dist2bbox, make_anchors

    head = model.model[-1]
    b, _, h, w = box_out.shape
    stride = float(model.stride[scale])
    anchors, _ = make_anchors([box_out], [stride], 0.5)
    dist = head.dfl(box_out.reshape(b, -1, h * w))  # (B, 4, HW)
    return dist2bbox(dist, anchors.transpose(0, 1).unsqueeze(0), xywh=False, dim=1).transpose(1, 2) * stride


def box_iou_pairs(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Plain IoU of corresponding xyxy boxes (..., 4) -> (...)."""
    from ultralytics.utils.metrics import bbox_iou

    return bbox_iou(a, b, xywh=False).squeeze(-1)


# ---- quantization-aware training: Ultralytics' data pipeline, assigner and detection loss -----------------------------
def training_hyp(**overrides):
    """Ultralytics' default training hyperparameters (augmentation, loss gains) with `overrides`."""
    from ultralytics.cfg import get_cfg

    return get_cfg(overrides={"task": "detect", **overrides})


def training_dataset(images_dir: str | Path, names: dict[int, str], imgsz: int, batch: int, augment: bool = True):
    """Ultralytics' YOLODataset over a folder `images/` with YOLO labels in the sibling `labels/`, with its own
    training augmentation (mosaic, HSV, flips, affine) at `imgsz`."""
    from ultralytics.data.build import build_yolo_dataset

    hyp = training_hyp(imgsz=imgsz)
    data = {"names": dict(names), "nc": len(names), "channels": 3}
    with _quiet():
        return build_yolo_dataset(hyp, str(images_dir), batch, data, mode="train" if augment else "val", stride=32)


def training_loader(dataset, batch: int, rank: int = -1, shuffle: bool = True):
    """Ultralytics' dataloader (a DistributedSampler under DDP when rank >= 0); workers 0 keep CPU runs predictable."""
    from ultralytics.data.build import build_dataloader

    return build_dataloader(dataset, batch, workers=0, shuffle=shuffle, rank=rank, pin_memory=False, device="cpu")


def training_outputs(model: DetectionModel, x: torch.Tensor, runner=None) -> dict:
    """The deployed head's raw training outputs {"boxes", "scores", "feats"} with gradients to the whole trunk.

    For end-to-end heads Ultralytics trains the one-to-one branch on detached features (the one-to-many branch trains
    the trunk); yoloq deploys only the one-to-one branch, so its gradient must reach the trunk here. `runner` is
    what to call instead of the model itself (its DistributedDataParallel wrapper).
    """
    runner = runner or model
    head = model.model[-1]
    if not is_end2end(model):
        return runner(x)
    head.forward = lambda feats: head.forward_head(feats, **head.one2one)
    try:
        return runner(x)
    finally:
        del head.forward


def detection_loss(model: DetectionModel, hqod=None):
    """Ultralytics' detection loss for the deployed head (v8DetectionLoss with the task-aligned assigner; the
    one-to-one assignment of E2ELoss for end-to-end heads), plus HQOD's terms on the assigner's positives when
    `hqod` (a yoloq.losses.hqod.HQODLossConfig) is given.

    Call it as `loss(preds, batch) -> (total, items)`: total is scaled by the batch size as Ultralytics scales it,
    items are floats per image {"box", "cls", "dfl" or "l1", "tcorr", "hiou"}.
    """
    from ultralytics.utils.loss import v8DetectionLoss

    from yoloq.losses.hqod import hqod_loss, plain_iou

    class Recorder:
        """The assigner, keeping its last assignment (target labels) for the HQOD terms."""

        def __init__(self, assigner):
            self.assigner, self.last = assigner, None

        def __call__(self, *args, **kwargs):
            self.last = self.assigner(*args, **kwargs)
            return self.last

    class DetectionLoss(v8DetectionLoss):
        def __init__(self):
            args = getattr(model, "args", None)
            if not hasattr(args, "box"):  # a YAML model has no args, a checkpoint a dict: loss gains from defaults
                gains = {k: args[k] for k in ("box", "cls", "dfl") if k in args} if isinstance(args, dict) else {}
                model.args = training_hyp(**gains)
            topk = (7, 1) if is_end2end(model) else (10, None)
            super().__init__(model, tal_topk=topk[0], tal_topk2=topk[1])
            self.assigner = Recorder(self.assigner)

        def loss(self, preds, batch):
            bs = preds["boxes"].shape[0]
            (fg, _, target_bboxes, anchors, strides), loss, items = self.get_assigned_targets_and_loss(preds, batch)
            total = loss.sum() * bs
            items = {k.replace("_loss", ""): float(v) for k, v in items.items()}
            if hqod is not None:
                target_labels = self.assigner.last[0]
                scores = preds["scores"].permute(0, 2, 1)[fg]  # (positives, nc) logits
                p = scores.sigmoid().gather(1, target_labels[fg].long().unsqueeze(1)).squeeze(1)
                boxes = self.bbox_decode(anchors, preds["boxes"].permute(0, 2, 1).contiguous()) * strides
                u = plain_iou(boxes[fg], target_bboxes[fg])
                extra, parts = hqod_loss(p, u, hqod, gain=float(self.hyp.box) * bs)
                total = total + extra
                items.update({k: v / bs for k, v in parts.items()})  # per image, as Ultralytics' own items
            return total, items

    return DetectionLoss()


def reg_max(model: DetectionModel) -> int:
    """DFL bins per box side (1: the head regresses distances directly, as YOLO26's does)."""
    return int(model.model[-1].reg_max)


def start_epoch(loader, seed: int) -> None:
    """Make an epoch's sampling and augmentation depend only on `seed`, so a resumed run repeats the epochs an
    uninterrupted one would have run: reseed Python, NumPy and torch (Ultralytics' augmentations draw from all three)
    and the loader's shuffling, and empty the mosaic's buffer of recently loaded images (it carries over epochs)."""
    import random

    import numpy as np

    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)
    if hasattr(loader, "reset"):
        loader.reset()  # a fresh pass over the sampler: the old one would draw one more permutation first
    if getattr(loader, "generator", None) is not None:
        loader.generator.manual_seed(seed)
    if hasattr(loader.sampler, "set_epoch"):
        loader.sampler.set_epoch(seed)
    ds = loader.dataset
    if isinstance(getattr(ds, "buffer", None), list) and ds.cache != "ram":
        # the buffer only grows when an image is read from disk, so the images kept with it go too
        ds.buffer.clear()
        ds.ims, ds.im_hw0, ds.im_hw = [None] * ds.ni, [None] * ds.ni, [None] * ds.ni
