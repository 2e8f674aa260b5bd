"""FakeQuantizer: a tensor's quantizer with explicit phases.

State has fixed names created at construction — ``scale`` (a parameter, frozen: requires_grad is off),
``zero_point`` and ``calibrated`` — so a quantized model round-trips through ``state_dict``.

Phases, each a named call:
    q.observe()   # forward passes record statistics and return x unchanged
    q.freeze()    # statistics -> scale and zero point; forward now fake-quantizes

>>> import torch
>>> q = FakeQuantizer(QSpec(bits=8))
>>> q.observe(); _ = q(torch.linspace(0, 1, 11)); q.freeze()
>>> round(float(q.scale), 5)
0.00392
"""

from __future__ import annotations

import torch
from torch import nn

import math

from yoloq.core.functional import broadcast_shape, ceil_ste, choose_qparams, fake_quantize, lsq_fake_quantize
from yoloq.core.observers import make_observer
from yoloq.core.qspec import QSpec

# Smallest activation step. ORT stores a conv's bias as int32 in units of (input step x weight step); with no floor a
# near-constant tensor (dead channels, random-init models) gets a step so small that the bias overflows int32.
MIN_ACT_SCALE = 1e-4


class QDQ(torch.autograd.Function):
    """Fake quantization that exports to ONNX as QuantizeLinear -> [Clip ->] DequantizeLinear.

    Ranges below 8 bits live inside uint8/int8 Q/DQ: a Clip on the integer codes restricts them to the low-bit range
    (left out when the producer provably stays inside it), so ONNX Runtime reproduces the low-bit numerics with int8
    kernels.
    """

    @staticmethod
    def forward(ctx, x, scale: float, zero_point: int, qmin: int, qmax: int, signed: bool, clip: bool):  # noqa: ARG004
        s = torch.tensor(scale, dtype=x.dtype)
        return fake_quantize(x, s, torch.tensor(float(zero_point)), qmin, qmax)

    @staticmethod
    def symbolic(g, x, scale: float, zero_point: int, qmin: int, qmax: int, signed: bool, clip: bool):
        dtype = torch.int8 if signed else torch.uint8
        full = (-128, 127) if signed else (0, 255)
        s = g.op("Constant", value_t=torch.tensor(scale, dtype=torch.float32))
        z = g.op("Constant", value_t=torch.tensor(zero_point, dtype=dtype))
        codes = g.op("QuantizeLinear", x, s, z)
        # Clipping the codes equals clipping x to the grid's ends before rounding (Q is monotone and saturates), and
        # leaves the producer's DQ -> op -> Q intact for ORT's QLinear* fusion, which a float Clip in front of the Q
        # stops (demo W4A4: residual Adds and Concats ran in float, 1.75x FP32 instead of 2.17x)
        if (qmin, qmax) != full and clip:
            lo = g.op("Constant", value_t=torch.tensor(qmin, dtype=dtype))
            hi = g.op("Constant", value_t=torch.tensor(qmax, dtype=dtype))
            codes = g.op("Clip", codes, lo, hi)
        return g.op("DequantizeLinear", codes, s, z)


class FakeQuantizer(nn.Module):
    def __init__(self, spec: QSpec, channels: int = 1, observer: str = "minmax", weight: bool = False) -> None:
        super().__init__()
        if not spec.per_channel and channels != 1:
            raise ValueError("a per-tensor quantizer has one channel")
        self.spec, self.observer_name, self.weight = spec, observer, weight
        self.scale = nn.Parameter(torch.ones(channels), requires_grad=False)
        self.register_buffer("zero_point", torch.zeros(channels))
        self.register_buffer("calibrated", torch.tensor(False))
        self.enabled = True
        # the largest value the producer can emit, when it is bounded (set by the module that owns this quantizer)
        self.input_max: float | None = None
        # one quantizer for several producers and their Concat's consumer (model.yolo.share_concat_grids)
        self.shared = False
        self.export_mode: str | None = None
        # fine-tuning (not saved): QDrop-style probability of passing an element through unquantized
        self.drop_prob = 0.0
        # fine-tuning (not saved): width, in steps, of a uniform subtractive dither on the rounding (0: none; 1: the
        # rounding error becomes noise independent of x), so training cannot fit the exact rounding of its images
        self.dither = 0.0
        # a grid fixed by construction (the image's 1/255, the SiLU gate's): never calibrated or learned
        self.fixed = False
        # TQT (while training only): the step as 2^ceil(log2_scale), learned in log2 space; None otherwise
        self.register_parameter("log2_scale", None)
        self._observer = None

    def extra_repr(self) -> str:
        s = self.spec
        kind = "per-channel" if s.per_channel else "per-tensor"
        sym = "symmetric" if s.symmetric else "asymmetric"
        return f"{'int' if s.signed else 'uint'}{s.bits} {kind} {sym}, observer={self.observer_name}"

    # ---- phases -------------------------------------------------------------------------------------------------
    def observe(self) -> None:
        self._observer = make_observer(self.observer_name, self.spec, weight=self.weight)

    def freeze(self) -> None:
        if self._observer is None:
            raise RuntimeError("freeze() called before observe()")
        lo, hi = self._observer.compute(self.spec)
        self.set_range(lo, hi)
        self._observer = None

    def set_range(self, lo: torch.Tensor, hi: torch.Tensor) -> None:
        scale, zp = choose_qparams(lo, hi, self.spec.qmin, self.spec.qmax, self.spec.symmetric)
        if not self.weight and bool((scale < MIN_ACT_SCALE).any()):
            mid = (lo.float() + hi.float()) / 2
            half = MIN_ACT_SCALE * (self.spec.qmax - self.spec.qmin) / 2
            scale, zp = choose_qparams(torch.minimum(lo, mid - half), torch.maximum(hi, mid + half), self.spec.qmin, self.spec.qmax, self.spec.symmetric)
        self.set_qparams(scale, zp)

    def set_qparams(self, scale: torch.Tensor, zero_point: torch.Tensor) -> None:
        with torch.no_grad():
            self.scale.copy_(scale.reshape(self.scale.shape))
            self.zero_point.copy_(zero_point.reshape(self.zero_point.shape))
            self.calibrated.fill_(True)

    def real_range(self) -> tuple[float, float]:
        """The smallest and largest value a per-tensor quantizer can output."""
        s, z = float(self.scale), float(self.zero_point)
        return (self.spec.qmin - z) * s, (self.spec.qmax - z) * s

    @property
    def observing(self) -> bool:
        return self._observer is not None

    def learn(self, on: bool = True, mode: str = "lsq") -> None:
        """Fine-tuning: make the step size learnable; the zero point stays fixed.

        mode "lsq": the step itself, with LSQ's gradient scale. mode "tqt": a power-of-two step 2^ceil(l) with l
        learned in log2 space (ceil passes the gradient straight through), starting at the power of two at or above
        the calibrated step so nothing that was in range gets clipped. Switching off writes a TQT step back into
        `scale`, so the saved state has the same names either way.
        """
        if mode not in ("lsq", "tqt"):
            raise ValueError(f"unknown step-size learning mode {mode!r}")
        if self.log2_scale is not None and not (on and mode == "tqt"):
            with torch.no_grad():
                self.scale.copy_(self._step())
            self.log2_scale = None
        if on and mode == "tqt":
            if self.log2_scale is None:
                self.log2_scale = nn.Parameter(torch.log2(self.scale.detach()).ceil())
            self.scale.requires_grad_(False)
        else:
            self.scale.requires_grad_(on)

    @property
    def learning(self) -> bool:
        return self.scale.requires_grad or self.log2_scale is not None

    def learned_parameters(self) -> list[nn.Parameter]:
        return [self.log2_scale] if self.log2_scale is not None else [self.scale] if self.scale.requires_grad else []

    def _step(self) -> torch.Tensor:
        if self.log2_scale is None:
            return self.scale
        return torch.exp2(ceil_ste(self.log2_scale))

    def clamp_scale(self, floor: float) -> None:
        """Keep a learned step above `floor` (ORT's int32 bias needs activation steps >= MIN_ACT_SCALE)."""
        with torch.no_grad():
            if self.log2_scale is not None:
                self.log2_scale.clamp_(min=math.log2(floor))
            else:
                self.scale.clamp_(min=floor)

    # ---- numerics -----------------------------------------------------------------------------------------------
    def _params(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        scale = self._step()
        if self.spec.per_channel:
            shape = broadcast_shape(x, self.spec.axis)
            return scale.view(shape), self.zero_point.view(shape)
        return scale, self.zero_point

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self._observer is not None:
            self._observer.update(x)
            return x
        if not self.enabled or not bool(self.calibrated):
            return x
        if self.export_mode == "qdq" and not self.spec.per_channel:
            scale, zp = float(self.scale), int(self.zero_point)
            clip = self.spec.qmin != 0 or self.input_max is None or round(self.input_max / scale) + zp > self.spec.qmax
            return QDQ.apply(x, scale, zp, self.spec.qmin, self.spec.qmax, self.spec.signed, clip)
        scale, zp = self._params(x)
        dither = (torch.rand_like(x) - 0.5) * self.dither if self.dither > 0 and torch.is_grad_enabled() else None
        if not self.learning:
            y = fake_quantize(x, scale, zp, self.spec.qmin, self.spec.qmax, dither)
        else:
            # LSQ's gradient scale 1/sqrt(N * Qp), N the elements sharing one step (per sample)
            n = x[0].numel() if not self.spec.per_channel else x.numel() // x.shape[self.spec.axis]
            y = lsq_fake_quantize(x, scale, zp, self.spec.qmin, self.spec.qmax, 1 / math.sqrt(n * self.spec.qmax),
                                  dither)
        if self.drop_prob > 0 and torch.is_grad_enabled():
            # QDrop: random elements skip quantization, so the next layers see a mix (flatter loss surface)
            y = torch.where(torch.rand_like(x) < self.drop_prob, x, y)
        return y

    def int_repr(self, x: torch.Tensor) -> torch.Tensor:
        """Integer codes of x, as int8/uint8 (the weight initializers of the QDQ export)."""
        scale, zp = self._params(x)
        q = torch.clamp(torch.round(x / scale) + zp, self.spec.qmin, self.spec.qmax)
        return q.to(torch.int8 if self.spec.signed else torch.uint8)
