"""Quantized modules built from the quantizers in ``quantizer.py``.

QConv2d is a conv (BN already folded) followed by its activation, with a quantizer at every tensor
ONNX Runtime needs to see quantized to run the whole thing as int8 kernels::

    x --[input_quantizer]--> conv(W --[weight_quantizer]-->) --[acc_quantizer]--> SiLU --[output_quantizer]-->

For SiLU the gate is quantized too: y = a * q_gate(sigmoid(a)) with a fixed uint8 grid of step 1/255 on [0, 1].
With every input of the Sigmoid and the Mul quantized, ORT runs them as QLinearSigmoid and QLinearMul; left in
float they cost about a third of the int8 model's time (measured on ORT 1.31, AVX-512 VNNI).

>>> import torch
>>> from torch import nn
>>> m = QConv2d(nn.Conv2d(3, 8, 3, padding=1), nn.SiLU(), weight_bits=8, act_bits=8)
>>> m(torch.zeros(1, 3, 8, 8)).shape
torch.Size([1, 8, 8, 8])
"""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from yoloq.core.adaround import AdaRound
from yoloq.core.functional import round_ste, scale_grad, silu_inverse
from yoloq.core.qspec import QSpec, activation_spec, weight_spec
from yoloq.core.quantizer import MIN_ACT_SCALE, FakeQuantizer

GATE_SPEC = QSpec(bits=8, signed=False, symmetric=False)


class CodesConst(torch.autograd.Function):
    """Passes a fake-quantized constant (a weight, a bias) through. In ONNX it is a constant: for "qdq" its integer
    codes (int8 weights, int32 biases in units of input step x weight step) and a per-channel DequantizeLinear, which
    ORT folds into QLinearConv; for "fake" the dequantized float values."""

    @staticmethod
    def forward(ctx, t_fq, codes, scale, mode: str):  # noqa: ARG004
        return t_fq

    @staticmethod
    def symbolic(g, t_fq, codes, scale, mode: str):  # noqa: ARG004
        # codes/scale arrive as numpy arrays (non-tensor arguments), so they become constants, not graph inputs
        if mode == "fake":
            shape = (-1,) + (1,) * (codes.ndim - 1)
            return g.op("Constant", value_t=torch.from_numpy(codes.astype(np.float32) * scale.reshape(shape)))
        c = g.op("Constant", value_t=torch.from_numpy(codes))
        z = g.op("Constant", value_t=torch.zeros(scale.shape[0], dtype=torch.from_numpy(codes).dtype))
        s = g.op("Constant", value_t=torch.from_numpy(scale))
        return g.op("DequantizeLinear", c, s, z, axis_i=0)


class QConv2d(nn.Module):
    def __init__(
        self,
        conv: nn.Conv2d,
        act: nn.Module | None,
        weight_bits: int = 8,
        act_bits: int | None = 8,
        acc_bits: int = 8,
        observer: str = "minmax",
        input_bits: int | None = None,
        quantize_gate: bool = True,
        weight_reduce_range: bool = False,
    ) -> None:
        super().__init__()
        self.conv = conv
        self.act = act if act is not None and not isinstance(act, nn.Identity) else None
        self.silu = isinstance(self.act, nn.SiLU)
        self.weight_quantizer = FakeQuantizer(weight_spec(weight_bits, weight_reduce_range), conv.out_channels, observer,
                                              weight=True)
        self.input_quantizer = (
            FakeQuantizer(activation_spec(input_bits), observer=observer) if input_bits is not None else None
        )
        # Without an activation the conv output is the tensor consumers see, so it gets the activation bits;
        # with one, the pre-activation tensor is the accumulator requantized for ORT's QLinearConv (8 bits).
        # Before a SiLU, what counts is the error after it: "mse" there is judged through the SiLU (observers.py)
        acc_observer = "silu-mse" if self.silu and observer == "mse" else observer
        self.acc_quantizer = FakeQuantizer(activation_spec(acc_bits), observer=acc_observer) if self.act else None
        self.gate_quantizer = FakeQuantizer(GATE_SPEC) if self.silu and quantize_gate else None
        if self.gate_quantizer is not None:
            self.gate_quantizer.set_qparams(torch.tensor([1 / 255]), torch.tensor([0.0]))
            self.gate_quantizer.fixed = True
        if act_bits is None and self.act is not None:
            raise ValueError("a conv with an activation needs an output quantizer")
        # act_bits=None: the output stays float (the head's last convs, whose outputs go straight to the decode)
        self.output_quantizer = FakeQuantizer(activation_spec(act_bits), observer=observer) if act_bits else None
        self.rounding: AdaRound | None = None  # learned rounding, only while fine-tuning (see start_rounding)
        # (module, attribute) holding the quantizer that makes this conv's input, when it has no input quantizer of
        # its own (set by wire_input_grids; a plain tuple, so the quantizer is not registered here a second time)
        self.input_source: tuple[nn.Module, str] | None = None

    def quantizers(self) -> dict[str, FakeQuantizer]:
        names = ("input_quantizer", "weight_quantizer", "acc_quantizer", "gate_quantizer", "output_quantizer")
        return {n: getattr(self, n) for n in names if getattr(self, n) is not None}

    def calibrate_weights(self, in_mean: torch.Tensor | None = None, in_sq: torch.Tensor | None = None,
                          bias_correction: bool = False, hessian: torch.Tensor | None = None) -> None:
        """Freeze the weight quantizer from the weights, given the per-channel input statistics E[x], E[x^2].

        With E[x^2], the clipping search weighs each weight by the power of the input it multiplies.
        With bias_correction, b <- b - conv(E[x], W_q - W): the output's expected shift caused by rounding the
        weights is put back into the bias (empirical bias correction; padding borders are ignored).
        """
        wq, w = self.weight_quantizer, self.conv.weight.detach().clone()  # GPTQ overwrites the weight below
        wq.observe()
        if in_sq is not None and hasattr(wq._observer, "importance"):
            wq._observer.importance = self._per_weight(in_sq)
        wq(w)
        wq.freeze()
        self.fit_bias_to_int32()
        if hessian is not None:
            # GPTQ: bake error-compensated rounding into the weights; they now lie on the grid
            from yoloq.core.gptq import gptq_round

            s = wq.scale.detach()
            q = gptq_round(w.reshape(w.shape[0], -1), hessian, s, wq.spec.qmin, wq.spec.qmax)
            with torch.no_grad():
                self.conv.weight.copy_(q.reshape_as(w))
        if bias_correction and in_mean is not None and self.conv.bias is not None:
            with torch.no_grad():
                delta = (wq(self.conv.weight) - w) * self._per_weight(in_mean)
                self.conv.bias -= delta.sum(dim=(1, 2, 3))
            self.fit_bias_to_int32()

    def _per_weight(self, per_input_channel: torch.Tensor) -> torch.Tensor:
        """A per-input-channel statistic laid out like the weight (groups: each output sees its group's inputs)."""
        c = self.conv
        cin_g = c.in_channels // c.groups
        per_group = per_input_channel.reshape(c.groups, cin_g)
        group_of_out = torch.arange(c.out_channels) // (c.out_channels // c.groups)
        return per_group[group_of_out][:, :, None, None].expand_as(c.weight)

    def bound_accumulator(self) -> None:
        """Below 8 bits, cap the pre-SiLU range at SiLU^-1 of the output's top, so the output never exceeds its
        low-bit range and the export needs no Clip on its codes.

        Lossless up to the gate-rounding margin: any larger pre-activation would have been clipped by the output
        quantizer anyway; the accumulator gets a finer step in exchange.
        """
        out, acc = self.output_quantizer, self.acc_quantizer
        # a sparse output quantizer passes outliers on through its 8-bit branch: the accumulator must keep them
        if not isinstance(out, FakeQuantizer):
            return
        if not self.silu or out.spec.bits >= 8 or not bool(out.calibrated) or not bool(acc.calibrated):
            return
        s_out, z_out = float(out.scale), float(out.zero_point)
        top = out.real_range()[1]
        lo, hi = acc.real_range()
        cap = silu_inverse(top)
        if top <= 0 or cap >= hi:
            return

        def fits() -> bool:
            return round(self.max_output() / s_out) + z_out <= out.spec.qmax

        # set_range rounds the zero point, so a bounded range can end a little above the cap: bounding again would
        # shrink it once more each time (fine-tuning re-bounds every unit it keeps)
        if fits():
            return
        for _ in range(50):  # the gate's rounding can push y = a * q(sigmoid(a)) a little up: shrink until it fits
            acc.set_range(torch.tensor([lo]), torch.tensor([cap]))
            if fits():
                break
            cap *= 0.995

    def max_output(self) -> float:
        """The largest post-SiLU value this layer can emit, given its accumulator and gate grids."""
        a = self.acc_quantizer.real_range()[1]
        g = torch.sigmoid(torch.tensor([a]))
        if self.gate_quantizer is not None:
            g = self.gate_quantizer(g)
        return float(a * g)

    def fit_bias_to_int32(self) -> None:
        """Raise weight steps where needed so int32 bias codes b / (s_in * s_w) cannot overflow for s_in >= MIN_ACT_SCALE.

        Only channels whose weights are tiny next to their bias (dead channels) are affected: their weights round to 0,
        which is what they nearly are.
        """
        if self.conv.bias is None or not bool(self.weight_quantizer.calibrated):
            return
        floor = self.conv.bias.detach().abs() / (0.5 * (2**31 - 1) * MIN_ACT_SCALE)
        with torch.no_grad():
            self.weight_quantizer.scale.copy_(torch.maximum(self.weight_quantizer.scale, floor))

    def start_rounding(self) -> None:
        """Fine-tuning: replace round-to-nearest of the weights by AdaRound's learnable rounding."""
        wq = self.weight_quantizer
        self.rounding = AdaRound(self.conv.weight, wq.scale, wq.spec.qmin, wq.spec.qmax)

    @torch.no_grad()
    def bake_rounding(self) -> None:
        """Make the learned rounding hard and write it into the weights, which then lie on the weight grid."""
        if self.rounding is None:
            return
        codes, s = self.rounding.hard_codes(), self.weight_quantizer.scale.detach()
        self.conv.weight.copy_(codes * s.reshape((-1,) + (1,) * (codes.dim() - 1)))
        self.rounding = None
        self.fit_bias_to_int32()

    def quantized_weight(self) -> torch.Tensor:
        wq = self.weight_quantizer
        if self.rounding is not None:
            s = wq.scale
            if wq.learning:  # LSQ gradient scale, N = weights per output channel
                s = scale_grad(s, 1 / math.sqrt(self.conv.weight[0].numel() * wq.spec.qmax))
            return self.rounding(s)
        w = wq(self.conv.weight)
        if wq.export_mode is not None and wq.enabled and bool(wq.calibrated):
            codes = wq.int_repr(self.conv.weight.detach()).cpu().numpy()
            scale = wq.scale.detach().cpu().numpy().astype(np.float32)
            w = CodesConst.apply(w, codes, scale, wq.export_mode)
        return w

    def input_grid(self) -> FakeQuantizer | None:
        """The per-tensor quantizer whose grid this conv's input lies on, or None (float input, sparse producer)."""
        q = self.input_quantizer
        if q is None and self.input_source is not None:
            q = getattr(*self.input_source, None)
        return q if isinstance(q, FakeQuantizer) and not q.spec.per_channel else None

    def quantized_bias(self) -> torch.Tensor | None:
        """The bias on ORT's int32 grid: b_q = round(b / (s_in * s_w)) * s_in * s_w.

        Wherever a conv's input and weights come from DequantizeLinear, ORT stores its bias as int32 codes in units of
        s_in * s_w (it rounds a float bias itself, in its BiasQuantization pass), so the fake-quant model rounds it
        the same way; the gradient passes straight through (bias learning). Left float where ORT leaves it float.
        """
        b, wq, q = self.conv.bias, self.weight_quantizer, self.input_grid()
        if b is None or q is None or not _quantizing(wq) or not _quantizing(q):
            return b
        step = (q._step().detach().float() * wq._step().detach().float()).reshape(b.shape)
        codes = torch.clamp(round_ste(b / step), -(2**31), 2**31 - 1)
        b_q = codes * step
        if wq.export_mode is not None:
            b_q = CodesConst.apply(b_q, codes.detach().cpu().numpy().astype(np.int32),
                                    step.cpu().numpy().astype(np.float32), wq.export_mode)
        return b_q

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.input_quantizer is not None:
            if self.input_quantizer.shared and self.input_quantizer.export_mode is not None:
                # every input was quantized by this quantizer already: no Clip (read only by the export)
                self.input_quantizer.input_max = self.input_quantizer.real_range()[1]
            x = self.input_quantizer(x)
        c = self.conv
        y = F.conv2d(x, self.quantized_weight(), self.quantized_bias(), c.stride, c.padding, c.dilation, c.groups)
        if self.act is None:
            return self.output_quantizer(y) if self.output_quantizer is not None else y
        y = self.acc_quantizer(y)
        if self.silu and isinstance(self.output_quantizer, FakeQuantizer) and self.output_quantizer.export_mode is not None:
            # derived from saved state (accumulator and gate grids), so a reloaded checkpoint exports the same graph
            self.output_quantizer.input_max = self.max_output()
        if self.silu:
            gate = torch.sigmoid(y)
            if self.gate_quantizer is not None:
                gate = self.gate_quantizer(gate)
            y = y * gate
        else:
            y = self.act(y)
        return self.output_quantizer(y)


class QuantizedOutput(nn.Module):
    """Wraps a module whose output is a new tensor (a residual Add, a Concat) and quantizes that output.

    """

    def __init__(self, module: nn.Module, bits: int, observer: str = "minmax") -> None:
        super().__init__()
        self.module = module
        self.output_quantizer = FakeQuantizer(activation_spec(bits), observer=observer)

    def forward(self, x):
        self.output_quantizer.input_max = None  # unbounded (a shared quantizer may hold another producer's bound)
        return self.output_quantizer(self.module(x))


def _quantizing(q: FakeQuantizer) -> bool:
    return q.enabled and bool(q.calibrated) and not q.observing


@torch.no_grad()
def wire_input_grids(model: nn.Module, example: torch.Tensor) -> int:
    """Point every QConv2d without an input quantizer of its own at the output quantizer that makes its input.

    A conv's input comes from an earlier module's output quantizer, often through ops that only move values (chunk,
    split, max-pool, nearest upsample, reshape), so it is found from one forward pass on `example` rather than from
    each architecture's wiring: the source is the most recent output quantizer whose output shares the input's
    storage (a view), else the most recent one whose output holds every value of the input (a copy, a pooled or
    upsampled map). Meant for freshly placed quantizers, which pass values through, so values are continuous and a
    chance match is unlikely. Returns the number of convs wired.
    """
    owners = {}
    for m in model.modules():
        if isinstance(m, QConv2d | QuantizedOutput) and isinstance(m.output_quantizer, nn.Module):
            owners.setdefault(id(m.output_quantizer), (m, "output_quantizer"))
    produced: list[tuple[torch.Tensor, tuple[nn.Module, str]]] = []

    def record(q, _inp, out):
        produced.append((out, owners[id(q)]))

    def match(conv, inp):
        x = inp[0]
        ptr = x.untyped_storage().data_ptr()
        src = next((o for t, o in reversed(produced) if t.untyped_storage().data_ptr() == ptr), None)
        if src is None:
            values = x.flatten()
            src = next((o for t, o in reversed(produced) if bool(torch.isin(values, t.flatten()).all())), None)
        conv.input_source = src

    convs = [m for m in model.modules() if isinstance(m, QConv2d) and m.input_quantizer is None]
    hooks = [m.register_forward_hook(record) for m in model.modules() if id(m) in owners]
    hooks += [m.register_forward_pre_hook(match) for m in convs]
    try:
        model(example)
    finally:
        for h in hooks:
            h.remove()
    return sum(m.input_source is not None for m in convs)


def iter_quantizers(model: nn.Module):
    """(qualified name, quantizer) for every FakeQuantizer in the model."""
    for name, m in model.named_modules():
        if isinstance(m, FakeQuantizer):
            yield name, m
