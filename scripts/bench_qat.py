"""QAT benchmark on the demo YOLOv8s: LSQ, LSQ+HQOD, TQT and TQT+HQOD at the same step budget, in one process.

All rows start from the same checkpoint (calibrated here at W4A4: MSE ranges, GPTQ; or --start QPT, e.g.
TASKQ-finetuned, at its own bits) and train on pseudo-labels of the float
model (the demo model's two classes are not COCO's). Columns: fidelity (mAP50-95 against FP32's detections, 95%
bootstrap interval) and harmony (true positives against FP32's detections: the share whose |score - IoU| < 0.1, and
the mean of |score - IoU|), both in
ONNX Runtime at the evaluation size (640); fidelity at the training size (320) too, to show whether steps learned at
320 suit 640; ms per image; training wall time. Markdown to stdout, JSON to --json.

    python scripts/bench_qat.py [--data DIR] [--eval-data DIR] [--images 64] [--iters 400] [--json out/bench_qat.json]
"""

from __future__ import annotations

import argparse
import json
import re
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "scripts"))

from bench_ptq import SHARED, calib_arrays, cpu_info, time_models  # noqa: E402

from yoloq import api  # noqa: E402
from yoloq.data.datasets import Dataset, resolve_data  # noqa: E402
from yoloq.demo_model import demo_model_path  # noqa: E402
from yoloq.export.onnx import export_float_onnx  # noqa: E402
from yoloq.methods.qat import QATConfig, reconstructed  # noqa: E402
from yoloq.recipe import Recipe  # noqa: E402
from yoloq.runtime.evaluate import detect, evaluate  # noqa: E402
from yoloq.runtime.harmony import for_fidelity, harmony, reference_run  # noqa: E402
from yoloq.runtime.predictors import OrtPredictor  # noqa: E402

# labelled with the start's bits: "W4A4 LSQ" by default, "W4A8 LSQ" from a W4A8 --start
ROWS = {
    "LSQ": {"method": "lsq", "quantizer": "lsq"},
    "LSQ+HQOD": {"method": "hqod", "quantizer": "lsq"},
    "TQT": {"method": "lsq", "quantizer": "tqt"},
    "TQT+HQOD": {"method": "hqod", "quantizer": "tqt"},
}


def slug(row: str) -> str:
    """A file name for a row: rows and their files are one to one (a --start file named like a row's output would
    otherwise share its ONNX file with that row)."""
    return re.sub(r"[^A-Za-z0-9]+", "_", row).strip("_")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", default=str(SHARED), help="training (and calibration) images")
    ap.add_argument("--eval-data", default=None, help="evaluation images (default: --data)")
    ap.add_argument("--images", type=int, default=64, help="training images")
    ap.add_argument("--iters", type=int, default=None, help="optimisation steps per row (default: QATConfig's)")
    ap.add_argument("--imgsz", type=int, default=640, help="evaluation size")
    ap.add_argument("--train-imgsz", type=int, default=None,
                    help="training size (default: QATConfig's, 320, or 640 from a TASKQ --start)")
    ap.add_argument("--start", default=None, metavar="QPT",
                    help="start every row from this checkpoint (e.g. TASKQ-finetuned; its bits name the rows) "
                         "instead of calibrating a W4A4 one")
    ap.add_argument("--only", default=None,
                    help="comma-separated rows, e.g. 'LSQ+HQOD' or 'W4A4 LSQ+HQOD' (default: all)")
    ap.add_argument("--out", default=str(ROOT / "out" / "bench_qat"))
    ap.add_argument("--json", default=str(ROOT / "out" / "bench_qat.json"))
    args = ap.parse_args()

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    model = str(demo_model_path())
    train = resolve_data(args.data).take(args.images)
    ev = resolve_data(args.eval_data or args.data)
    trained = {p.resolve() for p in train.images}
    rest = [p for p in ev.images if p.resolve() not in trained]
    held = Dataset(rest, None, ev.names, ev.source) if rest and len(rest) < len(ev.images) else None
    sq = api.load_quantized(args.start) if args.start else None
    r = sq.recipe if sq else Recipe(4, 4)
    # the size every row trains at, as QATConfig picks it for this start (shown in the table)
    history = sq.provenance.get("history", []) if sq else []
    args.train_imgsz = args.train_imgsz or QATConfig().for_start(r, reconstructed(history)).imgsz
    bits = f"W{r.weight_bits}A{r.act_bits}"
    only = set(args.only.split(",")) if args.only else set()
    unknown = only - set(ROWS) - {f"{bits} {short}" for short in ROWS}
    if unknown:  # before any work; a row named with other bits than the start's would otherwise be skipped silently
        ap.error(f"--only: no row {', '.join(sorted(unknown))} from a {bits} start; rows: {', '.join(ROWS)}")
    results = {s: (out / f"{slug(f'{bits} {s}')}.qpt").resolve() for s in ROWS}
    clash = [s for s, p in results.items() if args.start and p == Path(args.start).resolve()]
    if clash:
        ap.error(f"--start {args.start} is where row {clash[0]} writes its result; give another --out")
    if args.start:
        start, first, first_row = Path(args.start), f"{bits} start ({Path(args.start).name})", {}
    else:
        start, first, t = out / "w4a4.qpt", "W4A4 PTQ (start)", time.perf_counter()
        api.save(api.calibrate(model, train, Recipe(4, 4, images=args.images, imgsz=args.imgsz)), start)
        first_row = {"train_s": time.perf_counter() - t}
    rows = {"FP32": {}, first: first_row}
    qckpts = {first: start}
    for short, kw in ROWS.items():
        name = f"{bits} {short}"
        if only and not only & {short, name}:
            continue
        cfg = QATConfig(pseudo_labels=True, imgsz=args.train_imgsz, **kw, **({"iters": args.iters} if args.iters else {}))
        qckpts[name] = results[short]
        t = time.perf_counter()
        _, rep = api.qat(str(start), train, cfg, qckpts[name])
        rows[name] = {"train_s": time.perf_counter() - t, "steps": rep["steps"], "loss_before": rep["loss_before"],
                      "loss_after": rep["loss_after"]}

    for size in dict.fromkeys((args.imgsz, args.train_imgsz)):  # once when training at the evaluation size
        fp32 = export_float_onnx(model, out / f"fp32_{size}.onnx", size)
        ref = reference_run(OrtPredictor(fp32, threads=2), ev, 0.001)
        fid_ref = for_fidelity(ref)
        gts = [d[:, [5, 0, 1, 2, 3]] for d in fid_ref["dets"]]
        paths = {"FP32": fp32}
        for name, q in qckpts.items():
            paths[name] = Path(api.export(str(q), out / f"{slug(name)}_{size}.onnx", imgsz=size)["path"])
        for name, p in paths.items():
            pred = OrtPredictor(p, threads=2)
            key = "" if size == args.imgsz else f"_{size}"
            if name == "FP32":
                rows[name].update({f"fidelity{key}": 1.0, f"fidelity_ci{key}": [1.0, 1.0]})
            else:
                r = evaluate(pred, ev, fid_ref)
                rows[name].update({f"fidelity{key}": r["fidelity"], f"fidelity_ci{key}": r["fidelity_ci"]})
                dets, _ = detect(pred, ev, 0.001, 0.7, 300, name)
            if size == args.imgsz and name != "FP32":  # FP32 against its own boxes: IoU 1, nothing to measure
                h = harmony(dets, gts)
                rows[name].update(harmony=h["share"], harmony_gap=h["mean_gap"], harmony_tp=h["tp"],
                                  harmony_score=h["mean_score"], harmony_iou=h["mean_iou"])
        if size == args.imgsz and held is not None:  # fidelity on the images no row trained on
            ref_h = for_fidelity(reference_run(OrtPredictor(fp32, threads=2), held, 0.001))
            for name, p in paths.items():
                if name != "FP32":
                    r = evaluate(OrtPredictor(p, threads=2), held, ref_h)
                    rows[name].update(fidelity_heldout=r["fidelity"], fidelity_heldout_ci=r["fidelity_ci"])
        if size == args.imgsz:
            ms = time_models(paths, calib_arrays(ev.take(16), size), rounds=3)
            for name in paths:
                rows[name].update(ms=ms[name], speedup=ms["FP32"] / ms[name])

    info = cpu_info()
    print(f"\nDemo YOLOv8s; training: {len(train.images)} images of {train.source} at {args.train_imgsz}px with "
          f"pseudo-labels; evaluation: {len(ev.images)} images of {ev.source} at {args.imgsz}px in ONNX Runtime CPU, "
          f"2 threads; {info['cpu']}\n")
    nh = f" ({len(held.images)} images)" if held else ""
    print(f"| model | fidelity@{args.imgsz} | 95% CI | held-out fidelity{nh} | fidelity@{args.train_imgsz} | harmony share | "
          "mean gap | ms/img | speed-up | train s |\n|---|---|---|---|---|---|---|---|---|---|")
    for name, r in rows.items():
        lo, hi = r["fidelity_ci"]
        tr = f"{r['train_s']:.0f}" if "train_s" in r else ""
        hs = f"{r['harmony']:.3f}" if r.get("harmony") is not None else "n/a"
        gap = f"{r['harmony_gap']:.3f}" if r.get("harmony_gap") is not None else "n/a"
        ho = f"{r['fidelity_heldout']:.3f}" if "fidelity_heldout" in r else "n/a"
        at_train = r.get(f"fidelity_{args.train_imgsz}", r["fidelity"])  # the same when training at --imgsz
        print(f"| {name} | {r['fidelity']:.3f} | {lo:.3f}-{hi:.3f} | {ho} | {at_train:.3f} | "
              f"{hs} | {gap} | {r['ms']:.1f} | {r['speedup']:.2f}x | {tr} |")
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_text(json.dumps({"machine": info, "imgsz": args.imgsz, "train_imgsz": args.train_imgsz,
                                           "training": train.source, "training_images": len(train.images),
                                           "evaluation": ev.source, "evaluation_images": len(ev.images),
                                           "rows": rows}, indent=2, default=str))


if __name__ == "__main__":
    main()
