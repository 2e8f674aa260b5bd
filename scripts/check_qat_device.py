"""Run the same QAT steps on the CPU and on another device, on one fixed batch, and say where they part.

The first QAT runs on a lent H100 ended far below the same recipe on the CPU (demo W4A4, 300 steps: 0.14 against
0.51). The cause was the older PyTorch there (torch.clamp's gradient at its bounds; see yoloq.core.functional.
fake_quantize), but a device may differ in other ways. Run this before a long GPU training: both copies start from one
checkpoint, see the same un-augmented batch and the same teacher, and after each step it reports, per parameter kind
(weights and biases, weight steps, activation steps), the cosine similarity and norm ratio of the two gradients, the
share of elements whose gradient signs agree, and how far the parameters have moved apart.

    python scripts/check_qat_device.py W4A4.qpt --data images/ [--other cuda] [--steps 5] [--json out/check.json]

`--other cpu` compares the CPU with itself: every similarity must be 1 (a check of the script).
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
import tempfile
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from yoloq import api  # noqa: E402
from yoloq.data.datasets import resolve_data, write_yolo  # noqa: E402
from yoloq.methods import qat  # noqa: E402
from yoloq.model import yolo  # noqa: E402
from yoloq.ui import console  # noqa: E402

KINDS = ("weights", "weight steps", "activation steps")


def kind(name: str) -> str:
    if name.endswith("scale"):  # FakeQuantizer.scale or .log2_scale
        return "weight steps" if ".weight_quantizer." in name else "activation steps"
    return "weights"


def flat(tensors: dict[str, torch.Tensor], k: str) -> torch.Tensor:
    parts = [t.detach().double().cpu().reshape(-1) for n, t in tensors.items() if kind(n) == k]
    return torch.cat(parts) if parts else torch.zeros(0, dtype=torch.float64)


def compare(a: dict, b: dict) -> dict:
    out = {}
    for k in KINDS:
        x, y = flat(a, k), flat(b, k)
        if not x.numel():
            continue
        nx, ny = float(x.norm()), float(y.norm())
        cos = float(x @ y / (nx * ny)) if nx and ny else float(nx == ny)
        both = (x != 0) | (y != 0)
        signs = float((torch.sign(x) == torch.sign(y))[both].double().mean()) if bool(both.any()) else 1.0
        out[k] = {"cosine": cos, "norm_ratio": ny / nx if nx else float("inf"), "sign_agreement": signs}
    return out


class Copy:
    """One device's copy of the training state."""

    def __init__(self, qm, teacher, cfg, device: str) -> None:
        self.model = copy.deepcopy(qm.model).to(device)
        self.opt = torch.optim.Adam(qat.setup(self.model, cfg))
        self.criterion = yolo.detection_loss(self.model, cfg.hqod)
        self.teacher = copy.deepcopy(teacher).to(device).train() if cfg.distill else None
        self.model.train()

    def step(self, batch: dict, distill: float) -> tuple[float, dict, dict]:
        """Loss, the gradients before clipping, then the parameters after the update (all on the CPU)."""
        loss, _ = qat.training_loss(self.model, self.criterion, self.teacher, batch, distill)
        self.opt.zero_grad(set_to_none=True)
        loss.backward()
        named = [(n, p) for n, p in self.model.named_parameters() if p.grad is not None]
        grads = {n: p.grad.detach().cpu().clone() for n, p in named}
        torch.nn.utils.clip_grad_norm_(self.model.parameters(), 10.0)
        self.opt.step()
        qat._clamp_steps(self.model)
        return float(loss.detach()), grads, {n: p.detach().cpu().clone() for n, p in named}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("checkpoint", help="a quantized checkpoint (.qpt)")
    ap.add_argument("--data", required=True, help="training images (pseudo-labelled by the float model)")
    ap.add_argument("--other", default="cuda", help="the device to compare with the CPU (cuda, or cpu as a check)")
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--imgsz", type=int, default=320)
    ap.add_argument("--method", default="hqod")
    ap.add_argument("--distill", type=float, default=10.0)
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    if args.other.startswith("cuda") and not torch.cuda.is_available():
        console.print("error: --other cuda: no CUDA device here")
        raise SystemExit(2)

    torch.manual_seed(0)
    cfg = qat.QATConfig(method=args.method, batch=args.batch, imgsz=args.imgsz, distill=args.distill)
    qm = api.load_quantized(args.checkpoint)
    teacher = api.float_of(qm)
    ds = resolve_data(args.data).take(args.batch)
    labels, _ = api.training_labels(ds, qm.names, teacher, True, qm.recipe.imgsz)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        images = write_yolo(ds.images, labels, Path(tmp) / "train")
        loader = yolo.training_loader(yolo.training_dataset(images, qm.names, args.imgsz, args.batch, augment=False),
                                      args.batch, shuffle=False)
        batch = next(iter(loader))
        cpu, other = Copy(qm, teacher, cfg, "cpu"), Copy(qm, teacher, cfg, args.other)
        for step in range(args.steps):
            la, ga, pa = cpu.step(batch, cfg.distill)
            lb, gb, pb = other.step(batch, cfg.distill)
            moved = {k: float((flat(pb, k) - flat(pa, k)).abs().max() / flat(pa, k).abs().max().clamp_min(1e-30))
                     for k in KINDS if flat(pa, k).numel()}
            rows.append({"step": step + 1, "loss_cpu": la, f"loss_{args.other}": lb, "gradients": compare(ga, gb),
                         "params_max_rel_diff": moved})

    from rich.table import Table

    t = Table(title=f"QAT steps: cpu vs {args.other}, one fixed batch of {args.batch} at {args.imgsz}px")
    for c in ("step", "loss cpu", f"loss {args.other}", "kind", "grad cosine", "norm ratio", "sign agree",
              "param rel diff"):
        t.add_column(c)
    for r in rows:
        for i, (k, g) in enumerate(r["gradients"].items()):
            head = [str(r["step"]), f"{r['loss_cpu']:.4f}", f"{r[f'loss_{args.other}']:.4f}"] if i == 0 else [""] * 3
            t.add_row(*head, k, f"{g['cosine']:.4f}", f"{g['norm_ratio']:.3f}", f"{g['sign_agreement']:.3f}",
                      f"{r['params_max_rel_diff'][k]:.2e}")
    console.print(t)
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps({"checkpoint": args.checkpoint, "other": args.other, "rows": rows},
                                              indent=2))


if __name__ == "__main__":
    main()
