"""Distillation from the float model's head outputs, for QAT on few images (`--distill W`).

Fidelity measures how well the quantized model reproduces the float model's detections; pseudo-labels give the
detection loss those detections after NMS only, a few boxes per image. The float model's raw outputs say more: a
score for every anchor and class, and a distribution over distances for every box side. Per image, with w_a the float
model's confidence at anchor a (its largest class score), so that background anchors do not drown the few that
matter:

    class:  sum_{a,k} [BCE(s_q, sigmoid(s_fp)) - H(sigmoid(s_fp))] / sum_a w_a          (0 when the scores agree)
    box:    sum_a w_a * sum_sides KL(softmax(d_fp) || softmax(d_q)) / sum_a w_a     (DFL heads: reg_max bins)
            sum_a w_a * |d_q - d_fp|_1 / sum_a w_a                                 (heads without DFL, YOLO26)

Both are computed on the raw training outputs {"boxes": (B, 4*reg_max, A), "scores": (B, nc, A)}.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def distill_loss(q: dict, fp: dict, reg_max: int) -> tuple[torch.Tensor, dict]:
    """Mean over the batch of the class and box terms above; returns (loss, {"kd_cls", "kd_box"})."""
    s_q, s_fp = q["scores"].float(), fp["scores"].float().detach()
    p_fp = s_fp.sigmoid()
    w = p_fp.amax(1)  # (B, A)
    norm = w.sum(1).clamp_min(1.0)  # (B,)
    entropy = F.binary_cross_entropy_with_logits(s_fp, p_fp, reduction="none")
    cls = (F.binary_cross_entropy_with_logits(s_q, p_fp, reduction="none") - entropy).sum((1, 2)) / norm
    b, _, a = q["boxes"].shape
    d_q, d_fp = q["boxes"].float().view(b, 4, reg_max, a), fp["boxes"].float().detach().view(b, 4, reg_max, a)
    if reg_max > 1:
        per_anchor = F.kl_div(d_q.log_softmax(2), d_fp.log_softmax(2), log_target=True, reduction="none").sum((1, 2))
    else:
        per_anchor = (d_q - d_fp).abs().sum((1, 2))
    box = (w * per_anchor).sum(1) / norm
    return (cls + box).mean(), {"kd_cls": float(cls.mean().detach()), "kd_box": float(box.mean().detach())}
