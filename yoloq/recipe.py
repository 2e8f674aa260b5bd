"""A validated quantization recipe. YAML presets live in configs/; unknown keys are rejected.

>>> Recipe(weight_bits=4, act_bits=8).name
'W4A8'
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

import yaml

from yoloq.core.observers import OBSERVERS
from yoloq.errors import YoloqError


@dataclass
class Recipe:
    weight_bits: int = 8
    act_bits: int = 8
    observer: str = "mse"  # minmax | percentile | mse
    # both seed papers keep the first conv and the head's last 1x1 convs at 8 bits; low-bit there costs most accuracy
    keep_first_last_8bit: bool = True
    # quantizing the SiLU gate lets ORT run SiLU as QLinearSigmoid + QLinearMul instead of float (about 1.5x faster)
    quantize_gate: bool = True
    # 8-bit weight codes in [-64, 64] instead of [-128, 127] (ONNX Runtime's reduce_range): on x86 CPUs without
    # VNNI (AVX2, AMD Zen 1-3, Intel before Cascade Lake) ORT's int8 convs saturate otherwise. Demo YOLOv8s W8A8 on
    # an AVX2 EPYC: ORT fidelity 0.664 with full-range codes (PyTorch 0.933), 0.886 with reduced (PyTorch 0.882).
    # Low-bit weights are unaffected. Switch off only for models that will run on VNNI/AMX machines.
    weight_reduce_range: bool = True
    # below 8 bits, the inputs of the Concat inside C2f / C3k2 / C3 / SPPF / C2PSA are quantized once, on the grid of
    # the conv that reads the Concat, instead of on their own grid and then again on that one (docs/placement.md).
    # Off by default: +0.02 W4A4 fidelity after calibration, none measured after TASKQ fine-tuning
    share_concat_grids: bool = False
    # empirical bias correction below 8 bits: put the expected output shift caused by weight rounding back into the
    # bias. At 8 bits that shift is below the noise of its estimate (demo YOLOv8s W8A8 in ORT: 0.945 without, 0.926 with)
    bias_correction: bool = True
    # weight rounding below 8 bits: "nearest", or "gptq" (error-compensated rounding using each conv's input Hessian);
    # "learned" marks weights whose rounding a fine-tuning method learned and wrote into them
    weight_rounding: str = "gptq"
    images: int = 64
    imgsz: int = 640
    method: str = "ptq"
    # convs (module paths) whose SiLU output has a sparse 8-bit outlier branch (set by TASKQ fine-tuning)
    sparse_tensors: list = field(default_factory=list)

    def __post_init__(self) -> None:
        for f in fields(self):
            v = getattr(self, f.name)
            kind = {"int": int, "bool": bool, "str": str, "list": list}[f.type]
            if not isinstance(v, kind) or (kind is int and isinstance(v, bool)):
                raise YoloqError(f"recipe key {f.name} must be {f.type}, got {v!r}")
        from yoloq.methods import METHODS

        if self.method not in METHODS:
            raise YoloqError(f"unknown method {self.method!r}; choose from {', '.join(METHODS)}")
        for k in ("weight_bits", "act_bits"):
            v = getattr(self, k)
            if not isinstance(v, int) or not 2 <= v <= 8:
                raise YoloqError(f"{k.replace('_', ' ')} must be an integer from 2 to 8, got {v}")
        if self.observer not in OBSERVERS:
            raise YoloqError(f"unknown calibration method {self.observer!r}; choose from {', '.join(OBSERVERS)}")
        if self.weight_rounding not in ("nearest", "gptq", "learned"):
            raise YoloqError(f"weight_rounding must be 'nearest', 'gptq' or 'learned', got {self.weight_rounding!r}")
        if not all(isinstance(x, str) for x in self.sparse_tensors):
            raise YoloqError("recipe key sparse_tensors must be a list of module paths")
        if self.images < 1:
            raise YoloqError(f"number of images must be at least 1, got {self.images}")
        if self.imgsz <= 0 or self.imgsz % 32:
            raise YoloqError(f"image size must be a positive multiple of 32, got {self.imgsz}")

    @property
    def name(self) -> str:
        return f"W{self.weight_bits}A{self.act_bits}"

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "Recipe":
        known = {f.name for f in fields(cls)}
        extra = set(d) - known
        if extra:
            raise YoloqError(f"unknown recipe keys: {', '.join(sorted(extra))}")
        return cls(**d)

    @classmethod
    def from_yaml(cls, path: str | Path) -> "Recipe":
        try:
            d = yaml.safe_load(Path(path).read_text()) or {}
        except (OSError, ValueError, yaml.YAMLError) as e:
            raise YoloqError(f"unreadable recipe {path}: {str(e).splitlines()[0]}") from None
        if not isinstance(d, dict):
            raise YoloqError(f"recipe {path} must be a mapping")
        return cls.from_dict(d)
