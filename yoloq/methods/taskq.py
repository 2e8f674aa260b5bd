"""TASKQ-style post-training fine-tuning: reconstruct the quantized model unit by unit against the float model.

Phases (see docs/methods.md for the maths and the defaults):
1. start: a calibrated model (activation ranges by MSE, weights rounded to nearest, still float underneath);
2. sparse: on the low-bit SiLU outputs where it pays most, a dense + 8-bit outlier split (core/sparse.py);
3. weigh (below 8-bit activations): how much each element of every unit output moves the detections, by random
   probes through the float model (output_sensitivity), the weights of each unit's squared error;
4. reconstruct, in model order: every trunk layer with weights (Conv, C2f/C3k2, SPPF, C2PSA...) is a block; the
   Detect head is six units, box and class branch at each scale (STAHQ), or one block without it. Per unit, learn
   the weights' rounding (AdaRound) together with the weight and activation step sizes (LSQ) to minimise
   sum_c (f_q(x_q) - f(x))^2 on random crops of the cached feature maps (with sensitivity weights, drawn by the
   weight they hold and reweighted: WeightedCrops): x_q from the already-reconstructed
   quantized model, x and the target from the float one. Head units add DTR: confidence-weighted (1 - IoU) between
   the boxes decoded from the quantized and float outputs, and a confidence-weighted class-score BCE;
5. bake: hard rounding written into the weights; the export is the ordinary QDQ path.

The baselines run through the same code: `block-mse` (BRECQ's block reconstruction with plain MSE, no Fisher
weighting), `brecq` (block-mse with the Fisher-diagonal weights of step 3 at every bit width), `qdrop` (block-mse
with QDrop's random dropping of activation quantization, p = 0.5) and `adaround` (layer-wise: one conv at a time,
rounding only).

Each finished unit is saved (atomically) to `<out>.partial`, so an interrupted run resumes where it stopped and
ends with the result an uninterrupted run gives: every unit seeds its own random generator, and the cached features
are rebuilt with the same operations in the same order.
"""

from __future__ import annotations

import copy
import math
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from yoloq.core.gptq import gptq_latent
from yoloq.core.modules import QConv2d, iter_quantizers
from yoloq.core.quantizer import MIN_ACT_SCALE, FakeQuantizer
from yoloq.errors import YoloqError
from yoloq.methods.ptq import InputStats
from yoloq.model import yolo
from yoloq.ui import hide_on_error, progress

STATE_FORMAT = "yoloq.finetune-state"


@dataclass
class TaskQConfig:
    method: str = "taskq"
    iters: int = 1200  # optimisation steps per unit (demo YOLOv8s W4A4: about 12 of the 20 minutes allowed)
    batch: int = 4  # crops per step
    crop: int = 160  # crop side in input pixels (rounded to the largest stride)
    # True: crops carry the unit's receptive-field margin as context and the loss skips the cells that see a crop
    # edge (zero padding no whole map has). None (default): on with 8-bit activations, off below (for_bits). At W4A8
    # it raised held-out fidelity on both seeds measured; at W4A4 it fit the calibration images better but not
    # held-out ones, at 45% more time (docs/methods.md)
    context: bool | None = None
    seed: int = 0
    sparse: bool = True  # sparse outlier branch on the SiLU outputs where it pays
    sparse_max: int = 4  # at most this many tensors (each one costs int8 fusion of its consumers)
    sparse_min_gain: float = 0.05  # ... each removing at least this share of the detections' error on its own
    sparse_budget: float = 0.1  # ... holding together at most this share of the candidates' elements (the cost)
    dtr: bool = True  # detection-aware loss on head units
    stahq: bool = True  # head as six units (scale x task) instead of one block
    layer_wise: bool = False  # one conv at a time (AdaRound) instead of blocks
    learn_steps: bool = True  # learn weight and activation step sizes (LSQ) with the rounding
    # where each unit's learned rounding starts: "nearest", or "gptq": GPTQ's error-compensated weights on the unit's
    # quantized inputs (its training images), so the rounding starts where GPTQ would round and a unit put back
    # (val_images) falls back to GPTQ's rounding, not to nearest. Alone it did not pay (W4A8, two folds: each unit
    # starts at 20-77% of round-to-nearest's loss and ends near the same trained loss; held out 0.788 against 0.806).
    # With val_images 8 it was the W4A8 default from 2026-12-06 to 12-07: over all five folds it did not beat nearest
    # on all 64 images (held out 0.814 against 0.819, all 80 0.897 against 0.900) at 5% more time, so nearest it is
    start_rounding: str = "nearest"
    # QDrop: each activation quantizer in the unit and each element of its input falls back to float with this
    # probability. Off in TASKQ: W4A4 held out 0.648 with 0.5 against 0.688 without; W4A8, two folds, held out level
    # (0.804 against 0.806), all 80 lower (0.886 against 0.897), 26% slower (docs/methods.md)
    drop_prob: float = 0.0
    # width in steps of a subtractive dither on every activation quantizer of the unit while it trains (0: off;
    # 1: their rounding error is uniform noise independent of the input), so a unit cannot fit the exact rounding
    # of its calibration images. Over three folds of the demo model it raised held out at W4A4 from 0.575 to 0.607
    # (all 80 level, 0.801) and at W4A8 from 0.816 to 0.833, up on every fold (docs/methods.md)
    dither: float = 1.0
    # decay of an exponential moving average of what a unit learns (rounding logits, step sizes, biases), kept from
    # the end of the warm-up and put in place before the rounding is made hard (0: the last step's values). None
    # (default): 0.99 below 8-bit activations, where it was measured (W4A4, three folds, docs/methods.md), 0 at 8 bits,
    # where it lost (W4A8, two splits: held out 0.904 -> 0.892 and 0.824 -> 0.737)
    average: float | None = None
    # share of the reconstruction loss weighted, element by element, by how much each unit output moves the
    # detections (the Gauss-Newton diagonal of the float model's scores and size-relative boxes, by random probes;
    # BRECQ's Fisher weighting without labels): 0 plain MSE, 1 fully weighted. None (default): 1 below 8-bit
    # activations, where it was measured (W4A4 held out 0.662 -> 0.676, all 80 0.670 -> 0.732), else 0 (for_bits):
    # at W4A8 on top of the crop context it lowered both (seed 0: 0.889 -> 0.842 held out, 0.915 -> 0.906 all 80),
    # and with weighted crops held out still fell on average over three folds (-0.015; all 80 +0.033)
    sensitivity: float | None = None
    sensitivity_probes: int = 2  # random probes per image for that diagonal
    # with sensitivity weights: share of the crops drawn in proportion to the weight they hold, the loss reweighted
    # so that its expectation is unchanged (WeightedCrops); 0: uniform crops. W4A4, 1200 steps, held out / all 80,
    # three folds: mean 0.575 / 0.801 against 0.567 / 0.721 with uniform crops (held out level, all 80 up on each
    # fold); at 300 steps, three folds, held out 0.533 against 0.457 (docs/methods.md)
    weighted_crops: float = 0.5
    # lambda of the rounding regulariser; at AdaRound's 0.01 the hard rounding ended far from the soft one here
    round_weight: float = 1.0
    warmup: float = 0.2  # share of steps without the regulariser
    lr_round: float = 1e-2  # AdaRound's 1e-3 assumes ~20k steps; V must travel ~2.4 to reach h = 0 or 1
    lr_scale: float = 1e-3  # Adam step for step sizes, relative to each quantizer's initial step
    lr_bias: float = 1e-3  # Adam step for the conv biases (0: biases fixed, as in AdaRound, BRECQ and QDrop)
    lambda_iou: float = 1.0
    lambda_cls: float = 1.0
    # images on which each unit's loss is reported before and after and judged (keep or revert): the first ones, or
    # with sensitivity weights the ones that carry the most weight for that unit
    eval_images: int = 4
    # the last val_images calibration images are not trained on: each unit's loss is judged on all of them (a unit
    # that ends worse there is put back), so the keep-or-revert decision sees overfitting; 0: judged on eval_images
    # training images. W4A8 with GPTQ's start, an eighth held back: held out 0.817 against 0.778 on three folds, level
    # over five (see start_rounding); W4A4 two folds: -0.045 (docs/methods.md)
    val_images: int = 0
    # also train on the mirror image of every training image (as Ultralytics trains with fliplr): twice the data
    # for the same steps. W4A4, two seeds: held out 0.649 against 0.672 without; W4A8 seed 0: 0.860 against 0.872;
    # so off (docs/methods.md)
    flip: bool = False

    def __post_init__(self) -> None:
        if self.method not in PRESETS:
            raise YoloqError(f"unknown fine-tuning method {self.method!r}; choose from {', '.join(PRESETS)}")
        for k in ("iters", "batch", "crop", "eval_images"):
            if getattr(self, k) < 1:
                raise YoloqError(f"{k} must be at least 1, got {getattr(self, k)}")
        if self.start_rounding not in ("nearest", "gptq"):
            raise YoloqError(f"start_rounding must be 'nearest' or 'gptq', got {self.start_rounding!r}")
        if self.val_images < 0:
            raise YoloqError(f"val_images must be at least 0, got {self.val_images}")
        if not 0 <= self.drop_prob < 1:
            raise YoloqError(f"drop probability must be in [0, 1), got {self.drop_prob}")
        if not 0 <= self.dither <= 1:
            raise YoloqError(f"dither must be in [0, 1], got {self.dither}")
        if self.average is not None and not 0 <= self.average < 1:
            raise YoloqError(f"average (a decay) must be in [0, 1), got {self.average}")
        if self.sensitivity is not None and not 0 <= self.sensitivity <= 1:
            raise YoloqError(f"sensitivity must be in [0, 1], got {self.sensitivity}")
        if not 0 <= self.weighted_crops <= 1:
            raise YoloqError(f"weighted_crops must be in [0, 1], got {self.weighted_crops}")
        if self.sensitivity_probes < 1:
            raise YoloqError(f"sensitivity_probes must be at least 1, got {self.sensitivity_probes}")
        if self.sensitivity and self.layer_wise:
            raise YoloqError("sensitivity weighting needs block units; it does not apply to layer-wise (adaround)")

    @classmethod
    def preset(cls, method: str, **overrides) -> "TaskQConfig":
        """The method's switches, then the overrides (an unknown method is rejected by __post_init__)."""
        return cls(method=method, **{**PRESETS.get(method, {}), **overrides})

    def for_bits(self, act_bits: int) -> "TaskQConfig":
        """This config with the settings left to the bit width decided: crop context at 8-bit activations,
        sensitivity weighting and parameter averaging below."""
        a8 = act_bits >= 8
        context = a8 if self.context is None else self.context
        sensitivity = (0.0 if a8 else 1.0) if self.sensitivity is None else self.sensitivity
        average = (0.0 if a8 else 0.99) if self.average is None else self.average
        return replace(self, context=context, sensitivity=sensitivity, average=average)

    def to_dict(self) -> dict:
        return asdict(self)


# what each baseline switches off (all share the code above); they keep their papers' fixed biases, plain crops and
# plain loss, and each is block-mse with one change
_BLOCK_MSE = {"sparse": False, "dtr": False, "stahq": False, "lr_bias": 0.0, "context": False, "sensitivity": 0.0,
              "weighted_crops": 0.0, "dither": 0.0, "average": 0.0, "start_rounding": "nearest", "val_images": 0}
PRESETS: dict[str, dict] = {
    "taskq": {},
    "block-mse": _BLOCK_MSE,
    # BRECQ: block-mse with its Fisher-diagonal weighting of each block's output error. BRECQ squares the gradients
    # of the task loss; without labels the Gauss-Newton diagonal of the float model's detections is that Fisher's
    # expectation under the model's own outputs (the sensitivity weights), so it needs no labels either
    "brecq": {**_BLOCK_MSE, "sensitivity": 1.0},
    "qdrop": {**_BLOCK_MSE, "drop_prob": 0.5},
    "adaround": {**_BLOCK_MSE, "layer_wise": True, "learn_steps": False},
}


# ---- feature caches ------------------------------------------------------------------------------------------------
class FeatureCache:
    """Every layer output still needed later, per image, for the quantized and the float model.

    advance(i) computes layer i from its cached inputs (one image at a time, so a resumed run repeats the exact
    same operations) and frees the outputs no later layer reads.
    """

    def __init__(self, qmodel, fpmodel, images: list[torch.Tensor]) -> None:
        self.q, self.fp = qmodel, fpmodel
        self.sources = yolo.layer_sources(qmodel)
        self.last_use = {-1: 0}
        for i, src in enumerate(self.sources):
            for j in src:
                self.last_use[j] = max(self.last_use.get(j, -1), i)
        self.out = {"q": {-1: images}, "fp": {-1: images}}

    def inputs(self, path: str, i: int) -> list[list[torch.Tensor]]:
        return [self.out[path][j] for j in self.sources[i]]

    @torch.no_grad()
    def advance(self, i: int) -> None:
        for path in ("q", "fp"):
            model = self.q if path == "q" else self.fp
            ins = self.inputs(path, i)
            self.out[path][i] = [yolo.run_layer(model, i, [x[k] for x in ins]) for k in range(len(ins[0]))]
            for j in self.sources[i]:
                if self.last_use.get(j, -1) <= i and j in self.out[path] and j != -1:
                    del self.out[path][j]


# ---- crops ---------------------------------------------------------------------------------------------------------
Box = tuple[int, int, int, int, tuple[int, int, int, int]]


def _crop_grid(imgsz: int, crop: int, align: int, margin: int):
    """(full side with context, positions per axis, the crop's scored span from its start) of the crops below."""
    side = max(align, min(imgsz, crop) // align * align)
    m = -(-margin // align) * align
    full = min(imgsz // align * align, side + 2 * m)
    cells = (imgsz - full) // align + 1

    def inner(a0):
        return (a0 if a0 == 0 else a0 + m), (a0 + full if a0 + full >= imgsz else a0 + full - m)

    return full, cells, inner


def _box(img: int, y0: int, x0: int, full: int, inner) -> Box:
    (sy0, sy1), (sx0, sx1) = inner(y0), inner(x0)
    return img, y0, x0, full, (sy0, sx0, sy1, sx1)


def _crop_boxes(gen: torch.Generator, n: int, imgsz: int, crop: int, align: int, margin: int = 0) -> list[Box]:
    """n (image, y0, x0, side, scored) crops in input pixels, aligned to `align` (the coarsest stride used).

    Each crop adds `margin` pixels of context on every side; `scored` (y0, x0, y1, x1) is the part whose cells see
    only real context: the crop less the margin, except along the image's own edges, where the padding is real."""
    full, cells, inner = _crop_grid(imgsz, crop, align, margin)
    out = []
    for _ in range(n):
        r = torch.randint(0, 1 << 30, (3,), generator=gen).tolist()
        out.append(_box(r[0], (r[1] % cells) * align, (r[2] % cells) * align, full, inner))
    return out


MULTINOMIAL_MAX = 2**24  # torch.multinomial draws from at most this many categories


class WeightedCrops:
    """Crops drawn in proportion to the sensitivity weight they hold (importance sampling).

    With weights concentrated on a few objects, most uniform crops carry almost none, and a step's gradient rests on
    the one or two that do. Drawing crop c with probability q_c = (1 - share) / M + share * mass_c / sum(mass), M
    candidates, and multiplying its loss by (1 / M) / q_c keeps the expected loss that of uniform crops while the
    steps see the weighted regions far more often. A crop's mass: per unit output, the mean weight inside its scored
    part (the whole crop unless it carries context), summed over the outputs (as the loss sums them)."""

    def __init__(self, ws: list[list[torch.Tensor]], imgsz: int, crop: int, align: int, margin: int, share: float):
        self.full, self.cells, self.inner = _crop_grid(imgsz, crop, align, margin)
        self.align = align
        # the context margin is computed but not scored, so it holds no mass
        spans = torch.tensor([self.inner(a * align) for a in range(self.cells)])
        mass = 0.0
        for per_image in ws:
            st = imgsz // per_image[0].shape[-1]
            lo, hi = spans[:, 0] // st, spans[:, 1] // st
            area = ((hi - lo)[:, None] * (hi - lo)[None, :]).clamp_min(1)
            # integral image: the sum over any window in four lookups
            w = torch.stack([x.float().sum(dim=tuple(range(x.dim() - 2))) for x in per_image])  # (N, H, W)
            ii = F.pad(w.cumsum(1).cumsum(2), (1, 0, 1, 0))
            win = ii[:, hi][:, :, hi] - ii[:, lo][:, :, hi] - ii[:, hi][:, :, lo] + ii[:, lo][:, :, lo]
            mass = mass + win / area
        self.mass = mass = mass.clamp_min(0).flatten()  # per candidate: image, then row, then column
        uniform = torch.full_like(mass, 1 / mass.numel())
        self.q = (1 - share) * uniform + share * mass / mass.sum().clamp_min(1e-30)
        self.ratio = uniform / self.q  # importance weight per candidate

    def draw(self, gen: torch.Generator, n: int) -> tuple[list[Box], torch.Tensor]:
        """n crops (as _crop_boxes gives them) and the factor each one's loss is multiplied by."""
        if self.q.numel() <= MULTINOMIAL_MAX:
            idx = torch.multinomial(self.q, n, replacement=True, generator=gen)
        else:
            # the first layer crops on a 1-pixel grid: 231k positions per 640-px image, too many over 73 images.
            # An image by its share of q, then a position in it: the same distribution in two draws
            per = self.q.view(-1, self.cells * self.cells)
            img = torch.multinomial(per.sum(1), n, replacement=True, generator=gen)
            pos = torch.cat([torch.multinomial(per[i], 1, generator=gen) for i in img.tolist()])
            idx = img * self.cells * self.cells + pos
        out = []
        for k in idx.tolist():
            img, rest = divmod(k, self.cells * self.cells)
            out.append(_box(img, rest // self.cells * self.align, rest % self.cells * self.align, self.full, self.inner))
        return out, self.ratio[idx]


def _cut(feats: list[torch.Tensor], boxes: list[Box], imgsz: int) -> torch.Tensor:
    parts = []
    for img, y0, x0, side, _ in boxes:
        x = feats[img % len(feats)]
        st = imgsz // x.shape[-1]
        parts.append(x[..., y0 // st:(y0 + side) // st, x0 // st:(x0 + side) // st])
    return torch.cat(parts)


def _scored_cells(out: torch.Tensor, boxes: list[Box]) -> torch.Tensor:
    """(B, H, W) 1 where a cell of a unit output on these crops lies in its crop's scored part, else 0."""
    h, w = out.shape[-2:]
    masks = []
    for _, y0, x0, side, (sy0, sx0, sy1, sx1) in boxes:
        cy = y0 + (torch.arange(h) + 0.5) * (side / h)
        cx = x0 + (torch.arange(w) + 0.5) * (side / w)
        masks.append(((cy >= sy0) & (cy < sy1))[:, None] & ((cx >= sx0) & (cx < sx1))[None, :])
    return torch.stack(masks).to(out.dtype)


@torch.no_grad()
def receptive_margin(fp_mods: list[nn.Module], ins_fp: list[list[torch.Tensor]], imgsz: int) -> int:
    """Input pixels an output cell of the unit reaches beyond its own: per module, the sum over its convs and pools
    of the kernel's reach times that layer's input stride (exact for a chain, more for parallel paths, less for
    attention, which sees the whole map); the largest over the unit's modules."""
    reach = []

    def hook(m, args):
        k = m.conv if isinstance(m, QConv2d) else m
        size, dil = (_pair(k.kernel_size), _pair(k.dilation))
        reach[-1] += max((s - 1) // 2 * d for s, d in zip(size, dil)) * imgsz / args[0].shape[-1]

    for mod, x in zip(fp_mods, ins_fp):
        reach.append(0.0)
        # a QConv2d convolves with F.conv2d, so the nn.Conv2d it holds never fires: each conv counts once
        kinds = (QConv2d, nn.Conv2d, nn.MaxPool2d)
        hooks = [m.register_forward_pre_hook(hook) for m in mod.modules() if isinstance(m, kinds)]
        try:
            mod(x[0])
        finally:
            for h in hooks:
                h.remove()
    return math.ceil(max(reach))


def _pair(v) -> tuple[int, ...]:
    return tuple(v) if isinstance(v, (tuple, list)) else (v, v)


def _weighted_mean(x: torch.Tensor, w: torch.Tensor | None) -> torch.Tensor:
    return x.mean() if w is None else (x * w).sum() / w.sum().clamp_min(1)


# ---- sensitivity weights -------------------------------------------------------------------------------------------
Weights = dict[str, list[list[torch.Tensor]]]  # unit name -> per output -> per image


def _detections(fpmodel, head: dict[tuple[str, int], torch.Tensor]) -> torch.Tensor:
    """What the detections are made of, flat: per anchor every class score, and the box corners in units of the
    float box's size, times the float confidence (a box error matters as it moves IoU, and only where there is an
    object)."""
    g = []
    for s in range(len(head) // 2):
        box, cls = yolo.decode_boxes(fpmodel, head[("box", s)], s), head[("cls", s)]
        size = (box[..., 2:] - box[..., :2]).detach().clamp_min(1.0).repeat(1, 1, 2)
        conf = cls.detach().sigmoid().amax(1).flatten(1)[..., None]
        g += [(box / size * conf).flatten(), cls.sigmoid().flatten()]
    return torch.cat(g)


def output_sensitivity(fpmodel, units: list[yolo.Unit], images: list[torch.Tensor], probes: int, mix: float,
                       seed: int, on_image=None) -> Weights:
    """Per unit output and image, how much each element moves the detections g: the diagonal of JᵀJ (J the
    Jacobian of g with respect to that output, all later layers float), estimated as the mean of (Jᵀr)² over
    Rademacher probes r, since E[(Jᵀr)²] = diag(JᵀJ). A unit's squared error weighted by it is the diagonal
    (Gauss-Newton) approximation of the error it causes in g. Each output's weights are divided by their mean over
    all images and mixed with plain ones: (1 - mix) + mix * w / mean(w)."""
    sources = yolo.layer_sources(fpmodel)
    head_idx = len(fpmodel.model) - 1
    branches = yolo.head_branches(fpmodel)
    gen = torch.Generator().manual_seed(seed)
    raw: Weights = {u.name: [[] for _ in u.paths] for u in units}
    for x in images:
        with torch.enable_grad():
            outs = yolo.run_layers(fpmodel, x.detach().requires_grad_(True), stop=head_idx)
            head = {(t, s): branches[t][s](outs[j]) for s, j in enumerate(sources[head_idx]) for t in ("box", "cls")}
            wanted = {u.name: [head[b] for b in u.branches] if u.is_head else [outs[_layer_index(u)]] for u in units}
            for t in (t for ts in wanted.values() for t in ts):
                t.retain_grad()
            g = _detections(fpmodel, head)
            acc = {name: [torch.zeros_like(t) for t in ts] for name, ts in wanted.items()}
            for k in range(probes):
                for t in (t for ts in wanted.values() for t in ts):
                    t.grad = None
                r = torch.randint(0, 2, g.shape, generator=gen).to(g.dtype) * 2 - 1
                g.backward(r, retain_graph=k < probes - 1)
                for name, ts in wanted.items():
                    for a, t in zip(acc[name], ts):
                        a += t.grad.detach() ** 2 / probes
        for name, per_out in acc.items():
            for k, a in enumerate(per_out):
                raw[name][k].append(a)
        if on_image:
            on_image()
    for per_out in raw.values():
        for k, ws in enumerate(per_out):
            mean = sum(float(w.sum()) for w in ws) / max(sum(w.numel() for w in ws), 1)
            # bfloat16: the maps hold as many elements as the feature cache, and weights need no more precision
            per_out[k] = [((1 - mix) + mix * w / max(mean, 1e-30)).to(torch.bfloat16) for w in ws]
    return raw


def heaviest_images(ws: list[list[torch.Tensor]], n: int) -> list[int]:
    """The n images (indices) on which a unit's outputs carry the most sensitivity weight, each output counted by
    its mean weight so that a large output does not decide alone."""
    mass = [sum(float(w[k].float().mean()) for w in ws) for k in range(len(ws[0]))]
    return sorted(range(len(mass)), key=lambda k: -mass[k])[:n]


# ---- one unit --------------------------------------------------------------------------------------------------------
class ParamAverage:
    """Exponential moving average of parameters (Polyak averaging): `update()` after each step folds their values
    in (the first call takes them as they are), `put_in()` writes the average into them.

    >>> p = nn.Parameter(torch.tensor(1.0)); avg = ParamAverage([p], decay=0.5)
    >>> for v in (1.0, 2.0, 3.0):
    ...     _ = p.data.fill_(v); avg.update()
    >>> avg.put_in(); float(p)
    2.25
    """

    def __init__(self, params, decay: float) -> None:
        self.params, self.decay, self.avg = list(params), decay, None

    @torch.no_grad()
    def update(self) -> None:
        if self.avg is None:
            self.avg = [p.detach().clone() for p in self.params]
            return
        for a, p in zip(self.avg, self.params):
            a.lerp_(p, 1 - self.decay)

    @torch.no_grad()
    def put_in(self) -> None:
        for a, p in zip(self.avg or [], self.params):
            p.copy_(a)


class UnitTrainer:
    """Reconstruct one unit: modules q_mods[k] (quantized) and fp_mods[k] (float) on inputs k."""

    def __init__(self, cfg: TaskQConfig, qmodel, fpmodel, unit: yolo.Unit | None, q_mods, fp_mods, imgsz: int) -> None:
        self.cfg, self.qmodel, self.fpmodel, self.unit = cfg, qmodel, fpmodel, unit
        self.q_mods, self.fp_mods, self.imgsz = q_mods, fp_mods, imgsz
        self.branches = unit.branches if unit is not None else []
        self.convs = [m for q in q_mods for m in q.modules() if isinstance(m, QConv2d)]
        self.act_quantizers = [q for m in q_mods for _, q in iter_quantizers(m) if not q.weight and not q.fixed]

    # -- loss --
    def outputs(self, xs_q, xs_fp):
        q = [m(x) for m, x in zip(self.q_mods, xs_q)]
        with torch.no_grad():
            fp = [m(x) for m, x in zip(self.fp_mods, xs_fp)]
        return q, fp

    def loss(self, xs_q, xs_fp, boxes: list[Box] | None = None, ws=None) -> tuple[torch.Tensor, dict]:
        """On whole maps, or on crops (`boxes`), where only each crop's scored cells count; `ws`: per output, the
        element weights of the sensitivity weighting (None: plain squared error)."""
        q, fp = self.outputs(xs_q, xs_fp)
        masks = [None if boxes is None else _scored_cells(a, boxes) for a in q]
        ws = ws or [None] * len(q)
        rec = sum(_weighted_mean((((a - b) ** 2) * (1 if w is None else w)).sum(1), m)
                  for a, b, m, w in zip(q, fp, masks, ws))
        parts = {"rec": float(rec.detach())}
        if self.cfg.dtr and self.branches:
            dtr = self._dtr(q, fp, xs_fp, masks)
            parts["dtr"] = float(dtr.detach())
            rec = rec + dtr
        return rec, parts

    def _confidence(self, scale: int, x_fp: torch.Tensor) -> torch.Tensor:
        """The float model's confidence per anchor at this scale (max class score): the DTR weights."""
        cls = yolo.head_branches(self.fpmodel)["cls"][scale]
        with torch.no_grad():
            return self._max_score(cls(x_fp))

    @staticmethod
    def _max_score(logits: torch.Tensor) -> torch.Tensor:
        return logits.sigmoid().amax(1).flatten(1)  # (B, HW)

    def _dtr(self, q, fp, xs_fp, masks) -> torch.Tensor:
        total = 0.0
        for (task, scale), a, b, x_fp, m in zip(self.branches, q, fp, xs_fp, masks):
            # a class unit's float output already is the float class branch at this scale
            w = self._max_score(b) if task == "cls" else self._confidence(scale, x_fp)
            if m is not None:
                w = w * m.flatten(1)
            norm = w.sum().clamp_min(1e-6)
            if task == "box":
                iou = yolo.box_iou_pairs(yolo.decode_boxes(self.qmodel, a, scale),
                                         yolo.decode_boxes(self.fpmodel, b, scale))
                total = total + self.cfg.lambda_iou * (w * (1 - iou)).sum() / norm
            else:
                t = b.sigmoid()
                # BCE against soft targets minus the targets' own entropy: zero when the scores agree
                bce = F.binary_cross_entropy_with_logits(a, t, reduction="none") - \
                    F.binary_cross_entropy_with_logits(b, t, reduction="none")
                total = total + self.cfg.lambda_cls * (w * bce.sum(1).flatten(1)).sum() / norm
        return total

    @torch.no_grad()
    def evaluate(self, ins_q, ins_fp, ws=None, every: bool = False) -> float:
        """Mean loss over whole feature maps of the first eval_images images, or of all with `every` (hard rounding if
        baked): the judged images, which train() puts first."""
        n = len(ins_q[0]) if every else min(self.cfg.eval_images, len(ins_q[0]))
        vals = [float(self.loss([x[k] for x in ins_q], [x[k] for x in ins_fp], None,
                                ws and [w[k] for w in ws])[0]) for k in range(n)]
        return sum(vals) / len(vals)

    # -- training --
    @torch.no_grad()
    def gptq_start(self, ins_q) -> None:
        """Replace each low-bit conv's weights by GPTQ's compensated ones (gptq_latent), from its inputs on whole maps
        of the training images, in one pass through the unit as it stands (later convs see the earlier ones rounded
        to nearest). The float reference is a separate model, so it keeps the original weights."""
        stats = InputStats(nn.ModuleList(self.q_mods), hessians=True)  # calibration's GPTQ choice of convs
        try:
            for k in range(len(ins_q[0])):
                for mod, x in zip(self.q_mods, ins_q):
                    mod(x[k])
        finally:
            stats.remove()
        for m, acc in stats.hess.items():
            wq, w = m.weight_quantizer, m.conv.weight
            lat = gptq_latent(w.reshape(w.shape[0], -1), acc.hessian(), wq.scale.detach().reshape(-1),
                              wq.spec.qmin, wq.spec.qmax)
            w.copy_(lat.reshape_as(w))

    def setup(self) -> list[dict]:
        groups = []
        for m in self.convs:
            m.start_rounding()
            groups.append({"params": [m.rounding.v], "lr": self.cfg.lr_round})
        if self.cfg.learn_steps:
            for q in self.act_quantizers + [m.weight_quantizer for m in self.convs]:
                q.learn(True)
                groups.append({"params": [q.scale], "lr": self.cfg.lr_scale * float(q.scale.detach().mean())})
        if self.cfg.lr_bias > 0:
            biases = [m.conv.bias for m in self.convs if m.conv.bias is not None]
            for b in biases:
                b.requires_grad_(True)
            groups.append({"params": biases, "lr": self.cfg.lr_bias})
        for q in self.act_quantizers:
            q.drop_prob, q.dither = self.cfg.drop_prob, self.cfg.dither
        return groups

    def finish(self) -> None:
        for q in self.act_quantizers + [m.weight_quantizer for m in self.convs]:
            q.learn(False)
            q.drop_prob = q.dither = 0.0
        for m in self.convs:
            m.bake_rounding()
            m.bound_accumulator()
            if m.conv.bias is not None:
                m.conv.bias.requires_grad_(False)

    def train(self, ins_q, ins_fp, seed: int, on_step=None, n_train: int | None = None, ws=None) -> dict:
        """Crops come from the first n_train images (all by default); the loss before and after, which decides
        whether the unit keeps its training, is measured on the images after them when there are any. `ws`: per
        output, per image, the sensitivity weights (None: plain squared error)."""
        from yoloq.core.adaround import BetaSchedule

        t0 = time.perf_counter()
        n_train = len(ins_q[0]) if n_train is None else n_train
        held = n_train < len(ins_q[0])
        judge_q, judge_fp = ([x[n_train:] for x in ins_q], [x[n_train:] for x in ins_fp]) if held else (ins_q, ins_fp)
        judge_w = ws and ([w[n_train:] for w in ws] if held else ws)
        if ws and not held:  # judge where the weights are: on images with little weight the loss is mostly noise
            pick = heaviest_images(ws, self.cfg.eval_images)
            judge_q, judge_fp, judge_w = ([[x[k] for k in pick] for x in ins] for ins in (ins_q, ins_fp, ws))
        ins_q, ins_fp = [x[:n_train] for x in ins_q], [x[:n_train] for x in ins_fp]
        ws = ws and [w[:n_train] for w in ws]
        if self.cfg.start_rounding == "gptq":
            self.gptq_start(ins_q)
        before = self.evaluate(judge_q, judge_fp, judge_w, every=held)
        train_before = self.evaluate(ins_q, ins_fp, ws) if held else before
        start = [{k: v.clone() for k, v in m.state_dict().items()} for m in self.q_mods]
        gen = torch.Generator().manual_seed(seed)
        torch.manual_seed(seed)  # QDrop masks
        opt = torch.optim.Adam(self.setup())
        beta = BetaSchedule(self.cfg.iters, self.cfg.warmup)
        align = max(self.imgsz // x[0].shape[-1] for x in ins_q)
        margin = receptive_margin(self.fp_mods, ins_fp, self.imgsz) if self.cfg.context else 0
        sampler = (WeightedCrops(ws, self.imgsz, self.cfg.crop, align, margin, self.cfg.weighted_crops)
                   if ws and self.cfg.weighted_crops > 0 else None)
        parts = {}
        # the last step's values fit the last few crops and dither draws; their average, taken while the rounding
        # regulariser anneals, fits the images rather than the draws
        average = ParamAverage([p for g in opt.param_groups for p in g["params"]], self.cfg.average or 0.0)
        for t in range(self.cfg.iters):
            if sampler is None:
                boxes = _crop_boxes(gen, self.cfg.batch, self.imgsz, self.cfg.crop, align, margin)
            else:
                boxes, ratio = sampler.draw(gen, self.cfg.batch)
            crops_q, crops_fp = ([_cut(x, boxes, self.imgsz) for x in ins] for ins in (ins_q, ins_fp))
            if self.cfg.drop_prob > 0:
                # QDrop drops the quantization of the unit's input as well: each element is the float model's
                # with probability p, so the unit cannot fit the exact errors the quantized layers before it make
                drop = self.cfg.drop_prob
                crops_q = [torch.where(torch.rand_like(q) < drop, f, q) for q, f in zip(crops_q, crops_fp)]
            crops_w = ws and [_cut(w, boxes, self.imgsz) for w in ws]
            if sampler is not None:
                crops_w = [w.float() * ratio.view(-1, *[1] * (w.dim() - 1)) for w in crops_w]
            # no margin: every cell counts
            loss, parts = self.loss(crops_q, crops_fp, boxes if margin else None, crops_w)
            b = beta(t)
            if b is not None:
                reg = self.cfg.round_weight * sum(m.rounding.regularizer(b) for m in self.convs)
                loss = loss + reg
                parts["round"] = float(reg.detach())
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            for q in self.act_quantizers:
                q.clamp_scale(MIN_ACT_SCALE)
            for m in self.convs:
                m.weight_quantizer.clamp_scale(1e-8)
            if self.cfg.average and b is not None:
                average.update()
            if on_step:
                on_step(parts)
        average.put_in()
        self.finish()
        after = trained = self.evaluate(judge_q, judge_fp, judge_w, every=held)
        extra = ({"train_loss_before": train_before, "train_loss_after": self.evaluate(ins_q, ins_fp, ws)}
                 if held else {})
        kept = after <= before
        if not kept:  # a short schedule can end worse than it started (measured on whole maps): keep the start
            for m, sd in zip(self.q_mods, start):
                m.load_state_dict(sd)
            with torch.no_grad():  # the start rounded to nearest (with GPTQ's start: its rounding) and baked
                for m in self.convs:
                    m.conv.weight.copy_(m.weight_quantizer(m.conv.weight))
            after = before
        return {"loss_before": before, "loss_after": after, "loss_trained": trained, "kept": kept,
                "seconds": time.perf_counter() - t0, **extra, **parts}


# ---- the whole model -------------------------------------------------------------------------------------------------
def float_reference(qmodel: nn.Module) -> nn.Module:
    """The float model: a copy with every quantizer switched off (valid while the weights are unrounded)."""
    fp = copy.deepcopy(qmodel).eval()
    for _, q in iter_quantizers(fp):
        q.enabled = False
    for p in fp.parameters():
        p.requires_grad_(False)
    return fp


def _layer_index(unit: yolo.Unit) -> int | None:
    return None if unit.is_head else int(unit.paths[0].split(".")[1])


def _layer_wise_parts(qlayer, fplayer, ins_q, ins_fp):
    """For AdaRound: each conv of a layer with its own inputs, captured by hooks (earlier convs already baked)."""
    names = [n for n, m in qlayer.named_modules() if isinstance(m, QConv2d)]
    for name in names:
        qm, fm = qlayer.get_submodule(name) if name else qlayer, fplayer.get_submodule(name) if name else fplayer
        got = {"q": [], "fp": []}
        hq = qm.register_forward_pre_hook(lambda m, a: got["q"].append(a[0]))
        hf = fm.register_forward_pre_hook(lambda m, a: got["fp"].append(a[0]))
        with torch.no_grad():
            for k in range(len(ins_q[0])):
                qlayer(ins_q[0][k])
                fplayer(ins_fp[0][k])
        hq.remove()
        hf.remove()
        yield name, qm, fm, [got["q"]], [got["fp"]]


def reconstruct(qmodel, fpmodel, images: list[torch.Tensor], cfg: TaskQConfig, imgsz: int,
                state: "ResumeState | None" = None) -> list[dict]:
    """Fine-tune qmodel in place, unit by unit. Returns a report per unit."""
    if cfg.val_images >= len(images):
        raise YoloqError(f"val_images ({cfg.val_images}) must leave some of the {len(images)} images to train on")
    if cfg.flip:
        train = images[: len(images) - cfg.val_images]
        images = train + [x.flip(-1) for x in train] + images[len(train):]
    units = yolo.reconstruction_units(qmodel, head_wise=cfg.stahq)
    cache = FeatureCache(qmodel, fpmodel, images)
    done = state.done if state else 0
    reports = list(state.reports) if state else []
    layer_done = -1
    with progress() as bar, hide_on_error(bar) as task:
        weights = None
        if cfg.sensitivity:
            bar.update(task, total=len(images), description="sensitivity")
            weights = output_sensitivity(fpmodel, units, images, cfg.sensitivity_probes, cfg.sensitivity, cfg.seed,
                                         lambda: bar.update(task, advance=1))
            bar.update(task, completed=0)
        bar.update(task, total=len(units), description=cfg.method)
        for k, unit in enumerate(units):
            i = _layer_index(unit)
            if i is not None:
                for j in range(layer_done + 1, i):  # parameter-free layers in between (Upsample, Concat)
                    cache.advance(j)
                layer_done = i - 1
            if k >= done:
                steps = cfg.iters * (len(_convs_of(qmodel, unit)) if cfg.layer_wise else 1)
                step = bar.add_task(f"  {unit.name}", total=steps, info="")

                def on_step(parts, step=step):
                    bar.update(step, advance=1, info=" ".join(f"{k}={v:.4g}" for k, v in parts.items()))

                reports.append(_train_unit(cfg, qmodel, fpmodel, unit, cache, imgsz, seed=cfg.seed * 100003 + k,
                                           on_step=on_step, ws=weights and weights[unit.name]))
                bar.update(step, visible=False)
                if state:
                    state.save(qmodel, k + 1, reports)
            if i is not None:
                cache.advance(i)
                layer_done = i
            bar.update(task, advance=1, info=unit.name)
    return reports


def _convs_of(qmodel, unit) -> list[QConv2d]:
    return [m for p in unit.paths for m in qmodel.get_submodule(p).modules() if isinstance(m, QConv2d)]


def _train_unit(cfg, qmodel, fpmodel, unit, cache, imgsz, seed, on_step, ws=None) -> dict:
    n_train = len(cache.out["fp"][-1]) - cfg.val_images
    if unit.is_head:
        q_mods = [qmodel.get_submodule(p) for p in unit.paths]
        fp_mods = [fpmodel.get_submodule(p) for p in unit.paths]
        ins_q = [cache.out["q"][j] for j in unit.feeds]
        ins_fp = [cache.out["fp"][j] for j in unit.feeds]
    else:
        i = _layer_index(unit)
        q_mods, fp_mods = [qmodel.model[i]], [fpmodel.model[i]]
        ins_q, ins_fp = cache.inputs("q", i), cache.inputs("fp", i)
        if len(ins_q) != 1:
            raise YoloqError(f"{unit.name}: layers with weights and several inputs are not supported")
    if cfg.layer_wise:  # one conv at a time, each module (layer or head branch) on its own input
        parts = []
        for b, (qm, fm, iq, ifp) in enumerate(zip(q_mods, fp_mods, ins_q, ins_fp)):
            for n, (_, qc, fc, iq2, ifp2) in enumerate(_layer_wise_parts(qm, fm, [iq], [ifp])):
                trainer = UnitTrainer(cfg, qmodel, fpmodel, None, [qc], [fc], imgsz)
                parts.append(trainer.train(iq2, ifp2, seed * 31 + 7 * b + n, on_step, n_train))
        return {"unit": unit.name, "loss_before": sum(p["loss_before"] for p in parts),
                "loss_after": sum(p["loss_after"] for p in parts), "seconds": sum(p["seconds"] for p in parts)}
    trainer = UnitTrainer(cfg, qmodel, fpmodel, unit, q_mods, fp_mods, imgsz)
    r = trainer.train(ins_q, ins_fp, seed, on_step, n_train, ws)
    return {"unit": unit.name, **r}


# ---- resume ----------------------------------------------------------------------------------------------------------
class ResumeState:
    """`<out>.partial`: the float reference, the settings, and the model after each finished unit."""

    def __init__(self, path: Path, cfg: TaskQConfig, fingerprint: dict) -> None:
        self.path, self.cfg, self.fingerprint = path, cfg, fingerprint
        self.done, self.reports, self.payload = 0, [], None

    def load(self) -> bool:
        """Read an earlier run's state; False when there is none. A state from other settings is an error."""
        from yoloq.io import read_partial

        p = read_partial(self.path, STATE_FORMAT, self.cfg.to_dict(), self.fingerprint, "fine-tuning")
        if p is None:
            return False
        self.payload, self.done, self.reports = p, int(p["done"]), list(p["reports"])
        return True

    def start(self, checkpoint_payload: dict, fp_state: dict, sparse_rows: list[dict]) -> None:
        self.payload = {"format": STATE_FORMAT, "config": self.cfg.to_dict(), "fingerprint": self.fingerprint,
                        "checkpoint": checkpoint_payload, "fp_state": fp_state, "sparse": sparse_rows,
                        "done": 0, "reports": []}

    def save(self, qmodel, done: int, reports: list[dict]) -> None:
        from yoloq.io import write_partial

        self.payload["checkpoint"]["state_dict"] = {k: v.detach().clone() for k, v in qmodel.state_dict().items()}
        self.payload["done"], self.payload["reports"] = done, [dict(r) for r in reports]
        self.done, self.reports = done, reports
        write_partial(self.path, self.payload)

    def remove(self) -> None:
        self.path.unlink(missing_ok=True)


def check_startable(qmodel) -> None:
    """Reconstruction needs the float weights underneath the quantizers: refuse checkpoints whose weights were
    already rounded in place (GPTQ, bias correction or an earlier fine-tuning)."""
    for m in qmodel.modules():
        if isinstance(m, QConv2d) and m.rounding is None:
            wq = m.weight_quantizer
            if wq.spec.bits < 8 and bool(wq.calibrated):
                codes = m.conv.weight.detach() / wq.scale.detach().reshape(-1, 1, 1, 1)
                if torch.allclose(codes, codes.round(), atol=1e-4) and codes.abs().max() > 1:
                    raise YoloqError("this checkpoint's weights are already rounded (GPTQ or fine-tuned); "
                                     "fine-tune from the float model (.pt) instead")


def sparse_candidates(qmodel) -> dict[str, QConv2d]:
    """SiLU outputs below 8 bits: the long-tailed tensors the sparse branch is for (not those sharing their grid
    with a Concat's consumer, which would requantize the split tensor)."""
    return {n: m for n, m in qmodel.named_modules()
            if isinstance(m, QConv2d) and m.silu and isinstance(m.output_quantizer, FakeQuantizer)
            and m.output_quantizer.spec.bits < 8 and not m.output_quantizer.shared}


# ---- sparse branch placement -----------------------------------------------------------------------------------------
class _Tee(nn.Module):
    """Calibration only: feeds x to `observer` (which records it) and returns `through(x)`."""

    def __init__(self, observer: nn.Module, through: nn.Module | None) -> None:
        super().__init__()
        self.observer, self.through = observer, through

    def forward(self, x):
        self.observer(x)
        return self.through(x) if self.through is not None else x


# A candidate is measured at the head only if the split removes at least this share of its own quantization error:
# one forward pass per candidate, and a split that barely changes its tensor cannot change the output much
SPARSE_PREFILTER = 0.25


def _head_outputs(model, images: list[torch.Tensor], cached: list[list] | None = None,
                  start: int = 0) -> list[dict[tuple[str, int], torch.Tensor]]:
    """The head's final conv outputs (the raw box and class maps the decode reads), per image by (task, scale).
    With `cached` (per image, every layer's output: yolo.run_layers), only layers from `start` on are run again."""
    finals = {id(seq[-1]): (task, scale) for task, branch in yolo.head_branches(model).items()
              for scale, seq in enumerate(branch)}
    got: list[dict] = []
    hooks = [m.register_forward_hook(lambda m, i, o: got[-1].__setitem__(finals[id(m)], o.detach()))
             for m in model.modules() if id(m) in finals]
    try:
        for n, x in enumerate(images):
            got.append({})
            if cached is None:
                model(x)
            else:
                yolo.run_layers(model, x, cached[n], start)
    finally:
        for h in hooks:
            h.remove()
    return got


def _detection_error(fpmodel, got: list[dict], targets: list[dict]) -> float:
    """How far the detections are from the float model's, per image: confidence-weighted (1 - IoU) of the decoded
    boxes plus the confidence-weighted absolute class-score error, each anchor weighed by its float confidence (the
    DTR terms, with scores compared as probabilities). A plain MSE of the raw maps is dominated by the box
    branch's DFL logits at background anchors, which no detection reads (demo YOLOv8s W4A4: a split added after
    reconstruction that cut that MSE by 27% lowered fidelity by 0.06)."""
    total = 0.0
    for q, f in zip(got, targets):
        err, norm = 0.0, 0.0
        for s in range(len(f) // 2):
            sf, sq = f[("cls", s)].sigmoid().flatten(2), q[("cls", s)].sigmoid().flatten(2)  # (B, nc, HW)
            w = sf.amax(1)
            iou = yolo.box_iou_pairs(yolo.decode_boxes(fpmodel, q[("box", s)], s),
                                     yolo.decode_boxes(fpmodel, f[("box", s)], s))
            err = err + float((w * (1 - iou)).sum() + (w * (sq - sf).abs().sum(1)).sum())
            norm = norm + float(w.sum())
        total += err / max(norm, 1e-12)
    return total / max(len(got), 1)


@torch.no_grad()
def place_sparse(qmodel, fpmodel, images: list[torch.Tensor], cfg: TaskQConfig) -> list[dict]:
    """Give the sparse outlier branch to the SiLU outputs where it pays, judged at the model's output.

    Every candidate's split is calibrated on the calibration images with its accumulator un-capped (the tail must be
    seen) and its own error measured (best plain quantizer vs best split). Those where the split removes at least
    SPARSE_PREFILTER of it are then measured where it matters: the detections' error against the float model
    (`_detection_error`) on a few images with that one tensor split. A tensor's own error says little about the
    output, and neither does a plain MSE of the head's raw maps (docs/methods.md); its size is what the branch costs
    in speed. So, largest detection-error reduction (`head_gain`) first, tensors that remove at least
    `sparse_min_gain` of it are chosen while their elements stay within
    `sparse_budget` of all candidates' and their count within `sparse_max`. Returns every candidate's
    measurements, chosen ones marked.
    """
    from yoloq.core.qspec import activation_spec
    from yoloq.core.sparse import SparseQuantizer

    cands = sparse_candidates(qmodel)
    probes, elements = {}, {}
    for name, m in cands.items():
        sq, acc = SparseQuantizer(m.output_quantizer.spec.bits, m.output_quantizer.observer_name), \
            FakeQuantizer(activation_spec(8), observer="mse")
        sq.observe()
        acc.observe()
        probes[name] = (sq, acc, m.acc_quantizer, m.output_quantizer)
        m.acc_quantizer, m.output_quantizer = _Tee(acc, None), _Tee(sq, m.output_quantizer)

    def size_of(name):
        def hook(module, args, out) -> None:  # returning a value would replace the module's output
            elements.setdefault(name, out[0].numel())
        return hook

    sizes = [m.register_forward_hook(size_of(n)) for n, m in cands.items()]
    try:
        for x in images:
            qmodel(x)
    finally:
        for h in sizes:
            h.remove()
        for name, (sq, acc, old_acc, old_out) in probes.items():
            cands[name].acc_quantizer, cands[name].output_quantizer = old_acc, old_out
    rows = []
    for name, (sq, acc, _, _) in probes.items():
        sq.freeze()
        acc.freeze()
        st = sq.stats()
        gain = 1 - st["mse_sparse"] / max(st["mse_dense_only"], 1e-12)
        rows.append({"tensor": name, "mse_dense": st["mse_dense_only"], "mse_sparse": st["mse_sparse"], "gain": gain,
                     "outlier_fraction": st["outlier_fraction"], "elements": elements.get(name, 0),
                     "head_gain": None, "chosen": False})
    probe_images = images[: cfg.eval_images]
    targets = _head_outputs(fpmodel, probe_images)
    # a split changes nothing before its own layer: those layers' outputs are computed once (the base included)
    cached = [yolo.run_layers(qmodel, x) for x in probe_images]
    base = _detection_error(fpmodel, _head_outputs(qmodel, probe_images, cached, len(qmodel.model) - 1), targets)
    for r in rows:
        if r["gain"] < SPARSE_PREFILTER:
            continue
        m, (sq, acc, plain_acc, plain_out) = cands[r["tensor"]], probes[r["tensor"]]
        m.output_quantizer, m.acc_quantizer = sq, acc
        got = _head_outputs(qmodel, probe_images, cached, int(r["tensor"].split(".")[1]))
        r["head_gain"] = 1 - _detection_error(fpmodel, got, targets) / max(base, 1e-12)
        m.output_quantizer, m.acc_quantizer = plain_out, plain_acc
    budget, used, chosen = cfg.sparse_budget * sum(r["elements"] for r in rows), 0, 0
    ranked = sorted((r for r in rows if r["head_gain"] is not None and r["head_gain"] >= cfg.sparse_min_gain),
                    key=lambda r: r["head_gain"], reverse=True)
    for r in ranked:
        if chosen == cfg.sparse_max:
            break
        if used + r["elements"] > budget:
            continue
        r["chosen"], used, chosen = True, used + r["elements"], chosen + 1
        sq, acc, _, _ = probes[r["tensor"]]
        cands[r["tensor"]].output_quantizer, cands[r["tensor"]].acc_quantizer = sq, acc
    return rows


# ---- entry point -----------------------------------------------------------------------------------------------------
def run(qm, images: list[torch.Tensor], cfg: TaskQConfig, state: ResumeState | None = None):
    """Fine-tune a calibrated QuantizedModel (weights unrounded). Returns (QuantizedModel, report).

    With `state`, finished units are saved as they complete and a state left by an interrupted run is continued.
    """
    from yoloq import checkpoint

    if state is not None and state.load():
        p = state.payload
        qm = checkpoint.load("<fine-tuning state>", dict(p["checkpoint"]))
        fp = checkpoint.load("<fine-tuning state>", {**p["checkpoint"], "state_dict": p["fp_state"]})
        fpmodel, sparse_rows = float_reference(fp.model), p["sparse"]
    else:
        check_startable(qm.model)
        fpmodel = float_reference(qm.model)
        sparse_rows = place_sparse(qm.model, fpmodel, images, cfg) if cfg.sparse else []
        qm.recipe.sparse_tensors = [r["tensor"] for r in sparse_rows if r["chosen"]]
        if state is not None:
            payload = checkpoint.payload(qm)
            state.start(payload, {k: v.clone() for k, v in payload["state_dict"].items()}, sparse_rows)
            state.save(qm.model, 0, [])
    cfg = cfg.for_bits(qm.recipe.act_bits)
    reports = reconstruct(qm.model, fpmodel, images, cfg, qm.recipe.imgsz, state)
    qm.recipe.weight_rounding = "learned"
    qm.provenance.setdefault("history", []).append({"step": "finetune", **cfg.to_dict()})
    return qm, {"units": reports, "sparse": sparse_rows}
