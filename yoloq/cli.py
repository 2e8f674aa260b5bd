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
    qckpt: Annotated[str, typer.Argument(help="Quantized checkpoint from `yoloq calibrate` or `yoloq finetune`.")],
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


QAT_METHODS = ("hqod", "lsq")


@command()
def finetune(
    model: Annotated[str, typer.Argument(help="Float model (.pt / YAML) or a quantized checkpoint.")],
    data: Data,
    bits: Annotated[Optional[int], typer.Option(help="Weights and activations at B bits (2-8). Default 4.")] = None,
    wbits: Annotated[Optional[int], typer.Option(help="Weight bits (2-8).")] = None,
    abits: Annotated[Optional[int], typer.Option(help="Activation bits (2-8).")] = None,
    method: Annotated[str, typer.Option(help=(
        "PTQ reconstruction: taskq | block-mse | brecq | qdrop | adaround. Quantization-aware training: hqod | lsq."))] = "taskq",
    iters: Annotated[Optional[int], typer.Option(help=(
        "taskq & co: optimisation steps per unit (default 1200). hqod/lsq: optimisation steps in all (default 300; "
        "30 from a taskq checkpoint)."))] = None,
    images: Annotated[Optional[int], typer.Option(help="Images to use. Default: taskq 64, hqod/lsq all.")] = None,
    imgsz: Annotated[Optional[int], typer.Option(help=(
        "Input size (multiple of 32). taskq: the model's size (default 640); hqod/lsq: the training size (default "
        "320, or the checkpoint's own size from a taskq checkpoint; the checkpoint keeps its size for export)."))] = None,
    seed: Annotated[int, typer.Option(help="Random seed.")] = 0,
    no_sparse: Annotated[bool, typer.Option("--no-sparse", help="taskq: no sparse outlier branch.")] = False,
    no_dtr: Annotated[bool, typer.Option("--no-dtr", help="taskq: no detection-aware loss on head units.")] = False,
    no_stahq: Annotated[bool, typer.Option("--no-stahq", help="taskq: the head as one block, not six units.")] = False,
    quantizer: Annotated[Optional[str], typer.Option(help="hqod/lsq: step sizes by lsq | tqt (power of two). Default lsq.")] = None,
    epochs: Annotated[Optional[int], typer.Option(help="hqod/lsq: passes over the images (instead of --iters).")] = None,
    batch: Annotated[Optional[int], typer.Option(help="hqod/lsq: images per step over all processes. Default 8.")] = None,
    device: Annotated[Optional[str], typer.Option(help="hqod/lsq: cpu | cuda. Default cpu.")] = None,
    pseudo_labels: Annotated[bool, typer.Option("--pseudo-labels", help=(
        "hqod/lsq: train on the float model's detections (conf >= 0.25) instead of the data's labels."))] = False,
    distill: Annotated[Optional[float], typer.Option(help=(
        "hqod/lsq: weight of distillation from the float model's raw head outputs (docs/methods.md); 0 switches it "
        "off. Default 100 from a taskq start (a TASKQ checkpoint, or --start taskq), 10 otherwise."))] = None,
    lr_schedule: Annotated[Optional[str], typer.Option(help=(
        "hqod/lsq: constant | cosine (decay to 1% at the last step, for long runs). Default constant."))] = None,
    start: Annotated[Optional[str], typer.Option(help=(
        "hqod/lsq from a float model: how it is quantized before training: taskq (TASKQ's default reconstruction "
        "on 64 images; then --iters and --imgsz default as from a taskq checkpoint) | ptq (calibration). "
        "Default taskq."))] = None,
    no_tcorr: Annotated[bool, typer.Option("--no-tcorr", help="hqod: no Task-Correlated loss.")] = False,
    no_hiou: Annotated[bool, typer.Option("--no-hiou", help="hqod: no Harmonious-IoU loss.")] = False,
    out: Annotated[Optional[str], typer.Option(help="Quantized checkpoint to write (progress kept in OUT.partial).")] = None,
    json_out: Annotated[Optional[str], typer.Option("--json", help="Also write the report as JSON.")] = None,
):
    """Recover low-bit accuracy: reconstruction against the float model (TASKQ and baselines), or quantization-aware
    training (HQOD, plain LSQ/TQT)."""
    from yoloq.io import check_writable

    b = _bits(bits, wbits, abits)
    out = out or f"{Path(model).stem}-{method}.qpt"
    qat_flags = {"--quantizer": quantizer is not None, "--epochs": epochs is not None, "--batch": batch is not None,
                 "--device": device is not None, "--pseudo-labels": pseudo_labels, "--distill": distill is not None,
                 "--lr-schedule": lr_schedule is not None, "--start": start is not None, "--no-tcorr": no_tcorr,
                 "--no-hiou": no_hiou}
    taskq_flags = {"--no-sparse": no_sparse, "--no-dtr": no_dtr, "--no-stahq": no_stahq}
    if method in QAT_METHODS:
        bad = [k for k, v in taskq_flags.items() if v]
        if bad:
            raise YoloqError(f"{bad[0]} applies to --method taskq only, not {method}")
        if method == "lsq" and (no_tcorr or no_hiou):
            raise YoloqError(f"{'--no-tcorr' if no_tcorr else '--no-hiou'} applies to --method hqod only (lsq has no HQOD loss)")
        if epochs is not None and iters is not None:
            raise YoloqError("give either --epochs or --iters, not both")
        from yoloq.methods.qat import QATConfig

        opts = {"quantizer": quantizer, "epochs": epochs, "batch": batch, "device": device, "imgsz": imgsz, "iters": iters,
                "distill": distill, "lr_schedule": lr_schedule, "start": start}
        cfg = QATConfig(method=method, seed=seed, pseudo_labels=pseudo_labels, tcorr=not no_tcorr, hiou=not no_hiou,
                        **{k: v for k, v in opts.items() if v is not None})
        check_writable(out)
        if json_out:
            check_writable(json_out)
        _finetune_qat(model, data, cfg, out, b, images, json_out)
        return
    bad = [k for k, v in qat_flags.items() if v]
    if bad:
        raise YoloqError(f"{bad[0]} applies to --method hqod/lsq (quantization-aware training), not {method}")
    switches = {"sparse": no_sparse, "dtr": no_dtr, "stahq": no_stahq}
    if method != "taskq" and any(switches.values()):
        bad = next(k for k, v in switches.items() if v)
        raise YoloqError(f"--no-{bad} applies to --method taskq only ({method} has no {bad} component)")
    from yoloq.methods.taskq import TaskQConfig

    cfg = TaskQConfig.preset(method, seed=seed, **({"iters": iters} if iters is not None else {}),
                             **{k: False for k, v in switches.items() if v})
    check_writable(out)
    if json_out:
        check_writable(json_out)
    _finetune_taskq(model, data, cfg, out, b, images, imgsz, json_out)


def _finetune_taskq(model, data, cfg, out, b, images, imgsz, json_out) -> None:
    from rich.console import Console

    from yoloq import api
    from yoloq.ui import table

    qm, rep = api.finetune(model, data, cfg, out, b.get("weight_bits"), b.get("act_bits"), images, imgsz)
    rows = [[u["unit"], f"{u['loss_before']:.4g}", f"{u['loss_after']:.4g}", f"{u['seconds']:.1f}"] for u in rep["units"]]
    Console().print(table(f"yoloq finetune {cfg.method} {qm.recipe.name}", ["unit", "loss before", "loss after", "s"], rows))
    chosen = [r for r in rep["sparse"] if r["chosen"]]
    for r in chosen:
        typer.echo(f"sparse branch: {r['tensor']} (detection error -{100 * r['head_gain']:.0f}%, own error "
                   f"-{100 * r['gain']:.0f}%, outliers {100 * r['outlier_fraction']:.2f}%)")
    if json_out:
        _write_json(json_out, rep)
    typer.echo(f"wrote {out} ({qm.recipe.name}, {cfg.method}, {len(rep['units'])} units)")


def _finetune_qat(model, data, cfg, out, b, images, json_out) -> None:
    from rich.console import Console

    from yoloq import api
    from yoloq.ui import table

    qm, rep = api.qat(model, data, cfg, out, b.get("weight_bits"), b.get("act_bits"), images)
    if rep["rank"] != 0:
        return
    keys = [k for k in rep["history"][-1] if k not in ("epoch", "step")] if rep["history"] else []
    rows = [[h["epoch"], h["step"], *(f"{h.get(k, 0.0):.4f}" for k in keys)] for h in rep["history"]]
    shown = rows if len(rows) <= 12 else rows[:3] + [["...", "", *([""] * len(keys))]] + rows[-8:]
    Console().print(table(f"yoloq finetune {cfg.method} ({cfg.quantizer}) {qm.recipe.name}", ["epoch", "step", *keys], shown))
    took = rep["start_seconds"]
    typer.echo(f"start: {rep['start']}" + (f", {took:.0f} s" if took is not None else ""))
    typer.echo(f"{rep['labels']}; {rep['images']} images, {rep['steps']} steps, {rep['seconds']:.0f} s"
               + (f", {rep['world_size']} processes" if rep["world_size"] > 1 else ""))
    if json_out:
        _write_json(json_out, rep)
    typer.echo(f"wrote {out} ({qm.recipe.name}, {cfg.method})")


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
    harmony: Annotated[bool, typer.Option("--harmony", help=(
        "Also measure harmony (HQOD): |class score - IoU| of the true positives (IoU >= 0.5 with a box of their class) "
        "among the detections NMS keeps with score > --conf; the share with gap < 0.1, its histogram, and their "
        "mean score and IoU. Ground truth: the labels, else the --reference's detections (score > 0.25). With "
        "labels and --reference, the reference's harmony too. Runs the model once more."))] = False,
    harmony_plot: Annotated[Optional[str], typer.Option(help=(
        "PNG of the harmony histograms (needs --harmony). Default: beside --json as NAME.harmony.png "
        "(r.json -> r.harmony.png), else harmony.png in the current directory."))] = None,
):
    """Measure mAP against labels, fidelity against a reference model, and speed (and, with --harmony, how well
    class scores agree with box quality)."""
    from rich.console import Console

    from yoloq.data.datasets import resolve_data
    from yoloq.io import check_writable
    from yoloq.runtime import harmony as hm
    from yoloq.runtime.evaluate import detect, evaluate
    from yoloq.runtime.predictors import load_predictor
    from yoloq.ui import table

    if not 0 <= conf <= 1 or not 0 <= iou <= 1:
        raise YoloqError("--conf and --iou must be between 0 and 1")
    if max_det < 1 or threads < 1:
        raise YoloqError("--max-det and --threads must be at least 1")
    if harmony_plot and not harmony:
        raise YoloqError("--harmony-plot needs --harmony")
    if json_out:
        check_writable(json_out)
    if harmony:
        harmony_plot = harmony_plot or (str(Path(json_out).with_suffix(".harmony.png")) if json_out else "harmony.png")
        check_writable(harmony_plot)
    ds = resolve_data(data).take(images)
    pred = load_predictor(model, threads, imgsz)
    ref = load_predictor(reference, threads, imgsz or pred.imgsz) if reference else None
    if harmony:
        hm.check_ground_truth(ds, pred.names, ref is not None)  # before any inference
        ref_run = hm.reference_run(ref, ds, conf, iou, max_det) if ref else None  # one reference pass serves both
        rep = evaluate(pred, ds, hm.for_fidelity(ref_run) if ref_run else None, conf, iou, max_det)
        dets, _ = detect(pred, ds, conf, iou, max_det, f"harmony {pred.kind}")  # evaluate() keeps its detections
        rep["harmony"] = hm.harmony_section(dets, pred.names, ds, ref_run, conf)
    else:
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
    if harmony:
        _harmony_out(rep, Path(model).name, Path(reference).name if reference else None, harmony_plot)
    for n in rep["notes"]:
        typer.echo(f"note: {n}")
    if json_out:
        _write_json(json_out, rep)
    if harmony:
        typer.echo(f"wrote {harmony_plot}")


def _harmony_out(rep: dict, model: str, reference: str | None, plot: str) -> None:
    """Print the harmony table, write its plot, and fold its notes into the report's."""
    from rich.console import Console

    from yoloq.runtime.harmony import plot_harmony
    from yoloq.ui import table

    h = rep["harmony"]
    named = ([(f"reference {reference}", h["reference"])] if reference else []) + [(model, h["model"])]
    fmt = lambda v: "-" if v is None else f"{v:.3f}"  # noqa: E731
    rows = [[name, "-", "-", "-", "-", "-", "not computed"] if r is None else
            [name, r["tp"], fmt(r["share"]), fmt(r["mean_gap"]), fmt(r["mean_score"]), fmt(r["mean_iou"]),
             " ".join(map(str, r["counts"]))]
            for name, r in named]
    title = f"harmony: |score - IoU| of true positives (IoU >= {h['iou_thr']}) vs {h['ground_truth']}"
    Console().print(table(title, ["model", "TPs", "gap < 0.1", "mean gap", "mean score", "mean IoU",
                                  "TPs per 0.1 of gap"], rows))
    plot_harmony({name: r for name, r in named if r is not None}, plot)
    h["plot"] = plot
    rep["notes"] += h.pop("notes")


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
