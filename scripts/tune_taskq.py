"""One TASKQ (or baseline) fine-tuning of the demo YOLOv8s with config overrides, scored on images it did not see.

Fine-tunes on the first --images images of --data, exports QDQ ONNX, and reports ONNX Runtime fidelity against FP32
on the remaining images (held out) and on all of them; appends one JSON line to --log. For comparing settings:

    python scripts/tune_taskq.py --bits 4/4 --set iters=300 --set sparse=false --set dtr=false

16 held-out images leave each score about +-0.05 wide; `--fold K` for K = 0..4 (5 folds of the 80 coco-mini images)
holds out every image once, and differences between settings can then be paired fold by fold.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import sys
import time
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402
from bench_ptq import cpu_info  # noqa: E402

from yoloq import api  # noqa: E402
from yoloq.data.datasets import Dataset, resolve_data  # noqa: E402
from yoloq.demo_model import demo_model_path  # noqa: E402
from yoloq.export.onnx import export_float_onnx  # noqa: E402
from yoloq.methods.taskq import TaskQConfig  # noqa: E402
from yoloq.runtime.evaluate import evaluate, reference_detections  # noqa: E402
from yoloq.runtime.predictors import OrtPredictor  # noqa: E402

SHARED = ROOT.parent / "shared" / "data" / "coco-mini" / "train2017"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", default=str(SHARED))
    ap.add_argument("--images", type=int, default=32, help="fine-tuning images (the first N); the rest are held out")
    ap.add_argument("--held-out-from", type=int, default=None, metavar="K",
                    help="score held out on images K.. (default: --images); to compare runs with different --images")
    ap.add_argument("--fold", type=int, default=None, metavar="K",
                    help="cross-validation: hold out the K-th of --folds equal parts of --data (0-based) and fine-tune "
                         "on the first --images of the rest, so that over all K every image is held out once")
    ap.add_argument("--folds", type=int, default=5)
    ap.add_argument("--bits", default="4/4", help="W/A, e.g. 4/8")
    ap.add_argument("--method", default="taskq")
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="TaskQConfig override (YAML value)")
    ap.add_argument("--imgsz", type=int, default=640)
    ap.add_argument("--out", default=str(ROOT / "out" / "tune"))
    ap.add_argument("--log", default=str(ROOT / "out" / "tune.jsonl"))
    ap.add_argument("--save", default=None, metavar="QPT",
                    help="also save the fine-tuned checkpoint (e.g. to start QAT)")
    args = ap.parse_args()

    w, a = (int(b) for b in args.bits.split("/"))
    over = {}
    defaults = TaskQConfig().to_dict()
    for kv in args.set:
        k, _, v = kv.partition("=")
        if k not in defaults:
            ap.error(f"--set {k}: TaskQConfig has no such field")
        # YAML reads 1e-3 as a string: cast to the field's type (fields left to the bit width default to None)
        over[k] = yaml.safe_load(v) if defaults[k] is None else type(defaults[k])(yaml.safe_load(v))
    cfg = TaskQConfig.preset(args.method, **over)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    model = str(demo_model_path())
    ds = resolve_data(args.data)
    if args.fold is not None:
        if not 0 <= args.fold < args.folds <= len(ds.images):
            ap.error(f"--fold must be in [0, --folds) and --folds at most the {len(ds.images)} images")
        if args.held_out_from is not None:
            ap.error("--fold decides the held-out images; drop --held-out-from")
        n = len(ds.images)
        lo, hi = n * args.fold // args.folds, n * (args.fold + 1) // args.folds
        # the held-out part moved to the end: the usual first-N / rest split then does the rest
        ds = Dataset(ds.images[:lo] + ds.images[hi:] + ds.images[lo:hi], None, ds.names, ds.source)
        args.held_out_from = n - (hi - lo)
    start = args.images if args.held_out_from is None else args.held_out_from
    if start < args.images or len(ds.images) <= start:
        ap.error(f"--data has {len(ds.images)} images: held-out images must start at or after --images "
                 f"({args.images}) and leave some ({start})")
    held = Dataset(ds.images[start:], None, ds.names, ds.source)
    fp32 = export_float_onnx(model, out / "fp32.onnx", args.imgsz)
    t = time.perf_counter()
    qm, rep = api.finetune(model, ds, cfg, None, w, a, args.images, args.imgsz)
    row = {"bits": args.bits, "method": args.method, "set": over, "images": args.images, "held_out_from": start,
           "fold": None if args.fold is None else f"{args.fold}/{args.folds}",
           "seconds": round(time.perf_counter() - t, 1), "sparse": [r["tensor"] for r in rep["sparse"] if r["chosen"]],
           # a fold's score moves by a few hundredths with the CPU and the thread count alone (docs/methods.md)
           "cpu": cpu_info()["cpu"], "threads": torch.get_num_threads()}
    # named by the settings (str hash() changes per process, so a digest)
    tag = hashlib.sha256(json.dumps(over, sort_keys=True).encode()).hexdigest()[:8]
    path = out / f"W{w}A{a}-{args.method}-{tag}.onnx"
    api.export(qm, path)
    if args.save:
        api.save(qm, args.save)
    for tag, d in (("held_out", held), ("all", ds)):
        ref = reference_detections(OrtPredictor(fp32, threads=2), d)
        row[f"fidelity_{tag}"] = round(evaluate(OrtPredictor(path, threads=2), d, ref)["fidelity"], 4)
    print(json.dumps(row))
    Path(args.log).parent.mkdir(parents=True, exist_ok=True)
    with open(args.log, "a") as f:
        f.write(json.dumps({**row, "units": rep["units"]}) + "\n")


if __name__ == "__main__":
    main()
