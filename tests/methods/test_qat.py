"""Quantization-aware training (HQOD / LSQ / TQT) on a tiny model: it lowers the loss, resumes exactly, runs under
torchrun with two processes, and refuses labels it cannot use."""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from ultralytics.utils.tal import make_anchors

from yoloq import api
from yoloq.core.modules import iter_quantizers
from yoloq.data.datasets import resolve_data, write_yolo
from yoloq.errors import YoloqError
from yoloq.io import image_digests
from yoloq.losses.hqod import HQODLossConfig, hqod_loss
from yoloq.methods import qat
from yoloq.methods.qat import QATConfig
from yoloq.model import yolo
from yoloq.recipe import Recipe

SZ = 64
TINY = {"batch": 2, "imgsz": SZ}


@pytest.fixture(scope="module")
def labelled(tmp_path_factory, images_dir) -> Path:
    """The four test images with hand-made YOLO labels (class indices of the model: no classes.txt)."""
    d = tmp_path_factory.mktemp("labelled") / "images"
    shutil.copytree(images_dir, d)
    rows = {"bus": ["0 0.27 0.62 0.2 0.5", "5 0.5 0.45 0.95 0.5"], "zidane": ["0 0.35 0.6 0.45 0.8", "0 0.78 0.55 0.4 0.9"],
            "synthetic0": ["2 0.28 0.29 0.45 0.45"], "synthetic1": ["2 0.28 0.29 0.45 0.45"]}
    (d.parent / "labels").mkdir()
    for stem, r in rows.items():
        (d.parent / "labels" / f"{stem}.txt").write_text("\n".join(r) + "\n")
    return d


@pytest.fixture(scope="module")
def w4a4(tmp_path_factory, images_dir, lively_model):
    qm = api.calibrate(lively_model, str(images_dir), Recipe(4, 4, "mse", images=4, imgsz=SZ))
    return api.save(qm, tmp_path_factory.mktemp("qat") / "w4a4.qpt")


def _train_dir(tmp_path, labelled) -> Path:
    ds = resolve_data(labelled)
    return write_yolo(ds.images, ds.labels, tmp_path / "train")


def test_hqod_terms_join_ultralytics_loss_on_the_assigned_positives(w4a4, labelled, tmp_path):
    qm = api.load_quantized(w4a4)
    model = qm.model.train()
    qat.setup(model, QATConfig(**TINY))  # weights and steps trainable, as in training
    train = _train_dir(tmp_path, labelled)
    batch = next(iter(yolo.training_loader(yolo.training_dataset(train, qm.names, SZ, 4, augment=False), 4, shuffle=False)))
    x = batch["img"].float() / 255
    preds = yolo.training_outputs(model, x)
    plain, items_plain = yolo.detection_loss(model)(preds, batch)
    crit = yolo.detection_loss(model, HQODLossConfig())
    total, items = crit(preds, batch)
    assert set(items_plain) == {"box", "cls", "dfl"} and {"tcorr", "hiou"} <= set(items)

    # the added term is hqod_loss on the assigner's positives: p at the assigned class, u = IoU with the target box
    labels, tboxes, _, fg, _ = crit.assigner.last
    assert fg.sum() > 0
    p = preds["scores"].permute(0, 2, 1)[fg].sigmoid().gather(1, labels[fg].long()[:, None]).squeeze(1)
    anchors, strides = make_anchors(preds["feats"], crit.stride, 0.5)
    boxes = crit.bbox_decode(anchors, preds["boxes"].permute(0, 2, 1).contiguous()) * strides
    u = yolo.box_iou_pairs(boxes[fg], tboxes[fg]).clamp(0, 1)
    want, _ = hqod_loss(p, u, HQODLossConfig(), gain=7.5 * 4)
    torch.testing.assert_close(total - plain, want, rtol=1e-4, atol=1e-4)
    assert items["tcorr"] + items["hiou"] == pytest.approx(float(want) / 4, rel=1e-4)

    # and it trains both branches: gradients reach the class and the box outputs
    model.zero_grad()
    (total - plain).backward()
    head = model.model[-1]
    assert head.cv3[0][-1].conv.weight.grad.abs().sum() > 0 and head.cv2[0][-1].conv.weight.grad.abs().sum() > 0


def test_short_qat_lowers_the_loss_and_exports(w4a4, labelled, tmp_path):
    cfg = QATConfig(method="hqod", iters=12, lr=1e-3, distill=0.0, **TINY)  # the detection loss alone
    out = tmp_path / "hqod.qpt"
    qm, rep = api.qat(str(w4a4), str(labelled), cfg, out)
    assert rep["steps"] == 12 and rep["epochs"] == 6  # 4 images, batch 2
    assert rep["loss_after"]["total"] < 0.8 * rep["loss_before"]["total"]
    assert out.exists() and not api.partial_path(out).exists() and not Path(f"{out}.data").exists()
    back = api.load_quantized(out)
    assert back.recipe.weight_bits == 4 and back.provenance["history"][-1]["method"] == "hqod"
    rep = api.export(back, tmp_path / "hqod.onnx")
    assert rep["bytes"] > 0


def test_the_checkpoint_has_seen_the_images_it_was_calibrated_and_trained_on(images_dir, lively_model, labelled,
                                                                             tmp_path):
    start = api.calibrate(lively_model, str(images_dir), Recipe(4, 4, "mse", images=2, imgsz=SZ))
    first_two = image_digests(sorted(images_dir.iterdir())[:2])
    assert start.provenance["seen_images"] == first_two
    qm, _ = api.qat(str(api.save(start, tmp_path / "start.qpt")), str(labelled),
                    QATConfig(method="hqod", iters=1, distill=0.0, **TINY), tmp_path / "hqod.qpt")
    # the training images are copies of all four (a copy is the same image): the two it was calibrated on and two new
    assert qm.provenance["seen_images"] == image_digests(sorted(labelled.iterdir())) != first_two
    assert len(api.load_quantized(tmp_path / "hqod.qpt").provenance["seen_images"]) == 4


def test_dither_is_on_the_learned_activation_quantizers_while_training_only(w4a4, labelled, tmp_path):
    qm = api.load_quantized(w4a4)
    qat.setup(qm.model, QATConfig(dither=1.0, **TINY))
    qs = [q for _, q in iter_quantizers(qm.model)]
    dithered = [q for q in qs if q.dither > 0]
    assert dithered and all(q.dither == 1.0 and q.learning and not q.weight for q in dithered)
    assert len(dithered) == sum(q.learning and not q.weight for q in qs)
    qat.convert(qm.model)
    assert all(q.dither == 0.0 for q in qs)  # evaluated, saved and exported plainly

    # same seed and data: only the dither differs, and it changes what is learned
    models = [api.qat(str(w4a4), str(labelled), QATConfig(method="lsq", iters=2, lr=1e-3, distill=0.0, dither=d, **TINY),
                      tmp_path / f"d{d}.qpt")[0].model for d in (0.0, 0.0, 1.0)]
    got = [m.state_dict() for m in models]
    assert all(torch.equal(got[0][k], got[1][k]) for k in got[0])
    assert not all(torch.equal(got[0][k], got[2][k]) for k in got[0])
    # the trained model handed back (dither is not saved, so only the one in memory could still carry it)
    assert all(q.dither == 0.0 for _, q in iter_quantizers(models[2]))
    with pytest.raises(YoloqError, match="dither must be in"):
        QATConfig(dither=1.5)


def test_tqt_learns_power_of_two_steps(w4a4, labelled, tmp_path):
    cfg = QATConfig(method="lsq", quantizer="tqt", iters=4, lr=1e-3, lr_log2=0.2, **TINY)
    qm, _ = api.qat(str(w4a4), str(labelled), cfg, tmp_path / "tqt.qpt")
    start = api.load_quantized(w4a4)
    moved = 0
    for (name, q), (_, q0) in zip(_quantizers(qm.model), _quantizers(start.model)):
        if q.fixed or "acc_quantizer" in name:  # accumulators are re-capped after training (docs/methods.md)
            continue
        e = torch.log2(q.scale)
        torch.testing.assert_close(e, e.round())
        moved += int(not torch.equal(q.scale, 2 ** torch.log2(q0.scale).ceil()))
    assert moved > 0  # the steps were learned, not only snapped to a power of two


def _quantizers(model):
    from yoloq.core.modules import iter_quantizers

    return list(iter_quantizers(model))


def test_training_state_is_written_at_most_once_per_interval_and_after_the_last_epoch(w4a4, labelled, tmp_path,
                                                                                     monkeypatch):
    epochs = []
    save = qat.QATState.save

    def record(self, model, opt, epoch, *a):
        epochs.append(epoch)
        save(self, model, opt, epoch, *a)

    monkeypatch.setattr(qat.QATState, "save", record)
    cfg = QATConfig(method="lsq", iters=6, lr=1e-3, distill=0.0, **TINY)  # 4 images, batch 2: 3 epochs
    monkeypatch.setattr(qat, "SAVE_EVERY_S", 3600.0)
    api.qat(str(w4a4), str(labelled), cfg, tmp_path / "a.qpt")
    assert epochs == [3]
    epochs.clear()
    monkeypatch.setattr(qat, "SAVE_EVERY_S", 0.0)
    api.qat(str(w4a4), str(labelled), cfg, tmp_path / "b.qpt")
    assert epochs == [1, 2, 3]


def test_resume_after_an_interrupt_gives_the_uninterrupted_result(w4a4, labelled, tmp_path, monkeypatch):
    # cosine: the resumed run must set the rates the uninterrupted one had at the same steps
    cfg = QATConfig(method="hqod", iters=6, lr=1e-3, lr_schedule="cosine", **TINY)
    whole, _ = api.qat(str(w4a4), str(labelled), cfg, tmp_path / "whole.qpt")

    out = tmp_path / "resumed.qpt"
    monkeypatch.setattr(qat, "SAVE_EVERY_S", 0.0)  # a write after every epoch, so that one can be interrupted
    save = qat.QATState.save

    def save_then_stop(self, model, opt, epoch, *a):
        save(self, model, opt, epoch, *a)
        if epoch == 2:
            raise KeyboardInterrupt

    monkeypatch.setattr(qat.QATState, "save", save_then_stop)
    with pytest.raises(KeyboardInterrupt):
        api.qat(str(w4a4), str(labelled), cfg, out)
    assert api.partial_path(out).exists() and not out.exists()
    monkeypatch.setattr(qat.QATState, "save", save)
    resumed, rep = api.qat(str(w4a4), str(labelled), cfg, out)
    assert rep["history"][0]["epoch"] == 1 and rep["steps"] == 6
    for (k, a), (_, b) in zip(whole.model.state_dict().items(), resumed.model.state_dict().items()):
        torch.testing.assert_close(a, b, rtol=0, atol=0, msg=k)

    other = QATConfig(method="lsq", iters=6, lr=1e-3, **TINY)
    monkeypatch.setattr(qat.QATState, "save", save_then_stop)
    with pytest.raises(KeyboardInterrupt):
        api.qat(str(w4a4), str(labelled), other, out)
    monkeypatch.setattr(qat.QATState, "save", save)
    with pytest.raises(Exception, match="other settings"):
        api.qat(str(w4a4), str(labelled), cfg, out)


def test_cosine_schedule_decays_from_the_base_rate_to_one_percent():
    f = [qat.lr_factor("cosine", t, 50) for t in range(50)]
    assert f[0] == pytest.approx(1.0) and f[-1] == pytest.approx(0.01) and f[25] == pytest.approx(0.5, abs=0.03)
    assert all(a > b for a, b in zip(f, f[1:]))
    assert {qat.lr_factor("constant", t, 50) for t in range(50)} == {1.0}


def test_default_steps_and_size_follow_the_start(w4a4, labelled, images_dir, lively_model, tmp_path):
    calibrated = api.load_quantized(w4a4)
    assert not qat.reconstructed(calibrated.provenance["history"])
    cfg = QATConfig().for_start(calibrated.recipe, False)
    assert (cfg.iters, cfg.imgsz, cfg.distill) == (300, 320, 10.0)
    given = QATConfig(iters=9, imgsz=96, distill=3.0)
    assert given.for_start(calibrated.recipe, True) == given
    assert QATConfig(distill=0.0).for_start(calibrated.recipe, True).distill == 0.0  # 0 (off) is a choice, not unset
    # a TASKQ checkpoint trains at its own size (SZ here), 30 steps; a QAT result of it too (its history has TASKQ)
    from yoloq.methods.taskq import TaskQConfig

    tq, _ = api.finetune(lively_model, str(images_dir), TaskQConfig(iters=1, batch=2, crop=32, eval_images=2, sparse=False),
                         weight_bits=4, act_bits=4, images=2, imgsz=SZ)
    tq_path = api.save(tq, tmp_path / "taskq.qpt")
    qm, rep = api.qat(str(tq_path), str(labelled), QATConfig(batch=2, epochs=1, distill=0.0), tmp_path / "hqod.qpt")
    last = qm.provenance["history"][-1]
    assert (last["method"], last["iters"], last["imgsz"]) == ("hqod", 30, SZ) and rep["steps"] == 2  # epochs win
    assert qat.reconstructed(qm.provenance["history"])
    again = QATConfig().for_start(qm.recipe, True)
    assert (again.iters, again.imgsz, again.distill) == (30, SZ, 100.0)
    # a start trained by QAT alone is not reconstructed: the 320 default stays
    hq, _ = api.qat(str(w4a4), str(labelled), QATConfig(batch=2, epochs=1, imgsz=SZ, distill=0.0), tmp_path / "h2.qpt")
    assert not qat.reconstructed(hq.provenance["history"])


def test_a_float_model_starts_from_taskq_which_an_interrupted_run_keeps(lively_model, labelled, qckpts, tmp_path,
                                                                       monkeypatch):
    out = tmp_path / "hqod.qpt"
    start = Path(f"{out}.start.qpt")
    cfg = QATConfig(batch=2, epochs=1, distill=0.0, start_iters=1)
    real_run = qat.run
    start_recipe = api._qat_start_recipe

    def small_start(monkeypatch):  # the flow, not the size, is tested: the 640 default costs minutes here
        monkeypatch.setattr(api, "_qat_start_recipe", lambda *a: dataclasses.replace(start_recipe(*a), imgsz=SZ))

    small_start(monkeypatch)

    def interrupted(*a, **k):
        raise KeyboardInterrupt

    monkeypatch.setattr(qat, "run", interrupted)
    with pytest.raises(KeyboardInterrupt):
        api.qat(lively_model, str(labelled), cfg, out)
    assert start.exists() and not out.exists()  # the reconstruction is kept for the next run
    monkeypatch.setattr(qat, "run", real_run)
    monkeypatch.setattr(api, "finetune", lambda *a, **k: pytest.fail("the finished start was reconstructed again"))
    qm, rep = api.qat(lively_model, str(labelled), cfg, out)
    assert rep["start_seconds"] is None  # the start was made by the interrupted run, not timed by this one
    methods = [h["method"] for h in qm.provenance["history"] if h.get("step") == "finetune"]
    assert methods == ["taskq", "hqod"]
    # the start is TASKQ's own W4A4 default: dithered and averaged
    assert (qm.provenance["history"][-2]["dither"], qm.provenance["history"][-2]["average"]) == (1.0, 0.99)
    last = qm.provenance["history"][-1]
    assert (last["start"], last["iters"], last["imgsz"]) == ("taskq", 30, qm.recipe.imgsz)  # as from a TASKQ file
    assert out.exists() and not start.exists()
    # calibration alone on request; a checkpoint is its own start
    monkeypatch.undo()
    small_start(monkeypatch)
    ptq, rep = api.qat(lively_model, str(labelled), QATConfig(batch=2, epochs=1, imgsz=SZ, distill=0.0, start="ptq"),
                       tmp_path / "ptq.qpt")
    assert rep["start_seconds"] > 0
    assert [h["method"] for h in ptq.provenance["history"] if h.get("step") == "finetune"] == ["hqod"]
    assert ptq.provenance["history"][-1]["iters"] == 300
    with pytest.raises(YoloqError, match="--start applies to a float model"):
        api.qat(str(out), str(labelled), QATConfig(start="ptq"), tmp_path / "x.qpt")
    # a start file left by a run on another model is not taken for this one's
    shutil.copy(qckpts["yolov8n.yaml"], tmp_path / "other.qpt.start.qpt")
    with pytest.raises(YoloqError, match="left from a run with another model"):
        api.qat(lively_model, str(labelled), cfg, tmp_path / "other.qpt")


def test_labels_the_model_cannot_use_exit_2_and_suggest_pseudo_labels(qckpts, labelled, images_dir, tmp_path):
    from typer.testing import CliRunner

    from tests.test_cli import assert_clean_error
    from yoloq.cli import app

    named = tmp_path / "named"
    shutil.copytree(labelled.parent, named)
    (named / "classes.txt").write_text("cat\ndog\nbird\n")  # not the model's class names
    for data in (named / "images", images_dir):  # wrong names; no labels at all
        out = tmp_path / "x.qpt"
        r = CliRunner().invoke(app, ["finetune", str(qckpts["yolov8n.yaml"]), "--data", str(data), "--method", "hqod",
                                     "--iters", "1", "--imgsz", str(SZ), "--out", str(out)])
        assert_clean_error(r, "--pseudo-labels")
        assert not out.exists() and not Path(f"{out}.data").exists()
    # from a float model too, before its TASKQ start is reconstructed (minutes on a real model)
    r = CliRunner().invoke(app, ["finetune", "yolov8n.yaml", "--data", str(images_dir), "--method", "hqod",
                                 "--out", str(tmp_path / "f.qpt")])
    assert_clean_error(r, "--pseudo-labels")
    assert not list(tmp_path.glob("f.qpt*"))
    r = CliRunner().invoke(app, ["finetune", str(qckpts["yolov8n.yaml"]), "--data", str(labelled), "--method", "hqod",
                                 "--start", "taskq", "--out", str(tmp_path / "s.qpt")])
    assert_clean_error(r, "--start applies to a float model")
    for flags in (["--method", "taskq", "--pseudo-labels"], ["--method", "hqod", "--no-sparse"],
                  ["--method", "lsq", "--no-hiou"], ["--method", "hqod", "--quantizer", "pot"],
                  ["--method", "hqod", "--epochs", "1", "--iters", "2"], ["--method", "hqod", "--lr-schedule", "step"],
                  ["--method", "taskq", "--lr-schedule", "constant"], ["--method", "taskq", "--start", "ptq"],
                  ["--method", "hqod", "--start", "both"]):
        r = CliRunner().invoke(app, ["finetune", str(qckpts["yolov8n.yaml"]), "--data", str(labelled), *flags,
                                     "--out", str(tmp_path / "y.qpt")])
        assert_clean_error(r)


def test_pseudo_labels_are_the_float_models_detections(monkeypatch, images_dir, tmp_path):
    """Pseudo-labels are the detections with conf >= 0.25, written in YOLO format that Ultralytics reads back."""
    from yoloq.runtime import evaluate

    ds = resolve_data(images_dir).take(2)
    fake = [np.array([[10, 20, 60, 90, 0.9, 3], [0, 0, 5, 5, 0.3, 1]], np.float32), np.zeros((0, 6), np.float32)]
    seen = {}

    def detect(pred, ds_, conf, iou, max_det, desc, multi_label=True):
        seen.update(conf=conf, iou=iou, multi_label=multi_label)
        return fake, np.zeros(2)

    monkeypatch.setattr(evaluate, "detect", detect)
    labels = api.pseudo_labels(api.load_float("yolov8n.yaml"), ds, SZ)
    assert seen == {"conf": 0.25, "iou": 0.7, "multi_label": False}  # one label per object, as the predictor
    np.testing.assert_array_equal(labels[0], [[3, 10, 20, 60, 90], [1, 0, 0, 5, 5]])
    train = write_yolo(ds.images, labels, tmp_path / "pl")
    got = yolo.training_dataset(train, {i: str(i) for i in range(80)}, SZ, 2, augment=False).labels
    assert [len(g["cls"]) for g in got] == [2, 0]
    assert got[0]["cls"].ravel().tolist() == [3, 1]


@pytest.mark.skipif(sys.platform != "linux", reason="torchrun smoke test on Linux")
def test_ddp_two_processes_with_gloo(qckpts, labelled, tmp_path):
    out = tmp_path / "ddp.qpt"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           "-m", "yoloq.cli", "finetune", str(qckpts["yolov8n.yaml"]), "--data", str(labelled), "--method", "lsq",
           "--iters", "2", "--batch", "4", "--imgsz", str(SZ), "--out", str(out)]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=env)
    assert r.returncode == 0, r.stderr[-2000:]
    assert "2 processes" in r.stdout and r.stdout.count("wrote ") == 1
    assert out.exists() and not api.partial_path(out).exists()


@pytest.mark.parametrize("family", ["yolo11n.yaml", "yolo26n.yaml"])
def test_the_deployed_head_trains_the_whole_trunk(qckpts, labelled, tmp_path, family):
    """YOLO26 deploys its one-to-one branch only; Ultralytics trains that branch on detached features, yoloq must not."""
    qm = api.load_quantized(qckpts[family])
    model = qm.model.train()
    qat.setup(model, QATConfig(**TINY))
    train = _train_dir(tmp_path, labelled)
    batch = next(iter(yolo.training_loader(yolo.training_dataset(train, qm.names, SZ, 2, augment=False), 2, shuffle=False)))
    preds = yolo.training_outputs(model, batch["img"].float() / 255)
    assert set(preds) == {"boxes", "scores", "feats"}
    loss, items = yolo.detection_loss(model)(preds, batch)
    loss.backward()
    assert model.model[0].conv.weight.grad.abs().sum() > 0
    assert yolo.is_end2end(model) == (family == "yolo26n.yaml") and ("l1" in items) == (yolo.reg_max(model) == 1)


def test_device_check_script_finds_the_cpu_agreeing_with_itself(w4a4, images_dir, tmp_path):
    # scripts/check_qat_device.py compares a device with the CPU (docs/benchmarks.md); against the CPU itself nothing may differ
    out = tmp_path / "check.json"
    script = Path(__file__).resolve().parents[2] / "scripts" / "check_qat_device.py"
    r = subprocess.run([sys.executable, str(script), str(w4a4), "--data", str(images_dir), "--other", "cpu",
                        "--steps", "2", "--batch", "2", "--imgsz", str(SZ), "--json", str(out)],
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    rows = json.loads(out.read_text())["rows"]
    assert [row["step"] for row in rows] == [1, 2] and rows[0]["loss_cpu"] != rows[1]["loss_cpu"]  # it trained
    for row in rows:
        assert set(row["gradients"]) == {"weights", "weight steps", "activation steps"}
        for g in row["gradients"].values():
            assert g["cosine"] == pytest.approx(1.0, abs=1e-12) and g["sign_agreement"] == 1.0
        assert all(v == 0.0 for v in row["params_max_rel_diff"].values())
