"""TASKQ fine-tuning on a tiny random-init model: it lowers the reconstruction loss, resumes exactly, and the
sparse branch survives save/load and export."""

from __future__ import annotations

import numpy as np
import onnxruntime as ort
import pytest
import torch
from torch import nn

from yoloq import api
from yoloq.core.modules import iter_quantizers
from yoloq.errors import YoloqError
from yoloq.io import image_digests
from yoloq.methods import taskq
from yoloq.methods.taskq import TaskQConfig
from yoloq.recipe import Recipe

SZ = 64
TINY = {"batch": 2, "crop": 32, "eval_images": 2}


@pytest.fixture(scope="module")
def nearest_qckpt(tmp_path_factory, images_dir, lively_model):
    """W4A4, MSE ranges, weights rounded to nearest (unrounded underneath: fine-tuning can start from it)."""
    qm = api.calibrate(lively_model, str(images_dir), Recipe(4, 4, "mse", bias_correction=False,
                                                              weight_rounding="nearest", images=2, imgsz=SZ))
    return api.save(qm, tmp_path_factory.mktemp("tq") / "w4a4.qpt")


def _finetune(qckpt, images_dir, out=None, **kw):
    cfg = TaskQConfig.preset(kw.pop("method", "taskq"), **{**TINY, "sparse": False, **kw})
    return api.finetune(str(qckpt), str(images_dir), cfg, out, images=2)


def test_reconstruction_lowers_the_loss_of_every_kind_of_unit(nearest_qckpt, images_dir):
    qm, rep = _finetune(nearest_qckpt, images_dir, iters=40)
    units = rep["units"]
    assert len(units) == 16 + 6  # yolov8n: 16 trunk layers with convs, six head units
    before = sum(u["loss_before"] for u in units)
    after = sum(u["loss_after"] for u in units)
    assert after < 0.9 * before
    improved = [u["unit"] for u in units if u["loss_after"] < u["loss_before"]]
    assert len(improved) >= len(units) * 0.7, improved
    assert any(u["unit"].startswith("head box") and "dtr" in u for u in units)
    # the learned rounding is baked: every low-bit weight lies on its grid
    from yoloq.core.modules import QConv2d

    for m in qm.model.modules():
        if isinstance(m, QConv2d):
            assert m.rounding is None
            codes = m.conv.weight / m.weight_quantizer.scale.view(-1, 1, 1, 1)
            assert torch.allclose(codes, codes.round(), atol=1e-3)
    assert qm.recipe.weight_rounding == "learned"


def test_units_are_judged_on_the_images_they_did_not_train_on(nearest_qckpt, images_dir):
    cfg = TaskQConfig.preset("taskq", **{**TINY, "sparse": False, "iters": 6, "val_images": 1})
    qm, rep = api.finetune(str(nearest_qckpt), str(images_dir), cfg, images=3)
    # calibrated on two images, fine-tuned on three: the checkpoint has seen all three (yoloq eval says so)
    assert len(api.load_quantized(nearest_qckpt).provenance["seen_images"]) == 2
    assert qm.provenance["seen_images"] == image_digests(sorted(images_dir.iterdir())[:3])
    for u in rep["units"]:
        # judged on the held-back image, and the training images' loss reported beside it
        assert u["loss_before"] != u["train_loss_before"], u
        assert u["kept"] == (u["loss_trained"] <= u["loss_before"]), u
        assert u["loss_after"] == (u["loss_trained"] if u["kept"] else u["loss_before"]), u
    with pytest.raises(YoloqError, match="val_images"):
        api.finetune(str(nearest_qckpt), str(images_dir), TaskQConfig(val_images=2, **TINY, sparse=False), images=2)


def test_gptq_start_begins_every_unit_below_round_to_nearest(nearest_qckpt, images_dir):
    # one step at a tiny rate keeps every unit at its start, so each next unit is fed the starting rounding of those
    # before it; loss_before: the units' starting losses on the training images (plain MSE, whole maps)
    kw = {"iters": 1, "sensitivity": 0, "lr_round": 1e-9, "lr_scale": 1e-9, "lr_bias": 0}
    _, near = _finetune(nearest_qckpt, images_dir, **kw)
    _, gptq = _finetune(nearest_qckpt, images_dir, start_rounding="gptq", **kw)
    before = [(a["unit"], a["loss_before"], b["loss_before"]) for a, b in zip(near["units"], gptq["units"])]
    assert before[0][2] == before[0][1]  # the first layer keeps 8-bit weights: rounded to nearest either way
    assert before[1][2] < before[1][1], before[1]  # the same input: GPTQ's rounding alone lowers its error
    assert sum(g for _, _, g in before) < 0.85 * sum(n for _, n, _ in before), before
    assert sum(g < n for _, n, g in before[1:]) >= 0.8 * len(before[1:]), before
    with pytest.raises(YoloqError, match="start_rounding"):
        TaskQConfig(start_rounding="gptq-ish")


def _low_bit_convs(qm) -> list:
    from yoloq.core.modules import QConv2d

    return [m for m in qm.model.modules() if isinstance(m, QConv2d) and m.weight_quantizer.spec.bits < 8]


def _low_bit_weights(qm) -> list[torch.Tensor]:
    return [m.conv.weight.detach().clone() for m in _low_bit_convs(qm)]


def test_a_unit_put_back_after_gptq_start_keeps_gptq_rounding(nearest_qckpt, images_dir, monkeypatch):
    # the kept and the put-back runs must feed each later unit the same inputs, GPTQ's rounding follows them (at
    # W4A4 they parted from layer 3 on while keeping a unit bounded its accumulator range a second time)
    kw = {"iters": 1, "lr_round": 1e-9, "lr_scale": 1e-9, "lr_bias": 0, "val_images": 1}
    kept, _ = _finetune(nearest_qckpt, images_dir, start_rounding="gptq", **kw)  # trained a step at a tiny rate
    real_finish, real_evaluate = taskq.UnitTrainer.finish, taskq.UnitTrainer.evaluate
    monkeypatch.setattr(taskq.UnitTrainer, "finish", lambda self: setattr(self, "trained", True) or real_finish(self))
    # every unit ends worse than it started on the held-back image, so every unit is put back
    monkeypatch.setattr(taskq.UnitTrainer, "evaluate",
                        lambda self, *a, **k: real_evaluate(self, *a, **k) + 1e9 * getattr(self, "trained", False))
    back, rep = _finetune(nearest_qckpt, images_dir, start_rounding="gptq", **kw)
    assert not any(u["kept"] for u in rep["units"])
    start = api.load_quantized(nearest_qckpt)
    with torch.no_grad():
        near = [m.weight_quantizer(w) for m, w in zip(_low_bit_convs(start), _low_bit_weights(start))]
    kept_w = _low_bit_weights(kept)
    same = differ = 0
    for k, b, n in zip(kept_w, _low_bit_weights(back), near):
        same += int(torch.isclose(k, b, rtol=1e-4, atol=1e-6).sum())
        differ += int((~torch.isclose(b, n, rtol=1e-4, atol=1e-6)).sum())
    total = sum(w.numel() for w in kept_w)
    assert same >= 0.999 * total, same / total  # put back to GPTQ's rounding: the untrained GPTQ start, baked
    assert differ > 0.02 * total, differ / total  # ... not to round-to-nearest (61% here)


def test_by_default_units_start_at_nearest_and_train_on_every_image_at_any_bit_width():
    # GPTQ's start with an eighth of the images held back tied this over five folds at W4A8 and lost at W4A4
    for bits in (8, 4):
        cfg = TaskQConfig().for_bits(bits)
        assert (cfg.start_rounding, cfg.val_images) == ("nearest", 0)
    assert TaskQConfig(start_rounding="gptq", val_images=3).for_bits(8).start_rounding == "gptq"  # still selectable
    assert TaskQConfig(val_images=3).for_bits(4).val_images == 3
    with pytest.raises(YoloqError, match="val_images"):
        TaskQConfig(val_images=-1)
    for m in ("block-mse", "brecq", "qdrop", "adaround"):  # the baselines as their papers have them
        p8 = TaskQConfig.preset(m).for_bits(8)
        assert (p8.start_rounding, p8.val_images) == ("nearest", 0)


def test_flip_adds_the_mirror_of_every_training_image_and_keeps_the_judged_ones_last(nearest_qckpt, images_dir,
                                                                                     monkeypatch):
    seen = []

    class Spy(taskq.FeatureCache):
        def __init__(self, q, fp, images):
            seen.append(list(images))
            super().__init__(q, fp, images)

    monkeypatch.setattr(taskq, "FeatureCache", Spy)
    cfg = TaskQConfig(**TINY, sparse=False, iters=1, val_images=1, sensitivity=0.0, flip=True)
    api.finetune(str(nearest_qckpt), str(images_dir), cfg, images=3)
    from yoloq.data.datasets import iter_batches, resolve_data

    plain = [x for _, _, x in iter_batches(resolve_data(str(images_dir)).take(3), SZ)]
    (flipped,) = seen
    assert len(plain) == 3 and len(flipped) == 5
    for a, b in zip(flipped[:2], plain[:2]):
        assert torch.equal(a, b)
    for a, b in zip(flipped[2:4], plain[:2]):
        assert torch.equal(a, b.flip(-1)) and not torch.equal(a, b)
    assert torch.equal(flipped[4], plain[2])  # the judged image is not mirrored, and stays last


def _biases(qm) -> dict[str, torch.Tensor]:
    from yoloq.core.modules import QConv2d

    return {n: m.conv.bias.detach().clone() for n, m in qm.model.named_modules()
            if isinstance(m, QConv2d) and m.conv.bias is not None}


def test_taskq_learns_the_biases_and_block_mse_keeps_them(nearest_qckpt, images_dir):
    start = _biases(api.load_quantized(nearest_qckpt))
    for method, moves in (("taskq", True), ("block-mse", False)):
        qm, rep = _finetune(nearest_qckpt, images_dir, method=method, iters=6)
        got = _biases(qm)
        kept = {u["unit"] for u in rep["units"] if u["kept"]}
        assert kept, rep["units"]
        changed = {n for n in start if not torch.equal(start[n], got[n])}
        assert bool(changed) is moves, (method, sorted(changed)[:5])
        # learning stops with the unit: nothing is left requiring gradients
        assert not any(p.requires_grad for p in qm.model.parameters())


def test_qdrop_feeds_each_unit_inputs_mixed_from_the_float_model(nearest_qckpt, images_dir, monkeypatch):
    """QDrop drops the quantization of a unit's input too: about p of its elements are the float model's."""
    seen = []
    real = taskq.UnitTrainer.loss

    def spy(self, xs_q, xs_fp, *a, **k):
        if torch.is_grad_enabled() and self.unit is not None and not self.unit.name.startswith("layer 0 "):
            seen.append(float(sum((q == f).sum() for q, f in zip(xs_q, xs_fp)) / sum(q.numel() for q in xs_q)))
        return real(self, xs_q, xs_fp, *a, **k)

    monkeypatch.setattr(taskq.UnitTrainer, "loss", spy)
    share = {}
    for p in (0.0, 0.5):
        seen.clear()
        _finetune(nearest_qckpt, images_dir, method="block-mse", iters=2, drop_prob=p)
        share[p] = sum(seen) / len(seen)
    # without dropping, quantized and float inputs agree only where both are exact (zeros, saturated values)
    assert share[0.0] < 0.5 and share[0.5] == pytest.approx(share[0.0] + 0.5 * (1 - share[0.0]), abs=0.05), share


def test_resume_after_an_interrupt_gives_the_uninterrupted_result(nearest_qckpt, images_dir, tmp_path, monkeypatch):
    kw = {"iters": 4, "drop_prob": 0.5}  # QDrop masks too must replay exactly
    full, _ = _finetune(nearest_qckpt, images_dir, tmp_path / "full.qpt", **kw)
    calls = {"n": 0}
    real = taskq._train_unit

    def interrupt_at_fourth(*a, **k):
        calls["n"] += 1
        if calls["n"] == 4:
            raise KeyboardInterrupt
        return real(*a, **k)

    monkeypatch.setattr(taskq, "_train_unit", interrupt_at_fourth)
    with pytest.raises(KeyboardInterrupt):
        _finetune(nearest_qckpt, images_dir, tmp_path / "resumed.qpt", **kw)
    partial = api.partial_path(tmp_path / "resumed.qpt")
    assert partial.exists() and not (tmp_path / "resumed.qpt").exists()
    monkeypatch.setattr(taskq, "_train_unit", real)
    calls["n"] = 0
    resumed, rep = _finetune(nearest_qckpt, images_dir, tmp_path / "resumed.qpt", **kw)
    assert not partial.exists()
    a, b = full.model.state_dict(), resumed.model.state_dict()
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert len(rep["units"]) == 22


def test_resume_refuses_a_state_from_other_settings(nearest_qckpt, images_dir, tmp_path, monkeypatch):
    def boom(*a, **k):
        raise KeyboardInterrupt

    monkeypatch.setattr(taskq, "_train_unit", boom)
    with pytest.raises(KeyboardInterrupt):
        _finetune(nearest_qckpt, images_dir, tmp_path / "m.qpt", iters=4)
    monkeypatch.undo()
    from yoloq.errors import YoloqError

    with pytest.raises(YoloqError, match="other settings"):
        _finetune(nearest_qckpt, images_dir, tmp_path / "m.qpt", iters=5)


def test_sparse_placement_takes_the_largest_detection_error_cuts_within_the_budget(nearest_qckpt, images_dir):
    from yoloq.data.datasets import iter_batches, resolve_data
    from yoloq.methods.taskq import SPARSE_PREFILTER, TaskQConfig, float_reference, place_sparse

    qm = api.load_quantized(nearest_qckpt)
    images = [x for _, _, x in iter_batches(resolve_data(images_dir).take(2), SZ)]
    cfg = TaskQConfig(sparse_min_gain=-1.0, sparse_budget=0.3, sparse_max=10)
    rows = place_sparse(qm.model, float_reference(qm.model), images, cfg)
    measured = [r for r in rows if r["head_gain"] is not None]
    assert measured and all((r["gain"] >= SPARSE_PREFILTER) == (r["head_gain"] is not None) for r in rows)
    assert len({round(r["head_gain"], 6) for r in measured}) > 1  # the head really sees each split differently
    chosen = [r for r in rows if r["chosen"]]
    total = sum(r["elements"] for r in rows)
    assert chosen and sum(r["elements"] for r in chosen) <= 0.3 * total
    # greedy by head gain: every measured tensor left out either scores lower than all chosen ones, or did not fit
    room = 0.3 * total - sum(r["elements"] for r in chosen)
    for r in measured:
        if not r["chosen"]:
            assert r["head_gain"] <= min(c["head_gain"] for c in chosen) or r["elements"] > room


def test_sparse_placement_judges_a_split_by_the_detections_it_moves(lively_model):
    """The placement's error reads decoded boxes and scores where the float model is confident, not raw maps: a
    change at anchors with no float confidence costs nothing, the same change at a confident anchor does."""
    from yoloq.methods.taskq import _detection_error, _head_outputs

    fp = api.load_float(lively_model).eval()
    with torch.no_grad():
        ref = _head_outputs(fp, [torch.rand(1, 3, SZ, SZ, generator=torch.Generator().manual_seed(0))])
    assert sorted(ref[0]) == [(t, s) for t in ("box", "cls") for s in range(3)]
    ref[0][("cls", 0)][..., 0, 0] = 4.0  # one confident anchor (sigmoid 0.98); the rest keep their prior, near 0
    for k in (1, 2):
        ref[0][("cls", k)].fill_(-30.0)  # P4, P5: nothing there
    assert _detection_error(fp, ref, ref) == 0.0

    def moved(scale, y, x):
        q = [{k: v.clone() for k, v in ref[0].items()}]
        q[0][("box", scale)][..., y, x] += torch.linspace(-6, 6, q[0][("box", scale)].shape[1])[None]  # DFL logits
        return _detection_error(fp, q, ref)

    assert moved(1, 0, 0) < 1e-9  # no float confidence at P4: raw maps changed, detections not
    assert moved(0, 0, 0) > 100 * max(moved(0, 1, 1), 1e-9) > 0  # the confident anchor outweighs a background one


def test_sparse_branch_round_trips_and_exports_with_parity(nearest_qckpt, images_dir, tmp_path):
    qm, rep = _finetune(nearest_qckpt, images_dir, iters=2, sparse=True, sparse_min_gain=-1.0, sparse_budget=1.0,
                        sparse_max=2)
    chosen = [r["tensor"] for r in rep["sparse"] if r["chosen"]]
    assert len(chosen) == 2 and qm.recipe.sparse_tensors == chosen
    assert all(r["outlier_fraction"] <= 0.011 for r in rep["sparse"])
    path = api.save(qm, tmp_path / "s.qpt")
    again = api.load_quantized(path)
    x = torch.rand(1, 3, SZ, SZ)
    with torch.no_grad():
        ref = qm.model(x)[0]
        assert torch.equal(again.model(x)[0], ref)
    api.export(again, tmp_path / "s.onnx", imgsz=SZ)
    so = ort.SessionOptions()
    so.log_severity_level = 3
    got = ort.InferenceSession(str(tmp_path / "s.onnx"), so, providers=["CPUExecutionProvider"]).run(
        None, {"images": x.numpy()})[0]
    # boxes in pixels and scores: ORT and PyTorch agree closely (one-step flips stay local on a 64px model)
    assert np.abs(got - ref.numpy()).max() < 1.0
    assert np.median(np.abs(got - ref.numpy())) < 1e-3


def test_layer_wise_adaround_runs_one_conv_at_a_time(nearest_qckpt, images_dir):
    qm, rep = _finetune(nearest_qckpt, images_dir, method="adaround", iters=6)
    assert len(rep["units"]) == 16 + 1  # the head is one unit, trained conv by conv
    # never worse (a unit that ends worse keeps its start); the 4-bit convs after the 8-bit first one improve in 6
    # steps (in 2, layer 1 gained only through accumulator ranges bounded a second time, which no longer happens)
    assert all(u["loss_after"] <= u["loss_before"] for u in rep["units"])
    assert all(u["loss_after"] < u["loss_before"] for u in rep["units"][1:5])


def test_checkpoint_with_rounded_weights_is_refused(qckpts, images_dir):
    from yoloq.errors import YoloqError

    gptq = api.calibrate("yolov8n.yaml", str(images_dir), Recipe(4, 4, "mse", images=2, imgsz=SZ))
    with pytest.raises(YoloqError, match="already rounded"):
        taskq.run(gptq, [torch.rand(1, 3, SZ, SZ)], TaskQConfig(**TINY, iters=1, sparse=False))


def _round_a_linear_layer(round_weight: float, steps: int = 400) -> tuple[float, float, float]:
    """AdaRound on y = x w^T with TASKQ's loss scale (summed over channels, mean over samples) and schedule:
    the loss of the soft weights at the end, of the hard rounding written out, and of round-to-nearest."""
    from yoloq.core.adaround import AdaRound, BetaSchedule
    from yoloq.core.functional import fake_quantize

    cfg = TaskQConfig()
    g = torch.Generator().manual_seed(0)
    w = torch.randn(16, 64, generator=g) * 0.1
    x = torch.randn(512, 64, generator=g)
    s = w.abs().amax(1) / 7
    r = AdaRound(w, s, -8, 7)
    opt = torch.optim.Adam([r.v], lr=cfg.lr_round)
    beta = BetaSchedule(steps, cfg.warmup)

    def loss_of(wq, rows=slice(None)):
        return ((x[rows] @ (wq - w).t()) ** 2).sum(1).mean()

    for t in range(steps):
        loss = loss_of(r(s), torch.randint(0, 512, (64,), generator=g))
        if beta(t) is not None:
            loss = loss + round_weight * r.regularizer(beta(t))
        opt.zero_grad()
        loss.backward()
        opt.step()
    with torch.no_grad():
        nearest = fake_quantize(w, s[:, None], torch.zeros(()), -8, 7)
        return float(loss_of(r(s))), float(loss_of(r.hard_codes() * s[:, None])), float(loss_of(nearest))


def test_default_rounding_regulariser_ends_with_the_hard_rounding_near_the_soft_one():
    # at AdaRound's 0.01 many h are still between 0 and 1 when the rounding is made hard, and the hard loss lands far
    # above the soft one it was trained to; the default weight pulls them to the ends first
    soft, hard, nearest = _round_a_linear_layer(TaskQConfig().round_weight)
    weak_soft, weak_hard, _ = _round_a_linear_layer(0.01)
    assert hard < 1.25 * soft and weak_hard > 1.4 * weak_soft
    assert hard < weak_hard and hard < 0.98 * nearest


def test_crop_context_defaults_on_at_8_bit_activations_sensitivity_and_averaging_below_dither_at_both():
    a8, a4 = TaskQConfig().for_bits(8), TaskQConfig().for_bits(4)
    assert (a8.context, a8.sensitivity, a8.dither, a8.average) == (True, 0.0, 1.0, 0.0)
    assert (a4.context, a4.sensitivity, a4.dither, a4.average) == (False, 1.0, 1.0, 0.99)
    set_ = TaskQConfig(context=False, sensitivity=0.5, average=0.9)
    assert (set_.for_bits(8).context, set_.for_bits(4).sensitivity, set_.for_bits(8).average) == (False, 0.5, 0.9)
    # the baselines stay as their papers have them
    for m in ("block-mse", "qdrop", "adaround"):
        p8, p4 = TaskQConfig.preset(m).for_bits(8), TaskQConfig.preset(m).for_bits(4)
        assert (p8.context, p4.sensitivity, p8.dither, p4.dither, p4.average) == (False, 0, 0, 0, 0)


def test_brecq_is_block_mse_with_the_fisher_weights_at_every_bit_width(nearest_qckpt, images_dir, monkeypatch):
    from dataclasses import replace

    for bits in (8, 4):
        b, m = TaskQConfig.preset("brecq").for_bits(bits), TaskQConfig.preset("block-mse").for_bits(bits)
        assert (b.sensitivity, b.stahq, b.context) == (1.0, False, False)
        assert replace(b, method="block-mse", sensitivity=0.0) == m
    weighed = []
    real = taskq.output_sensitivity
    monkeypatch.setattr(taskq, "output_sensitivity", lambda *a, **k: weighed.append(1) or real(*a, **k))
    losses = {}
    for method in ("brecq", "block-mse"):
        weighed.clear()
        qm, rep = _finetune(nearest_qckpt, images_dir, method=method, iters=4)
        assert bool(weighed) is (method == "brecq")
        assert qm.provenance["history"][-1]["sensitivity"] == (1.0 if method == "brecq" else 0.0)
        losses[method] = [u["loss_before"] for u in rep["units"]]
    # the same units judged by another loss: the weighted one is not the plain one
    assert len(losses["brecq"]) == len(losses["block-mse"]) and losses["brecq"] != losses["block-mse"]


def test_finetune_decides_context_and_sensitivity_from_the_activation_bits(nearest_qckpt, lively_model, images_dir,
                                                                          tmp_path, monkeypatch):
    a8 = api.save(api.calibrate(lively_model, str(images_dir), Recipe(4, 8, "minmax", bias_correction=False,
                                                                       weight_rounding="nearest", images=1, imgsz=SZ)),
                  tmp_path / "w4a8.qpt")
    seen = []
    monkeypatch.setattr(taskq, "reconstruct", lambda qmodel, fp, images, cfg, *a: seen.append(cfg.context) or [])
    for ckpt, a8_ in ((a8, True), (nearest_qckpt, False)):
        qm, _ = api.finetune(str(ckpt), str(images_dir), TaskQConfig(**TINY, sparse=False), images=1)
        assert qm.provenance["history"][-1]["context"] is a8_
        assert qm.provenance["history"][-1]["sensitivity"] == (0.0 if a8_ else 1.0)
    assert seen == [True, False]


def test_crops_score_only_the_cells_whose_context_is_real():
    from ultralytics.nn.modules import SPPF, C2f

    torch.manual_seed(0)
    imgsz, stride = 256, 8
    for mod in (C2f(8, 8, n=2).eval(), SPPF(8, 8).eval()):
        x = torch.randn(1, 8, imgsz // stride, imgsz // stride)
        margin = taskq.receptive_margin([mod], [[x]], imgsz)
        # C2f: two bottlenecks of two 3x3 convs; SPPF: three 5x5 max pools in a row
        assert margin == (4 if isinstance(mod, C2f) else 6) * stride
        with torch.no_grad():
            whole = mod(x)
            for m, same in ((margin, True), (0, False)):
                boxes = taskq._crop_boxes(torch.Generator().manual_seed(1), 12, imgsz, 64, stride, m)
                out = mod(taskq._cut([x], boxes, imgsz))
                mask = taskq._scored_cells(out, boxes).bool()
                ref = torch.cat([whole[..., y0 // stride:(y0 + side) // stride, x0 // stride:(x0 + side) // stride]
                                 for _, y0, x0, side, _ in boxes])
                err = (out - ref).abs().amax(1)[mask]
                # with its margin every scored cell is what the whole map computes; a bare crop's edges are not
                assert (float(err.max()) < 1e-5) == same, (type(mod).__name__, m, float(err.max()))


def test_crop_margins_stay_inside_the_image_and_score_the_crop_side():
    gen = torch.Generator().manual_seed(0)
    for img, y0, x0, side, (sy0, sx0, sy1, sx1) in taskq._crop_boxes(gen, 200, 640, 160, 32, 40):
        assert side == 160 + 2 * 64 and 0 <= y0 and y0 + side <= 640 and 0 <= x0 and x0 + side <= 640
        for a0, s0, s1 in ((y0, sy0, sy1), (x0, sx0, sx1)):
            assert s0 == (0 if a0 == 0 else a0 + 64) and s1 == (640 if a0 + side == 640 else a0 + side - 64)
            assert s1 - s0 >= 160
    # a margin past the image: whole maps, all scored; no margin: the bare crop, all scored
    assert {b[3:] for b in taskq._crop_boxes(gen, 5, 640, 160, 32, 400)} == {(640, (0, 0, 640, 640))}
    for _, y0, x0, side, scored in taskq._crop_boxes(gen, 20, 640, 160, 32, 0):
        assert side == 160 and scored == (y0, x0, y0 + 160, x0 + 160)


def test_reconstruction_with_crop_context_and_plain_weights_lowers_the_loss(nearest_qckpt, images_dir):
    _, rep = _finetune(nearest_qckpt, images_dir, iters=20, context=True, sensitivity=0.0)
    assert sum(u["loss_after"] for u in rep["units"]) < 0.9 * sum(u["loss_before"] for u in rep["units"])


def _detections_and_outputs(model, x):
    from yoloq.model import yolo

    src, hi = yolo.layer_sources(model), len(model.model) - 1
    outs = {-1: x.clone().requires_grad_(True)}
    for i in range(hi):
        outs[i] = yolo.run_layer(model, i, [outs[j] for j in src[i]])
    br = yolo.head_branches(model)
    head = {(t, s): br[t][s](outs[j]) for s, j in enumerate(src[hi]) for t in ("box", "cls")}
    return taskq._detections(model, head), outs, head


def test_sensitivity_weights_estimate_the_gauss_newton_diagonal_of_the_detections():
    from ultralytics.nn.tasks import yaml_model_load

    from yoloq.model import yolo

    torch.manual_seed(0)
    model = yolo.model_from_yaml({**yaml_model_load("yolov8n.yaml"), "nc": 1}, {0: "a"}).eval()  # a small Jacobian
    for p in model.parameters():
        p.requires_grad_(False)
    units = yolo.reconstruction_units(model)
    x = torch.rand(1, 3, 32, 32)
    est = taskq.output_sensitivity(model, units, [x], probes=32, mix=1.0, seed=0)
    g, outs, head = _detections_and_outputs(model, x)
    for unit, z in ((units[-7], outs[21]), (units[-2], head[("box", 2)])):
        exact = torch.zeros_like(z)
        for k in range(g.numel()):  # diag(JᵀJ), one row of J at a time
            exact += torch.autograd.grad(g[k], z, retain_graph=True)[0] ** 2
        w = est[unit.name][0][0].float()
        assert w.shape == z.shape
        rel = float((w - exact / exact.mean()).abs().sum() / (exact / exact.mean()).sum())
        assert rel < 0.15, (unit.name, rel)
    # the class scores' own weights are exact with any probe: sigmoid'(logit)^2, normalised
    c = head[("cls", 0)].detach()
    exact = torch.sigmoid(c) * torch.sigmoid(-c)
    assert torch.allclose(est[units[-5].name][0][0].float(), exact ** 2 / (exact ** 2).mean(), rtol=0.02)
    with pytest.raises(YoloqError, match="sensitivity"):
        TaskQConfig.preset("adaround", sensitivity=1.0)
    # mixed with plain weights: (1 - mix) + mix * w
    half = taskq.output_sensitivity(model, units, [x], probes=32, mix=0.5, seed=0)
    assert torch.allclose(half[units[4].name][0][0].float(), 0.5 + 0.5 * est[units[4].name][0][0].float(), rtol=0.02)


def test_units_are_judged_on_the_images_that_carry_their_sensitivity_weight():
    # two outputs: a large one whose weight sum favours image 0, a small one whose mean weight favours image 2
    big = [torch.full((1, 8, 16, 16), v) for v in (1.2, 1.0, 0.8)]
    small = [torch.full((1, 2, 2, 2), v) for v in (0.1, 0.5, 2.4)]
    assert taskq.heaviest_images([big, small], 2) == [2, 1]
    assert taskq.heaviest_images([big], 2) == [0, 1]
    assert taskq.heaviest_images([big, small], 9) == [2, 1, 0]


def test_weighted_crops_hold_the_weight_mass_and_keep_the_expected_loss():
    gen = torch.Generator().manual_seed(0)
    imgsz, crop, align = 128, 32, 16
    # two outputs at strides 8 and 16, weight concentrated on one corner of image 1
    ws = [[torch.rand(1, 3, 16, 16, generator=gen) * 0.01 for _ in range(3)],
          [torch.rand(1, 2, 8, 8, generator=gen) * 0.01 for _ in range(3)]]
    ws[0][1][..., :4, :4] += 5.0
    sampler = taskq.WeightedCrops(ws, imgsz, crop, align, 0, share=0.5)
    full, cells, _ = taskq._crop_grid(imgsz, crop, align, 0)
    assert sampler.mass.numel() == 3 * cells * cells
    for k in range(sampler.mass.numel()):  # the mass is each output's mean weight inside the crop, summed
        img, rest = divmod(k, cells * cells)
        box = [(img, rest // cells * align, rest % cells * align, full, (0, 0, 0, 0))]
        want = sum(float(taskq._cut(w, box, imgsz).sum(1).mean()) for w in ws)
        assert sampler.mass[k].item() == pytest.approx(want, rel=1e-4)
    boxes, ratio = sampler.draw(torch.Generator().manual_seed(1), 2000)
    heavy = sum(1 for img, y0, x0, *_ in boxes if img == 1 and y0 == 0 and x0 == 0)
    assert heavy / 2000 > 0.1  # uniform crops would draw this one of 75 candidates 1.3% of the time
    # importance weights: the expected loss of any per-crop loss is that of uniform crops
    loss = torch.rand(sampler.q.numel(), generator=gen)
    assert float((sampler.q * sampler.ratio * loss).sum()) == pytest.approx(float(loss.mean()), rel=1e-5)
    assert ratio.min() < 0.1 < 1.5 < ratio.max()  # the heavy crop counts less, the light ones more
    # with context, only the scored part of a crop counts: the margin is computed but not in the loss
    margin = 16
    ctx = taskq.WeightedCrops(ws, imgsz, crop, align, margin, share=0.5)
    full, cells, inner = taskq._crop_grid(imgsz, crop, align, margin)
    for k in range(ctx.mass.numel()):
        img, rest = divmod(k, cells * cells)
        box = [taskq._box(img, rest // cells * align, rest % cells * align, full, inner)]
        want = 0.0
        for w in ws:
            cut = taskq._cut(w, box, imgsz).sum(1)
            scored = taskq._scored_cells(cut, box)
            want += float((cut * scored).sum() / scored.sum())
        assert ctx.mass[k].item() == pytest.approx(want, rel=1e-4)
    # share 0: uniform
    flat = taskq.WeightedCrops(ws, imgsz, crop, align, 0, share=0.0)
    assert torch.allclose(flat.ratio, torch.ones_like(flat.ratio))
    with pytest.raises(YoloqError, match="weighted_crops"):
        TaskQConfig(weighted_crops=1.5)


def test_weighted_crops_draw_from_more_candidates_than_torch_multinomial_takes(monkeypatch):
    # the first layer's 1-pixel grid at 640 px holds 231k crops per image: over 73 images torch.multinomial refuses
    with pytest.raises(RuntimeError, match="categories"):
        torch.multinomial(torch.ones(taskq.MULTINOMIAL_MAX + 1), 1)
    gen = torch.Generator().manual_seed(0)
    ws = [[torch.rand(1, 2, 16, 16, generator=gen) * 0.01 for _ in range(3)]]
    ws[0][2][..., :4, :4] += 5.0
    sampler = taskq.WeightedCrops(ws, 128, 32, 16, 0, share=0.5)
    monkeypatch.setattr(taskq, "MULTINOMIAL_MAX", sampler.q.numel() - 1)  # as if there were too many
    boxes, ratio = sampler.draw(torch.Generator().manual_seed(1), 20000)
    cells = sampler.cells
    idx = torch.tensor([img * cells * cells + y0 // 16 * cells + x0 // 16 for img, y0, x0, *_ in boxes])
    counts = torch.bincount(idx, minlength=sampler.q.numel()).float()
    assert (counts / 20000 - sampler.q).abs().max() < 0.01  # the same distribution, drawn in two steps
    heavy = 2 * cells * cells  # image 2, top-left crop
    assert counts[heavy] / 20000 == pytest.approx(float(sampler.q[heavy]), abs=0.01) and sampler.q[heavy] > 0.1
    assert torch.equal(ratio, sampler.ratio[idx])


def test_low_bit_reconstruction_draws_its_crops_by_weight_by_default(nearest_qckpt, images_dir, monkeypatch):
    assert (TaskQConfig().weighted_crops, TaskQConfig.preset("brecq").weighted_crops) == (0.5, 0.0)
    drawn = []
    real = taskq.WeightedCrops.draw
    monkeypatch.setattr(taskq.WeightedCrops, "draw", lambda self, gen, n: drawn.append(n) or real(self, gen, n))
    _, rep = _finetune(nearest_qckpt, images_dir, iters=3)  # W4A4: sensitivity weights on
    assert drawn == [TINY["batch"]] * 3 * len(rep["units"])
    drawn.clear()
    _finetune(nearest_qckpt, images_dir, iters=3, weighted_crops=0.0)
    assert drawn == []


def test_dither_is_on_while_a_unit_trains_and_off_when_it_is_judged_and_saved(nearest_qckpt, images_dir, monkeypatch):
    seen = {"train": set(), "judge": set()}
    real = taskq.UnitTrainer.loss

    def spy(self, *a, **k):
        seen["train" if torch.is_grad_enabled() else "judge"].update(q.dither for q in self.act_quantizers)
        return real(self, *a, **k)

    monkeypatch.setattr(taskq.UnitTrainer, "loss", spy)
    qm, _ = _finetune(nearest_qckpt, images_dir, iters=3, dither=1.0)
    assert seen["train"] == {1.0} and seen["judge"] == {0.0}
    assert all(q.dither == 0 for _, q in iter_quantizers(qm.model))
    monkeypatch.setattr(taskq.UnitTrainer, "loss", real)
    # it changes what is learned (same seed, same crops)
    plain, _ = _finetune(nearest_qckpt, images_dir, iters=3, dither=0.0)
    a, b = qm.model.state_dict(), plain.model.state_dict()
    assert any(not torch.equal(a[k], b[k]) for k in a)
    with pytest.raises(YoloqError, match="dither"):
        TaskQConfig(dither=1.5)


def test_parameter_average_is_an_exponential_moving_average_put_in_place():
    p, q = nn.Parameter(torch.zeros(3)), nn.Parameter(torch.ones(2))
    avg = taskq.ParamAverage([p, q], decay=0.9)
    avg.put_in()  # nothing folded in yet: the parameters stay
    assert torch.equal(p, torch.zeros(3))
    for v in (1.0, 2.0, 4.0):
        p.data.fill_(v)
        q.data.fill_(-v)
        avg.update()
    want = (1.0 * 0.9 + 2.0 * 0.1) * 0.9 + 4.0 * 0.1
    avg.put_in()
    assert torch.allclose(p, torch.full((3,), want)) and torch.allclose(q, torch.full((2,), -want))


def test_averaging_puts_the_mean_of_the_annealed_steps_in_before_the_rounding_is_baked(nearest_qckpt, images_dir,
                                                                                   monkeypatch):
    # what each unit bakes: the averaged values, not the last step's (same seed and crops otherwise)
    baked = {}
    real = taskq.UnitTrainer.finish

    def spy(self):
        baked.setdefault(self.cfg.average, []).append([float(p.detach().sum()) for m in self.convs
                                                      for p in (m.rounding.v, m.weight_quantizer.scale)])
        return real(self)

    monkeypatch.setattr(taskq.UnitTrainer, "finish", spy)
    avg, _ = _finetune(nearest_qckpt, images_dir, iters=6, warmup=0.5, average=0.5)
    last, _ = _finetune(nearest_qckpt, images_dir, iters=6, warmup=0.5, average=0.0)
    assert len(baked[0.5]) == len(baked[0.0]) and baked[0.5] != baked[0.0]
    a, b = avg.model.state_dict(), last.model.state_dict()
    assert any(not torch.equal(a[k], b[k]) for k in a)
    with pytest.raises(YoloqError, match="average"):
        TaskQConfig(average=1.0)
