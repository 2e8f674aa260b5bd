"""yoloq command line: a few lines per command over yoloq.api; domain errors become one line and exit code 2."""

from __future__ import annotations

import functools
import json
import sys
from pathlib import Path
from typing import Annotated, Optional

import typer

from yoloq.errors import YoloqError

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  help="Quantize Ultralytics YOLO detectors: calibrate, export to fast ONNX, evaluate.")

Data = Annotated[str, typer.Option("--data", help="Dataset YAML, or a directory of images (optional labels/ or COCO json).")]


def _fail(msg: str) -> None:
    typer.echo(f"error: {msg}", err=True)
    raise typer.Exit(2)


def command(name: str | None = None):
    """Register a command; YoloqError (bad input) prints one line and exits 2 instead of a traceback."""

    def register(fn):
        @functools.wraps(fn)
        def wrapper(*args, **kwargs):
            try:
                return fn(*args, **kwargs)
            except YoloqError as e:
                _fail(str(e))
            except KeyboardInterrupt:
                _fail("interrupted")

        return app.command(name)(wrapper)

    return register


def _bits(bits: Optional[int], wbits: Optional[int], abits: Optional[int]) -> dict:
    """Explicit bit flags as recipe keys; --bits B means weights and activations at B bits."""
    if bits is not None and (wbits is not None or abits is not None):
        raise YoloqError("give either --bits or --wbits/--abits, not both")
    w, a = (bits, bits) if bits is not None else (wbits, abits)  # ranges are checked by Recipe
    return {k: v for k, v in (("weight_bits", w), ("act_bits", a)) if v is not None}


def _write_json(path: str, obj) -> None:
    from yoloq.io import atomic_path

    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(obj, indent=2))


@command()
def calibrate(
    model: Annotated[str, typer.Argument(help="Ultralytics detection checkpoint (.pt) or model YAML.")],
    data: Data,
    bits: Annotated[Optional[int], typer.Option(help="Weights and activations at B bits (2-8). Default 8.")] = None,
    wbits: Annotated[Optional[int], typer.Option(help="Weight bits (2-8).")] = None,
    abits: Annotated[Optional[int], typer.Option(help="Activation bits (2-8).")] = None,
    method: Annotated[Optional[str], typer.Option(help="Range observer: minmax | percentile | mse. Default mse.")] = None,
    images: Annotated[Optional[int], typer.Option(help="Calibration images. Default 64.")] = None,
    imgsz: Annotated[Optional[int], typer.Option(help="Input size (multiple of 32). Default 640.")] = None,
    recipe: Annotated[Optional[Path], typer.Option(help="YAML recipe (configs/); explicit flags override it.")] = None,
    out: Annotated[Optional[str], typer.Option(help="Quantized checkpoint to write.")] = None,
):
    """Insert quantizers and calibrate them on a few images (post-training quantization)."""
    from yoloq import api
    from yoloq.io import check_writable
    from yoloq.recipe import Recipe

    base = Recipe.from_yaml(recipe).to_dict() if recipe else Recipe().to_dict()
    base.update(_bits(bits, wbits, abits))
    base.update({k: v for k, v in (("observer", method), ("images", images), ("imgsz", imgsz)) if v is not None})
    r = Recipe.from_dict(base)
    out = out or f"{Path(model).stem}-{r.name.lower()}.qpt"
    check_writable(out)
    qm = api.calibrate(model, data, r)
    api.save(qm, out)
    typer.echo(f"wrote {out} ({r.name}, {r.observer}, {qm.provenance['calibration_images']} images)")


@command()
def export(
    qckpt: Annotated[str, typer.Argument(help="Quantized checkpoint from `yoloq calibrate`.")],
    onnx: Annotated[bool, typer.Option("--onnx", help="Write ONNX (the only target for now).")] = False,
    format: Annotated[str, typer.Option("--format", help="qdq (int8 kernels in ORT) | fake (float graph).")] = "qdq",
    pack: Annotated[Optional[str], typer.Option(help="int4: store <=4-bit weights as ONNX int4 (smaller, slower in ORT).")] = None,
    imgsz: Annotated[Optional[int], typer.Option(help="Input size; default: the calibration size.")] = None,
    out: Annotated[Optional[str], typer.Option(help="ONNX file to write.")] = None,
):
    """Export a quantized checkpoint to ONNX that ONNX Runtime (and ultralytics.YOLO) can run."""
    from yoloq import api
    from yoloq.io import check_writable

    if not onnx:
        raise YoloqError("choose an export target: --onnx")
    out = out or str(Path(qckpt).with_suffix(".onnx"))
    check_writable(out)
    rep = api.export(qckpt, out, format, pack, imgsz)
    typer.echo(f"wrote {out} ({rep['format']}{', int4 weights' if pack else ''}, {rep['bytes'] / 1e6:.1f} MB)")


@command("eval")
def eval_(
    model: Annotated[str, typer.Argument(help=".pt, model YAML, quantized checkpoint, or .onnx (ONNX Runtime CPU).")],
    data: Data,
    reference: Annotated[Optional[str], typer.Option(help="FP32 model whose detections define fidelity.")] = None,
    json_out: Annotated[Optional[str], typer.Option("--json", help="Also write the report as JSON.")] = None,
    conf: Annotated[float, typer.Option(help="Confidence threshold, as in Ultralytics val.")] = 0.001,
    iou: Annotated[float, typer.Option(help="NMS IoU threshold.")] = 0.7,
    max_det: Annotated[int, typer.Option(help="Maximum detections per image.")] = 300,
    images: Annotated[Optional[int], typer.Option(help="Use the first N images.")] = None,
    imgsz: Annotated[Optional[int], typer.Option(help="Input size for PyTorch models (ONNX files carry theirs).")] = None,
    threads: Annotated[int, typer.Option(help="CPU threads for inference.")] = 2,
):
    """Measure mAP against labels, fidelity against a reference model, and speed."""
    from rich.console import Console

    from yoloq.data.datasets import resolve_data
    from yoloq.io import check_writable
    from yoloq.runtime.evaluate import evaluate
    from yoloq.runtime.predictors import load_predictor
    from yoloq.ui import table

    if not 0 <= conf <= 1 or not 0 <= iou <= 1:
        raise YoloqError("--conf and --iou must be between 0 and 1")
    if max_det < 1 or threads < 1:
        raise YoloqError("--max-det and --threads must be at least 1")
    if json_out:
        check_writable(json_out)
    ds = resolve_data(data).take(images)
    pred = load_predictor(model, threads, imgsz)
    ref = load_predictor(reference, threads, imgsz or pred.imgsz) if reference else None
    rep = evaluate(pred, ds, ref, conf, iou, max_det)
    cols, row = ["model", "images"], [Path(model).name, rep["images"]]
    if "map50_95" in rep:
        cols += ["mAP50-95", "mAP50"]
        row += [f"{rep['map50_95']:.3f}", f"{rep['map50']:.3f}"]
    if "fidelity" in rep:
        lo, hi = rep["fidelity_ci"]
        cols += ["fidelity", "95% CI"]
        row += [f"{rep['fidelity']:.3f}", f"{lo:.3f}-{hi:.3f}"]
    cols += ["ms median", "ms p90", "threads"]
    row += [f"{rep['ms_median']:.1f}", f"{rep['ms_p90']:.1f}", rep["threads"]]
    Console().print(table(f"yoloq eval ({rep['runtime']}, {rep['imgsz']}px)", cols, [row]))
    for n in rep["notes"]:
        typer.echo(f"note: {n}")
    if json_out:
        _write_json(json_out, rep)


def main() -> None:
    """Entry point. Usage errors (unknown option, a word where a number belongs) become one line and exit 2 too;
    anything else unexpected keeps its traceback: that is a bug to report."""
    try:
        rc = app(prog_name="yoloq", standalone_mode=False)  # returns (not raises) the code of a typer.Exit
    except typer.Exit as e:
        rc = e.exit_code
    except Exception as e:  # noqa: BLE001
        if type(e).__name__ in ("UsageError", "BadParameter", "NoSuchOption", "MissingParameter", "BadOptionUsage", "BadArgumentUsage"):
            typer.echo(f"error: {getattr(e, 'format_message', lambda: str(e))()}", err=True)
            sys.exit(2)
        raise
    sys.exit(rc if isinstance(rc, int) else 0)


if __name__ == "__main__":
    sys.exit(main())
