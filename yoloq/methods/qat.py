"""Quantization-aware training (QAT) with HQOD's harmony losses, or plain LSQ/TQT QAT as its baseline.

Phases (see docs/methods.md for the maths and the defaults):
1. start: a calibrated checkpoint (or a TASKQ-finetuned one), BN already folded, the same placement as every other
   yoloq model, so the result exports through the ordinary QDQ path;
2. learn: every conv's weights and bias, and every quantizer's step size (LSQ: the step, with gradient scale
   1/sqrt(N Qp); TQT: a power-of-two step learned in log2 space), trained on an Ultralytics-format dataset with
   Ultralytics' own augmentation, dataloader, task-aligned assigner and detection loss, plus (method "hqod") the
   Task-Correlated and Harmonious-IoU terms on the assigner's positives (yoloq.losses.hqod);
3. convert: TQT steps written back as plain steps, the 4-bit accumulator caps re-derived, the model back in eval mode.

Runs on one process or under `torchrun` (DistributedDataParallel; gloo on CPU). After every epoch the whole training
state goes (atomically, by rank 0) to `<out>.partial`, and re-running the same command continues from there.
"""

from __future__ import annotations

import math
import os
import time
from dataclasses import asdict, dataclass, replace
from datetime import timedelta
from pathlib import Path

import numpy as np
import torch

from yoloq.core.modules import QConv2d, iter_quantizers
from yoloq.core.quantizer import MIN_ACT_SCALE
from yoloq.errors import YoloqError
from yoloq.losses.distill import distill_loss
from yoloq.losses.hqod import HQODLossConfig
from yoloq.model import yolo
from yoloq.ui import hide_on_error, progress

STATE_FORMAT = "yoloq.qat-state"
# The training state (model, Adam's moments, the start checkpoint: ~180 MB for YOLOv8s) is written after an epoch once
# this many seconds have passed since the last write, and after the last epoch. On a GPU with few images an epoch
# takes a second or two, and a write after each one cost as much as the training.
SAVE_EVERY_S = 60.0
METHODS = ("hqod", "lsq")


@dataclass
class QATConfig:
    method: str = "hqod"  # hqod: detection loss + HQOD terms; lsq: the detection loss alone
    quantizer: str = "lsq"  # how step sizes are learned: lsq | tqt (power-of-two)
    # optimisation steps in all; None: by the start (for_start), 300 (about 11 minutes for YOLOv8s on 2 CPU cores at
    # 320), or 30 from a reconstructed (TASKQ & co) start, trained at its own size (about 7 minutes at 640, 13 GB):
    # from such a start the QAT steps move the model about as much as a random 0.1% nudge of its step sizes does
    # (docs/methods.md), and 30 keep TASKQ's own W4A4 default as the start within the 30 minutes of the whole
    # (20 would widen that thin margin by about 2 minutes but scored lower held out on four folds of five)
    iters: int | None = None
    epochs: int | None = None  # instead of iters: whole passes over the training images
    batch: int = 8  # images per step, over all processes
    # training size; None: by the start, 320, or the checkpoint's own size from a reconstructed one (from TASKQ W4A4,
    # 300 steps at 320 lost fidelity at 640, 0.653 -> 0.598, and 75 at 640 gained, -> 0.685). The checkpoint keeps
    # its own (export/eval) size either way
    imgsz: int | None = None
    lr: float = 1e-5  # Adam, weights and biases
    lr_scale: float = 1e-3  # Adam, LSQ steps, relative to each quantizer's initial step
    lr_log2: float = 5e-3  # Adam, TQT's log2 steps
    # "constant", or "cosine": every group's rate decays to 1% of it at the last step (Ultralytics' lrf), for long
    # runs. At the 300-step default the model is still under-trained and decay costs fidelity (demo W4A4 HQOD: 0.512
    # constant, 0.456 cosine; 600 cosine steps, 22 minutes: 0.488)
    lr_schedule: str = "constant"
    tcorr: bool = True
    hiou: bool = True
    pseudo_labels: bool = False  # train on the float model's detections instead of the data's labels
    # distillation from the float model's raw head outputs (losses/distill.py). Fidelity is agreement with the float
    # model, and pseudo-labels after NMS carry little of it: demo YOLOv8s W4A4, 150 steps, 80 coco-mini images,
    # fidelity 0.28 at the start -> 0.43 with weight 1, 0.47 with 10 (the detection loss alone, 200 steps: 0.34).
    # None: by the start (for_start), 100 from a reconstructed one, which is close to the float model already (W4A4
    # TASKQ start, three splits, held out: 0.712, 0.633, 0.523 against 0.672, 0.570, 0.549 with 10, mean +0.026;
    # all 80 mean -0.010; 1000: 0.634), else 10 (from calibration 100 scored 0.584 held out against 0.610;
    # docs/methods.md)
    distill: float | None = None
    seed: int = 0
    device: str = "cpu"
    # how a float model becomes the start of training (a quantized checkpoint is its own start): "taskq", TASKQ's
    # default reconstruction (start_iters steps per unit, on the first 64 images, with its dither and averaging) and
    # then the steps and size of a TASKQ start; or "ptq", calibration alone. None: taskq. Until 2026-12-07 the start
    # was 800 steps without the dither and averaging, to leave 75 QAT steps in 30 minutes; that start scored below
    # TASKQ's default and the QAT steps did not make it up (demo YOLOv8s W4A4, held out, folds 0, 1, 4: from
    # TASKQ's default 0.549, 0.557, 0.713 after 75, 60, 60 QAT steps, against 0.518, 0.426, 0.709; docs/methods.md)
    start: str | None = None
    start_iters: int = 1200
    # width in steps of a subtractive dither on the learned activation quantizers while training (0: off; 1: their
    # rounding error becomes uniform noise independent of the input, as TASKQ's `dither`); never when evaluating,
    # saving or exporting. Off: on the HQOD default from a TASKQ start (W4A4, two splits) held out fell 0.712 ->
    # 0.675 and 0.633 -> 0.521, at 1.6x the time (docs/methods.md)
    dither: float = 0.0

    def __post_init__(self) -> None:
        if self.method not in METHODS:
            raise YoloqError(f"unknown QAT method {self.method!r}; choose from {', '.join(METHODS)}")
        if self.lr_schedule not in ("cosine", "constant"):
            raise YoloqError(f"unknown learning-rate schedule {self.lr_schedule!r}; choose cosine or constant")
        if self.quantizer not in ("lsq", "tqt"):
            raise YoloqError(f"unknown quantizer {self.quantizer!r}; choose lsq or tqt")
        for k in ("iters", "batch"):
            if getattr(self, k) is not None and getattr(self, k) < 1:
                raise YoloqError(f"{k} must be at least 1, got {getattr(self, k)}")
        if self.distill is not None and not (math.isfinite(self.distill) and self.distill >= 0):
            raise YoloqError(f"distill weight must be a number >= 0, got {self.distill}")
        if self.start not in (None, "taskq", "ptq"):
            raise YoloqError(f"unknown start {self.start!r}; choose taskq or ptq")
        if self.start_iters < 1:
            raise YoloqError(f"start iters must be at least 1, got {self.start_iters}")
        if not 0 <= self.dither <= 1:
            raise YoloqError(f"dither must be in [0, 1], got {self.dither}")
        if self.epochs is not None and self.epochs < 1:
            raise YoloqError(f"epochs must be at least 1, got {self.epochs}")
        if self.imgsz is not None:
            yolo.check_imgsz(self.imgsz)
        if self.device not in ("cpu", "cuda"):
            raise YoloqError(f"device must be cpu or cuda, got {self.device!r}")
        if self.device == "cuda" and not torch.cuda.is_available():
            raise YoloqError("--device cuda: no CUDA device is available here")

    @property
    def hqod(self) -> HQODLossConfig | None:
        return HQODLossConfig(tcorr=self.tcorr, hiou=self.hiou) if self.method == "hqod" else None

    def for_start(self, recipe, reconstructed: bool) -> "QATConfig":
        """`iters`, `imgsz` and `distill` filled in where left to the default, from the start's recipe and whether
        it was reconstructed against the float model (see `reconstructed`).

        A start reconstructed against the float model (TASKQ & co) is already close to it at its own size: training
        at 320 pulls it away there, so it trains at its own size, for fewer (four times dearer) steps, and leans on
        the float model's outputs more than on the pseudo-labels' few boxes.
        """
        return replace(self, iters=self.iters or (30 if reconstructed else 300),
                       imgsz=self.imgsz or (recipe.imgsz if reconstructed else 320),
                       distill=self.distill if self.distill is not None else (100.0 if reconstructed else 10.0))

    def to_dict(self) -> dict:
        return asdict(self)


def reconstructed(history: list[dict]) -> bool:
    """Whether a checkpoint's history holds a reconstruction (TASKQ and its baselines), QAT results of one included."""
    return any(h.get("step") == "finetune" and h.get("method") not in METHODS for h in history)


# ---- processes -------------------------------------------------------------------------------------------------------
@dataclass
class Dist:
    """This process's place under torchrun (world 1, rank 0 without it)."""

    rank: int = 0
    world: int = 1

    @property
    def main(self) -> bool:
        return self.rank == 0

    @classmethod
    def from_env(cls, device: str) -> "Dist":
        world = int(os.environ.get("WORLD_SIZE", "1"))
        if world == 1:
            return cls()
        import torch.distributed as dist

        if not dist.is_initialized():
            # the others wait at a barrier while the main process labels the images and reconstructs the TASKQ start
            # of a float model (about 13 minutes for YOLOv8s on 2 CPU cores; the default timeout is 30 on gloo)
            dist.init_process_group("nccl" if device == "cuda" else "gloo", timeout=timedelta(hours=4))
        return cls(dist.get_rank(), dist.get_world_size())

    def barrier(self) -> None:
        if self.world > 1:
            torch.distributed.barrier()


# ---- resumable state -------------------------------------------------------------------------------------------------
class QATState:
    """`<out>.partial`: the starting checkpoint, the settings, and after an epoch (SAVE_EVERY_S) the model,
    optimizer and RNGs."""

    def __init__(self, path: Path, cfg: QATConfig, fingerprint: dict) -> None:
        self.path, self.cfg, self.fingerprint, self.payload = path, cfg, fingerprint, None

    def load(self) -> bool:
        from yoloq.io import read_partial

        self.payload = read_partial(self.path, STATE_FORMAT, self.cfg.to_dict(), self.fingerprint, "training")
        return self.payload is not None

    def start(self, checkpoint_payload: dict) -> None:
        self.payload = {"format": STATE_FORMAT, "config": self.cfg.to_dict(), "fingerprint": self.fingerprint,
                        "checkpoint": checkpoint_payload}

    def save(self, model, opt, epoch: int, step: int, history: list[dict], seconds: float) -> None:
        from yoloq.io import write_partial

        self.payload.update(model={k: v.detach().cpu().clone() for k, v in model.state_dict().items()},
                            optimizer=opt.state_dict(), epoch=epoch, step=step, history=[dict(h) for h in history],
                            seconds=seconds)
        write_partial(self.path, self.payload)

    def remove(self) -> None:
        self.path.unlink(missing_ok=True)


# ---- training --------------------------------------------------------------------------------------------------------
def setup(model, cfg: QATConfig) -> list[dict]:
    """Make weights, biases and step sizes trainable; Adam parameter groups, always in the same order (resume)."""
    weights = []
    for m in model.modules():
        if isinstance(m, QConv2d):
            weights += [p for p in (m.conv.weight, m.conv.bias) if p is not None]
    for p in weights:
        p.requires_grad_(True)
    groups = [{"params": weights, "lr": cfg.lr}]
    for _, q in iter_quantizers(model):
        if q.fixed or not bool(q.calibrated):
            continue
        q.learn(True, cfg.quantizer)
        if not q.weight:
            q.dither = cfg.dither
        lr = cfg.lr_log2 if cfg.quantizer == "tqt" else cfg.lr_scale * float(q.scale.detach().mean())
        groups.append({"params": q.learned_parameters(), "lr": lr})
    return groups


def lr_factor(schedule: str, step: int, total: int, final: float = 0.01) -> float:
    """The share of its base rate each group gets at `step` of `total` (0-based)."""
    if schedule == "constant" or total <= 1:
        return 1.0
    return final + (1 - final) * 0.5 * (1 + math.cos(math.pi * step / (total - 1)))


def _clamp_steps(model) -> None:
    for _, q in iter_quantizers(model):
        if q.learning:
            q.clamp_scale(1e-8 if q.weight else MIN_ACT_SCALE)


def convert(model) -> None:
    """End of training: plain (saved) step sizes, nothing trainable, accumulator caps re-derived, eval mode."""
    for _, q in iter_quantizers(model):
        q.learn(False)
        q.dither = 0.0
    for p in model.parameters():
        p.requires_grad_(False)
    for m in model.modules():
        if isinstance(m, QConv2d):
            m.fit_bias_to_int32()
            m.bound_accumulator()
    model.eval()


def _mean(rows: list[dict]) -> dict:
    keys = rows[0].keys() if rows else []
    return {k: float(np.mean([r[k] for r in rows])) for k in keys}


@torch.no_grad()
def eval_loss(model, criterion, train_images: Path, names: dict, imgsz: int, batch: int, images: int = 16) -> dict:
    """Mean loss terms on the first `images` training images without augmentation (letterboxed as in validation)."""
    dataset = yolo.training_dataset(train_images, names, imgsz, batch, augment=False)
    loader = yolo.training_loader(dataset, batch, shuffle=False)
    rows, seen = [], 0
    for b in loader:
        if seen >= images:
            break
        x = b["img"].to(next(model.parameters()).device).float() / 255
        total, items = criterion(yolo.training_outputs(model, x), b)
        rows.append({"total": float(total) / x.shape[0], **items})
        seen += x.shape[0]
    return _mean(rows)


def training_loss(model, criterion, teacher, batch: dict, distill: float, runner=None) -> tuple[torch.Tensor, dict]:
    """One batch's training loss (detection loss, HQOD terms, distillation from `teacher` when given) and its items."""
    x = batch["img"].to(next(model.parameters()).device, non_blocking=True).float() / 255
    preds = yolo.training_outputs(model, x, runner)
    loss, items = criterion(preds, batch)
    if teacher is not None:
        with torch.no_grad():
            target = yolo.training_outputs(teacher, x)
        kd, kd_items = distill_loss(preds, target, yolo.reg_max(model))
        loss = loss + distill * kd * x.shape[0]  # per image, scaled like Ultralytics' loss
        items.update(kd_items)
    return loss, items


def update(model, opt, loss: torch.Tensor) -> None:
    """Backward, clip the gradient norm to 10 (as Ultralytics does), an Adam step, then keep learned steps legal."""
    opt.zero_grad(set_to_none=True)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), 10.0)
    opt.step()
    _clamp_steps(model)


def run(qm, train_images: Path, cfg: QATConfig, state: QATState | None = None, dist: Dist | None = None,
        float_model=None):
    """Train a QuantizedModel on the YOLO-format dataset at `train_images` (images/ with labels/ beside it);
    `float_model` is the teacher when cfg.distill > 0.

    Returns (QuantizedModel, report): the report has per-epoch mean loss terms, steps, epochs and seconds.
    """
    from yoloq import checkpoint

    dist = dist or Dist()
    if cfg.iters is None or cfg.imgsz is None or cfg.distill is None:
        if qm is None:
            raise ValueError("resolve the defaults left to the start with cfg.for_start(...) before resuming")
        cfg = cfg.for_start(qm.recipe, reconstructed(qm.provenance.get("history", [])))
    device = torch.device(cfg.device if cfg.device == "cpu" else f"cuda:{dist.rank}")
    resumed = state is not None and state.load()
    if resumed:
        qm = checkpoint.load("<training state>", dict(state.payload["checkpoint"]))
    elif state is not None:
        state.start(checkpoint.payload(qm))
    model = qm.model.to(device)
    groups = setup(model, cfg)
    opt = torch.optim.Adam(groups)
    base_lr = [g["lr"] for g in opt.param_groups]
    epoch0, step, history, seconds = 0, 0, [], 0.0
    if resumed:
        p = state.payload
        model.load_state_dict(p["model"])
        opt.load_state_dict(p["optimizer"])
        epoch0, step, history, seconds = int(p["epoch"]), int(p["step"]), list(p["history"]), float(p["seconds"])

    local_batch = max(cfg.batch // dist.world, 1)
    dataset = yolo.training_dataset(train_images, qm.names, cfg.imgsz, local_batch)
    loader = yolo.training_loader(dataset, local_batch, rank=dist.rank if dist.world > 1 else -1)
    per_epoch = len(loader)
    total = cfg.epochs * per_epoch if cfg.epochs is not None else cfg.iters
    epochs = math.ceil(total / per_epoch)
    criterion = yolo.detection_loss(model, cfg.hqod)
    teacher = None
    if cfg.distill:
        if float_model is None:
            raise YoloqError("distillation needs the float model")
        teacher = float_model.to(device).train()  # train mode: raw head outputs (BN is folded, nothing else changes)
    runner = model
    if dist.world > 1:
        from torch.nn.parallel import DistributedDataParallel

        runner = DistributedDataParallel(model, device_ids=None if device.type == "cpu" else [device.index])
    model.train()
    if resumed:
        before = state.payload.get("loss_before")
    else:
        before = eval_loss(model, criterion, train_images, qm.names, cfg.imgsz, local_batch) if dist.main else None
        if state is not None:
            state.payload["loss_before"] = before
    t0 = time.perf_counter() - seconds
    saved = time.perf_counter()
    with progress() as bar, hide_on_error(bar) as task:
        bar.update(task, total=total, completed=step, description=f"QAT {cfg.method}", visible=dist.main)
        for epoch in range(epoch0, epochs):
            yolo.start_epoch(loader, cfg.seed * 100003 + epoch)
            rows = []
            for batch in loader:
                if step >= total:
                    break
                for g, lr in zip(opt.param_groups, base_lr):  # a function of the step alone: resume is exact
                    g["lr"] = lr * lr_factor(cfg.lr_schedule, step, total)
                loss, items = training_loss(model, criterion, teacher, batch, cfg.distill, runner)
                update(model, opt, loss)
                step += 1
                rows.append(items)
                bar.update(task, advance=1, info=" ".join(f"{k} {v:.3f}" for k, v in rows[-1].items()))
            history.append({"epoch": epoch + 1, "step": step, **_mean(rows)})
            due = epoch + 1 == epochs or time.perf_counter() - saved >= SAVE_EVERY_S
            if state is not None and dist.main and due:
                state.save(model, opt, epoch + 1, step, history, time.perf_counter() - t0)
                saved = time.perf_counter()
            dist.barrier()
    after = eval_loss(model, criterion, train_images, qm.names, cfg.imgsz, local_batch) if dist.main else None
    qm.model = model.cpu()  # convert() builds its small tensors on the CPU
    convert(qm.model)
    qm.recipe.weight_rounding = "nearest"  # latent float weights, rounded to nearest by their (learned) grid
    qm.provenance.setdefault("history", []).append({"step": "finetune", **cfg.to_dict()})
    report = {"steps": step, "epochs": epochs, "images": len(dataset), "seconds": time.perf_counter() - t0,
              "history": history, "loss_before": before, "loss_after": after, "world_size": dist.world, "rank": dist.rank}
    return qm, report
