"""The quantized checkpoint: one versioned file with the model structure, recipe, quantizer state and provenance.

It holds only tensors and plain data, so ``torch.load(path, weights_only=True)`` reads it; the quantized model
is rebuilt from the Ultralytics model YAML, fused, given the recipe's quantizers, and the state dict loaded.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch

from yoloq.errors import YoloqError
from yoloq.io import atomic_path
from yoloq.recipe import Recipe

FORMAT = "yoloq.quantized-checkpoint"
VERSION = 4  # 2: the head's final convs have no output quantizer; 3: the recipe says weight_reduce_range;
# 4: it says share_concat_grids
READABLE = (2, 3, 4)


@dataclass
class QuantizedModel:
    model: torch.nn.Module
    recipe: Recipe
    provenance: dict
    model_yaml: dict  # the Ultralytics model YAML: rebuilds the structure on load
    names: dict


def _plain(obj):
    """Plain JSON-able data only (str subclasses such as TorchVersion would break weights_only loading)."""
    return json.loads(json.dumps(obj, default=str))


def payload(qm: QuantizedModel) -> dict:
    """The checkpoint's contents: plain data and tensors only."""
    return {
        "format": FORMAT,
        "version": VERSION,
        "recipe": qm.recipe.to_dict(),
        "model_yaml": _plain(qm.model_yaml),
        "names": {int(k): str(v) for k, v in qm.names.items()},
        "state_dict": {k: v.detach().cpu().clone() for k, v in qm.model.state_dict().items()},
        "provenance": _plain(qm.provenance),
    }


def save(path: str | Path, qm: QuantizedModel) -> Path:
    with atomic_path(path) as tmp:
        torch.save(payload(qm), tmp)
    return Path(path)


def read(path: str | Path) -> dict | None:
    """The payload if `path` is a yoloq checkpoint, None if it is some other torch file."""
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except Exception:  # noqa: BLE001  (an Ultralytics pickle fails here; it is not ours)
        return None
    if not isinstance(payload, dict) or payload.get("format") != FORMAT:
        return None
    if payload.get("version") not in READABLE:
        raise YoloqError(f"{path}: checkpoint version {payload.get('version')} is not supported (expected {VERSION})")
    if payload["version"] == 2:  # calibrated before reduce_range existed: full-range 8-bit weight codes
        payload["recipe"] = {**payload["recipe"], "weight_reduce_range": False}
    if payload["version"] in (2, 3):  # calibrated with a grid of its own for every Concat input
        payload["recipe"] = {**payload["recipe"], "share_concat_grids": False}
    payload["version"] = VERSION
    return payload


def load(path: str | Path, payload: dict | None = None) -> QuantizedModel:
    from yoloq.model import yolo
    from yoloq.methods import build_quantized

    payload = payload or read(path)
    if payload is None:
        raise YoloqError(f"not a yoloq quantized checkpoint: {path} (make one from a model with `yoloq calibrate` or "
                         "`yoloq finetune`)")
    recipe = Recipe.from_dict(payload["recipe"])
    model = yolo.prepare(yolo.model_from_yaml(payload["model_yaml"], payload["names"]))
    model = build_quantized(model, recipe)
    missing, unexpected = model.load_state_dict(payload["state_dict"], strict=False)
    if missing or unexpected:
        raise YoloqError(f"{path}: checkpoint does not match its recipe ({len(missing)} missing, {len(unexpected)} unexpected)")
    return QuantizedModel(model.eval(), recipe, payload["provenance"], payload["model_yaml"], payload["names"])
