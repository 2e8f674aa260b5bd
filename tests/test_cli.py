"""The CLI through Typer's CliRunner: the happy path, and every bad input -> one line, exit 2, no partial file."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from yoloq.cli import app

from .conftest import IMGSZ

runner = CliRunner()


def run(*args):
    return runner.invoke(app, [str(a) for a in args])


def assert_clean_error(result, *words):
    assert result.exit_code == 2, result.output
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert len(lines) == 1, result.output
    assert lines[0].startswith("error: ")
    assert "Traceback" not in result.output
    for w in words:
        assert w.lower() in lines[0].lower(), lines[0]


def test_calibrate_export_eval(images_dir, tmp_path):
    q = tmp_path / "m.qpt"
    r = run("calibrate", "yolov8n.yaml", "--data", images_dir, "--wbits", 4, "--abits", 8, "--images", 2,
            "--imgsz", IMGSZ, "--method", "percentile", "--out", q)
    assert r.exit_code == 0, r.output
    payload = torch.load(q, weights_only=True)
    assert payload["recipe"]["weight_bits"] == 4 and payload["recipe"]["observer"] == "percentile"
    assert payload["provenance"]["calibration_images"] == 2
    o = tmp_path / "m.onnx"
    r = run("export", q, "--onnx", "--out", o)
    assert r.exit_code == 0 and o.stat().st_size > 0, r.output
    j = tmp_path / "r.json"
    r = run("eval", o, "--data", images_dir, "--reference", "yolov8n.yaml", "--json", j)
    assert r.exit_code == 0, r.output
    rep = json.loads(j.read_text())
    assert rep["runtime"] == "onnxruntime" and rep["images"] == 4 and rep["threads"] == 2
    assert rep["ms_median"] > 0 and rep["ms_p90"] >= rep["ms_median"]
    assert "ms median" in r.output


def test_recipe_yaml_and_flag_override(images_dir, tmp_path):
    recipe = Path(__file__).resolve().parents[1] / "configs" / "w4a4.yaml"
    q = tmp_path / "m.qpt"
    r = run("calibrate", "yolov8n.yaml", "--data", images_dir, "--recipe", recipe, "--abits", 8, "--images", 1,
            "--imgsz", IMGSZ, "--out", q)
    assert r.exit_code == 0, r.output
    rec = torch.load(q, weights_only=True)["recipe"]
    assert (rec["weight_bits"], rec["act_bits"], rec["images"], rec["imgsz"]) == (4, 8, 1, IMGSZ)


@pytest.fixture
def small_args(images_dir):
    return ["--data", images_dir, "--images", 1, "--imgsz", IMGSZ]


def test_missing_model(small_args, tmp_path):
    out = tmp_path / "x.qpt"
    assert_clean_error(run("calibrate", tmp_path / "nope.pt", *small_args, "--out", out), "not found")
    assert not out.exists()


def test_not_a_yolo_checkpoint(small_args, tmp_path):
    bad = tmp_path / "bad.pt"
    bad.write_bytes(os.urandom(256))
    assert_clean_error(run("calibrate", bad, *small_args, "--out", tmp_path / "x.qpt"), "not a yolo")
    other = tmp_path / "other.pt"
    torch.save({"weights": torch.zeros(3)}, other)
    assert_clean_error(run("calibrate", other, *small_args, "--out", tmp_path / "x.qpt"), "not a yolo")
    assert not list(tmp_path.glob("x.qpt*")) and not list(tmp_path.glob(".x.qpt*"))


def test_empty_or_missing_dataset(tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    assert_clean_error(run("calibrate", "yolov8n.yaml", "--data", empty, "--imgsz", IMGSZ), "no images")
    assert_clean_error(run("calibrate", "yolov8n.yaml", "--data", tmp_path / "nowhere", "--imgsz", IMGSZ), "not found")


def test_unreadable_image(tmp_path):
    d = tmp_path / "imgs"
    d.mkdir()
    (d / "broken.jpg").write_bytes(b"not a jpeg")
    out = tmp_path / "x.qpt"
    assert_clean_error(run("calibrate", "yolov8n.yaml", "--data", d, "--imgsz", IMGSZ, "--out", out), "unreadable image")
    assert not out.exists()


@pytest.mark.parametrize("flags", [["--bits", 9], ["--bits", 1], ["--wbits", 4, "--abits", 12], ["--bits", 4, "--wbits", 4]])
def test_bad_bits(small_args, flags):
    assert_clean_error(run("calibrate", "yolov8n.yaml", *small_args, *flags), "bits")


def test_bad_imgsz(images_dir):
    assert_clean_error(run("calibrate", "yolov8n.yaml", "--data", images_dir, "--imgsz", 100), "multiple of 32")


def test_bad_method(small_args):
    assert_clean_error(run("calibrate", "yolov8n.yaml", *small_args, "--method", "magic"), "magic")


def test_unwritable_output(small_args, tmp_path):
    assert_clean_error(run("calibrate", "yolov8n.yaml", *small_args, "--out", tmp_path / "no" / "dir" / "x.qpt"), "does not exist")
    # /proc refuses new files even to root, whose access() checks always pass
    assert_clean_error(run("calibrate", "yolov8n.yaml", *small_args, "--out", "/proc/yoloq-test.qpt"), "not writable")
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o500)
    try:
        if not os.access(ro, os.W_OK):  # as a normal user the mode bits decide
            assert_clean_error(run("calibrate", "yolov8n.yaml", *small_args, "--out", ro / "x.qpt"), "not writable")
    finally:
        ro.chmod(0o700)
    assert not list(tmp_path.rglob("*.qpt")) and not list(tmp_path.rglob(".*.tmp"))


def test_export_errors(qckpts, tmp_path):
    q = qckpts["yolov8n.yaml"]
    assert_clean_error(run("export", q, "--out", tmp_path / "a.onnx"), "--onnx")
    assert_clean_error(run("export", tmp_path / "missing.qpt", "--onnx"), "not found")
    assert_clean_error(run("export", q, "--onnx", "--format", "tflite", "--out", tmp_path / "a.onnx"), "format")
    assert_clean_error(run("export", q, "--onnx", "--pack", "int4", "--out", tmp_path / "a.onnx"), "4 bits")
    not_ours = tmp_path / "plain.pt"
    torch.save({"a": 1}, not_ours)
    assert_clean_error(run("export", not_ours, "--onnx", "--out", tmp_path / "a.onnx"), "yoloq calibrate")
    assert not (tmp_path / "a.onnx").exists()


def test_eval_errors(images_dir, tmp_path):
    assert_clean_error(run("eval", tmp_path / "none.onnx", "--data", images_dir), "not found")
    junk = tmp_path / "junk.onnx"
    junk.write_bytes(b"junk")
    assert_clean_error(run("eval", junk, "--data", images_dir), "cannot load")
    assert_clean_error(run("eval", "yolov8n.yaml", "--data", images_dir, "--imgsz", IMGSZ, "--conf", 2), "conf")
    out = tmp_path / "nodir" / "r.json"
    assert_clean_error(run("eval", "yolov8n.yaml", "--data", images_dir, "--imgsz", IMGSZ, "--json", out), "does not exist")


def test_official_name_offline_says_download(small_args, tmp_path, monkeypatch):
    import ultralytics

    def offline(*a, **k):
        raise ConnectionError("Download failure for yolov8n.pt. Environment may be offline.")

    monkeypatch.setattr(ultralytics, "YOLO", offline)
    monkeypatch.chdir(tmp_path)
    assert_clean_error(run("calibrate", "yolov8n.pt", *small_args, "--out", tmp_path / "x.qpt"), "could not download")


def test_console_script_exit_codes(tmp_path):
    """The installed entry point (not CliRunner): domain and usage errors exit 2 with one line, help exits 0."""
    import subprocess
    import sys

    def cli(*args):
        code = "import sys; from yoloq.cli import main; sys.argv = ['yoloq', *sys.argv[1:]]; main()"
        return subprocess.run([sys.executable, "-c", code, *map(str, args)], capture_output=True, text=True)

    for args in (["calibrate", "yolov8n.yaml", "--data", tmp_path / "none"], ["calibrate", "m.pt", "--data", ".", "--bits", "abc"],
                 ["frobnicate"]):
        r = cli(*args)
        assert r.returncode == 2, (args, r.stderr)
        assert len(r.stderr.strip().splitlines()) == 1 and r.stderr.startswith("error: "), r.stderr
    assert cli("--help").returncode == 0


def test_finetune_end_to_end_and_its_bad_inputs(lively_model, images_dir, tmp_path):
    out, js = tmp_path / "ft.qpt", tmp_path / "ft.json"
    r = run("finetune", lively_model, "--data", images_dir, "--bits", 4, "--images", 2, "--imgsz", IMGSZ,
            "--iters", 2, "--out", out, "--json", js)
    assert r.exit_code == 0, r.output
    rep = json.loads(js.read_text())
    assert len(rep["units"]) == 22 and "sparse" in rep
    payload = torch.load(out, weights_only=True)
    assert payload["recipe"]["weight_rounding"] == "learned"
    assert payload["provenance"]["history"][-1]["step"] == "finetune"
    assert not Path(str(out) + ".partial").exists()
    # a switch the method does not have
    assert_clean_error(run("finetune", lively_model, "--data", images_dir, "--method", "adaround", "--no-dtr",
                           "--out", tmp_path / "x.qpt"), "--no-dtr", "taskq")
    assert_clean_error(run("finetune", lively_model, "--data", images_dir, "--method", "gptq"), "unknown fine-tuning method")
    # bits that contradict the checkpoint; a checkpoint whose weights are already rounded
    assert_clean_error(run("finetune", out, "--data", images_dir, "--bits", 8, "--out", tmp_path / "y.qpt"), "bit")
    assert_clean_error(run("finetune", out, "--data", images_dir, "--iters", 1, "--images", 2,
                           "--out", tmp_path / "z.qpt"), "already rounded")
    assert not (tmp_path / "z.qpt").exists()
    assert_clean_error(run("finetune", lively_model, "--data", images_dir, "--iters", 0), "iters")
