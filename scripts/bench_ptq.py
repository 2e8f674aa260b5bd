"""PTQ benchmark on the demo YOLOv8s: yoloq against the quantizers users would otherwise pick, in one process.

Rows: FP32 ONNX; Ultralytics' own int8 ONNX path (ORT quantize_static, only Conv/Gemm/MatMul quantized, per-tensor,
its defaults); ORT quantize_static per-channel with percentile calibration (Conv only); NNCF nncf.quantize as
Ultralytics' OpenVINO int8 path configures it (optional: `pip install nncf`); yoloq W8A8 (minmax, percentile, mse),
W4A8 and W4A4. Columns: fidelity (mAP50-95 against FP32's detections) with a 95% bootstrap interval, ms per image
and speed-up over FP32 in ONNX Runtime CPU (2 threads, timings interleaved across models), ONNX file size.
Markdown to stdout; JSON (with the CPU model and its int8 instruction sets) to --json.

    python scripts/bench_ptq.py [--data DIR] [--eval-data DIR] [--calib-images 64] [--json out/bench_ptq.json]
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from yoloq import api  # noqa: E402
from yoloq.data.datasets import Dataset, iter_batches, resolve_data  # noqa: E402
from yoloq.demo_model import demo_model_path  # noqa: E402
from yoloq.export.onnx import export_float_onnx  # noqa: E402
from yoloq.methods.taskq import TaskQConfig  # noqa: E402
from yoloq.recipe import Recipe  # noqa: E402
from yoloq.runtime.evaluate import evaluate, reference_detections  # noqa: E402
from yoloq.runtime.predictors import OrtPredictor  # noqa: E402

SHARED = ROOT.parent / "shared" / "data" / "coco-mini" / "train2017"
INT8_FLAGS = ("avx512_vnni", "avx_vnni", "amx_int8", "avx512bw", "avx2")


def cpu_info() -> dict:
    model, flags = platform.processor(), set()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
            if line.startswith("flags"):
                flags = set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return {"cpu": model, "int8_isa": [f for f in INT8_FLAGS if f in flags]}


def calib_arrays(ds, imgsz):
    return [x.numpy() for _, _, x in iter_batches(ds, imgsz)]


class Reader:
    """onnxruntime CalibrationDataReader over preprocessed images."""

    def __init__(self, arrays):
        self.arrays, self.i = arrays, 0

    def get_next(self):
        if self.i >= len(self.arrays):
            return None
        self.i += 1
        return {"images": self.arrays[self.i - 1]}

    def rewind(self):
        self.i = 0


def ort_static(fp32: Path, out: Path, arrays, per_channel: bool, method: str, conv_only: bool) -> Path:
    import onnx
    from onnxruntime.quantization import CalibrationMethod, quantize_static

    graph = onnx.load(str(fp32)).graph
    exclude = [n.name for n in graph.node if n.op_type not in {"Conv", "Gemm", "MatMul"}] if conv_only else []
    extra = {"CalibPercentile": 99.99} if method == "percentile" else {}
    quantize_static(str(fp32), str(out), Reader(arrays), nodes_to_exclude=exclude, per_channel=per_channel,
                    calibrate_method=CalibrationMethod.Percentile if method == "percentile" else CalibrationMethod.MinMax,
                    extra_options=extra)
    return out


def nncf_quantize(fp32: Path, out: Path, arrays) -> Path | str:
    try:
        import nncf
        import onnx
    except ImportError:
        return "nncf not installed (pip install nncf)"
    model = onnx.load(str(fp32))
    head = max(int(n.name.split("/")[1].split(".")[1]) for n in model.graph.node if n.name.startswith("/model."))
    ignored = [n.name for n in model.graph.node
               if n.op_type == "Sigmoid" or n.name.startswith((f"/model.{head}/", f"/model.{head}.dfl"))]
    q = nncf.quantize(model, nncf.Dataset(arrays, lambda a: {"images": a}), preset=nncf.QuantizationPreset.MIXED,
                      ignored_scope=nncf.IgnoredScope(names=ignored, validate=False))
    onnx.save(q, str(out))
    return out


def time_models(paths: dict[str, Path], arrays, rounds: int = 5, per_round: int = 8) -> dict[str, float]:
    preds = {k: OrtPredictor(p, threads=2) for k, p in paths.items()}
    times: dict[str, list[float]] = {k: [] for k in paths}
    for p in preds.values():
        p.session.run(None, {p.input_name: arrays[0]})
    for r in range(rounds):
        for k, p in preds.items():
            for a in arrays[r * per_round % len(arrays):][:per_round]:
                t = time.perf_counter()
                p.session.run(None, {p.input_name: a})
                times[k].append((time.perf_counter() - t) * 1e3)
    return {k: float(np.median(v)) for k, v in times.items()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", default=str(SHARED), help="calibration images")
    ap.add_argument("--eval-data", default=None, help="evaluation images (default: --data)")
    ap.add_argument("--calib-images", type=int, default=64)
    ap.add_argument("--imgsz", type=int, default=640)
    ap.add_argument("--out", default=str(ROOT / "out" / "bench"))
    ap.add_argument("--json", default=str(ROOT / "out" / "bench_ptq.json"))
    ap.add_argument("--only", default=None, help="row names to run, separated by ';' (some names hold commas; default: all)")
    ap.add_argument("--iters", type=int, default=None, help="fine-tuning steps per unit (default: the method's)")
    args = ap.parse_args()

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    model = str(demo_model_path())
    calib = resolve_data(args.data).take(args.calib_images)
    ev = resolve_data(args.eval_data or args.data)
    arrays = calib_arrays(calib, args.imgsz)
    fp32 = export_float_onnx(model, out / "fp32.onnx", args.imgsz)

    rows: dict[str, dict] = {}
    builders = {
        "ultralytics int8 (ORT static, Conv-only, per-tensor)": lambda p: ort_static(fp32, p, arrays, False, "minmax", True),
        # ORT 1.31's histogram calibrator keeps every intermediate tensor of every image in memory (64 images of
        # YOLOv8s at 640 exceed 24 GB), so this baseline calibrates on the first 16
        "ORT static per-channel percentile, Conv-only (16 imgs)": lambda p: ort_static(fp32, p, arrays[:16], True, "percentile", True),
        "NNCF (Ultralytics OpenVINO int8 config)": lambda p: nncf_quantize(fp32, p, arrays),
    }
    variants = [(8, 8, "minmax", "gptq"), (8, 8, "percentile", "gptq"), (8, 8, "mse", "gptq"),
                (4, 8, "minmax", "gptq"), (4, 8, "percentile", "gptq"), (4, 8, "mse", "nearest"), (4, 8, "mse", "gptq"),
                (4, 4, "minmax", "gptq"), (4, 4, "percentile", "gptq"), (4, 4, "mse", "nearest"), (4, 4, "mse", "gptq")]
    # reduce_range False: full-range 8-bit weight codes, exact only on CPUs with VNNI (see docs/placement.md)
    variants = [(*v, True) for v in variants] + [(8, 8, "mse", "gptq", False)]
    for w, a, obs, rounding, reduce_range in variants:
        recipe = Recipe(w, a, obs, images=args.calib_images, imgsz=args.imgsz, weight_rounding=rounding,
                        weight_reduce_range=reduce_range)
        # GPTQ applies below 8 bits only, so 8-bit rows need no rounding label
        name = f"yoloq {recipe.name} {obs}" + (f" {rounding}" if w < 8 else "") + \
            ("" if reduce_range else " full-range weights")

        def build(p, recipe=recipe, name=name):
            t = time.perf_counter()
            qm = api.calibrate(model, calib, recipe)
            rows[name]["calib_s"] = time.perf_counter() - t
            api.export(qm, p)
            return p

        builders[name] = build
    # fine-tuning rows (TASKQ and the baselines through the same code; the ablations switch one part off)
    finetunes = [("taskq", {}), ("taskq", {"sparse": False}), ("taskq", {"dtr": False}), ("taskq", {"stahq": False}),
                 ("block-mse", {}), ("brecq", {}), ("qdrop", {})]
    for w, a in ((4, 8), (4, 4)):
        for method, off in finetunes:
            name = f"yoloq W{w}A{a} finetune {method}" + "".join(f" -{k}" for k in off)
            cfg = TaskQConfig.preset(method, **off, **({"iters": args.iters} if args.iters else {}))

            def build(p, w=w, a=a, cfg=cfg, name=name):
                t = time.perf_counter()
                # the default number of fine-tuning images, within --calib-images
                qm, rep = api.finetune(model, calib, cfg, None, w, a, None, args.imgsz)
                rows[name]["calib_s"] = time.perf_counter() - t
                rows[name]["sparse"] = [r["tensor"] for r in rep["sparse"] if r["chosen"]]
                api.export(qm, p)
                return p

            builders[name] = build
    only = {n.strip() for n in args.only.split(";")} if args.only else None
    unknown = only - set(builders) if only else set()
    if unknown:
        ap.error(f"unknown rows: {'; '.join(sorted(unknown))}")
    paths = {"FP32": fp32}
    for i, (name, fn) in enumerate(builders.items()):
        if only and name not in only:
            continue
        rows[name] = {}
        res = fn(out / f"m{i}.onnx")
        if isinstance(res, str):
            rows[name]["skipped"] = res
            continue
        paths[name] = Path(res)

    ref = reference_detections(OrtPredictor(fp32, threads=2), ev)
    # the evaluation images no row calibrated or fine-tuned on (when they come from the calibration folder)
    seen = {str(p) for p in calib.images}
    keep = [i for i, p in enumerate(ev.images) if str(p) not in seen]
    held = Dataset([ev.images[i] for i in keep], None, ev.names, ev.source)
    ref_held = {**ref, "dets": [ref["dets"][i] for i in keep]}  # the same reference detections, not a second run
    for name, p in paths.items():
        rows.setdefault(name, {})["mb"] = p.stat().st_size / 1e6
        if name == "FP32":
            rows[name].update(fidelity=1.0, fidelity_ci=[1.0, 1.0])
            continue
        pred = OrtPredictor(p, threads=2)
        r = evaluate(pred, ev, ref)
        rows[name].update(fidelity=r["fidelity"], fidelity_ci=r["fidelity_ci"])
        if keep:
            rows[name]["fidelity_held_out"] = evaluate(pred, held, ref_held, bootstrap=0)["fidelity"]
    ms = time_models(paths, arrays)
    for name in paths:
        rows[name]["ms"] = ms[name]
        rows[name]["speedup"] = ms["FP32"] / ms[name]

    info = cpu_info()
    print(f"\nDemo YOLOv8s, {args.imgsz}px, calibration: {len(calib.images)} images of {calib.source}; "
          f"evaluation: {len(ev.images)} images of {ev.source}; ONNX Runtime CPU, 2 threads; {info['cpu']} "
          f"({', '.join(info['int8_isa'])})\n")
    print(f"held out: the {len(held.images)} evaluation images that no row calibrated or fine-tuned on\n")
    print("| method | fidelity | 95% CI | held out | ms/img | speed-up | MB | calibrate / finetune s |\n"
          "|---|---|---|---|---|---|---|---|")
    for name, r in [("FP32", rows["FP32"])] + [(k, v) for k, v in rows.items() if k != "FP32"]:
        if "skipped" in r:
            print(f"| {name} | skipped: {r['skipped']} | | | | | | |")
            continue
        lo, hi = r["fidelity_ci"]
        cal = f"{r['calib_s']:.0f}" if "calib_s" in r else ""
        ho = f"{r['fidelity_held_out']:.3f}" if "fidelity_held_out" in r else ""
        print(f"| {name} | {r['fidelity']:.3f} | {lo:.3f}-{hi:.3f} | {ho} | {r['ms']:.1f} | {r['speedup']:.2f}x | "
              f"{r['mb']:.1f} | {cal} |")
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_text(json.dumps({"machine": info, "imgsz": args.imgsz, "calibration": calib.source,
                                           "calibration_images": len(calib.images), "evaluation": ev.source,
                                           "evaluation_images": len(ev.images), "rows": rows}, indent=2))


if __name__ == "__main__":
    main()
