"""What an output format decides: how a weighted layer on codes is written, and how a value becomes the codes of the
next activation quantizer. The op lowerings (fusion/ops/) call these through `low.fmt`; everything else they write
is the same in every format."""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np
from onnx import TensorProto

from onnxqat.fusion.convert import acc_of_pooled, acc_to_float, dequantize, to_float
from onnxqat.fusion.values import Acc, Codes, CodesProduct, Float, Plain, Pooled, WeightedLayer

if TYPE_CHECKING:
    from onnxqat.fusion.lowering import Lowerer


def code_bounds(clip: tuple, s_out: float, r: int, zp: int) -> tuple[int, int]:
    """[lo, hi] of the codes: [0, r], narrowed by a Relu/Clip folded into the quantizer."""
    lo_u = 0 if not np.isfinite(clip[0]) else int(min(r, max(0, np.round(clip[0] / s_out) + zp)))
    hi_u = r if not np.isfinite(clip[1]) else int(max(lo_u, min(r, np.round(clip[1] / s_out) + zp)))
    return lo_u, hi_u


class Format:
    """Base of the output formats. Subclasses set `name` and implement `weighted` and `requantize_value`."""

    name = ""
    float_arithmetic = False  # True: sums, pooling and movement run on dequantized floats (QDQ)
    input_type: str | None = None  # forces the graph input type ("float" for QDQ), else the user's choice

    def __init__(self, rescale: str = "fixed-point"):
        self.rescale = rescale  # integer requantization: "fixed-point" (multiplier + shift) or "float"

    def weighted(self, low: Lowerer, layer: WeightedLayer):
        raise NotImplementedError

    def materialize(self, low: Lowerer, v):
        """A Pending value as an Acc (formats that never defer a layer return v as it is)."""
        return v

    def product(self, low: Lowerer, p: CodesProduct):
        """The Mul of two codes: the exact int32 product (u1 - z1)(u2 - z2), scale s1 s2."""
        b, name = low.b, p.out
        terms = []
        for k, c in enumerate((p.a, p.b)):
            t = b.cast(c.name, TensorProto.INT32, f"{name}_i{k}")
            if c.zp:
                t = b.op("Sub", [t, b.const(f"{name}_z{k}", np.array(c.zp, np.int32))], f"{name}_c{k}")
            terms.append(t)
        prod = b.op("Mul", terms, f"{name}_prod")
        return Acc([(prod, np.array([p.a.scale * p.b.scale]), p.a.bound * p.b.bound)], np.zeros(1), (), 1)

    def bias_step(self, low: Lowerer, layer: WeightedLayer) -> np.ndarray | None:
        """The grid (real value per step, per output channel) a kernel of this format rounds the layer's bias to, or
        None when the bias is added exactly (snap_bias.py moves the QAT model's bias onto it)."""
        return None

    def codes_op(self, low: Lowerer, op: str, inputs: list[str], name: str, attrs: dict) -> str:
        """An op that moves or selects codes (MaxPool, Reshape, Transpose ...) on the codes tensor inputs[0]."""
        return low.b.op(op, inputs, name, **attrs)

    def table_codes(self, low: Lowerer, t, q, name: str) -> str:
        """The codes of activation quantizer q (ops/quantizer.Quantizer) of a Table's values: one Gather of the
        table of its codes (integer-only, bit-exact)."""
        from onnxqat.fusion.ops.unary import table_lookup

        return table_lookup(low, t, q.codes(t.values).astype(np.uint8), name)

    def table_floats(self, low: Lowerer, t, name: str) -> str:
        """A Table's float values, for a consumer outside the integer part: one Gather of the values."""
        from onnxqat.fusion.ops.unary import table_lookup

        return table_lookup(low, t, t.values, name)

    def moved_term(self, old: str, new: str) -> None:
        """An accumulator term moved by a shape op (new holds old's numbers elsewhere)."""

    def acc_to_float(self, low: Lowerer, v: Acc, name: str) -> str:
        """The real value of an accumulator as a float tensor (a float island's input, a sum as a graph output)."""
        return acc_to_float(low.b, v, name)

    def output_acc(self, low: Lowerer, v: Acc, name: str) -> str | None:
        """A float tensor of an accumulator's real value for a graph output, or None for the default (int32 codes
        and a last DequantizeLinear, convert.acc_output)."""
        return None

    def requantize_value(self, low: Lowerer, v, s_out: float, r: int, name: str, zp: int):
        """An Acc or Codes -> codes of the quantizer (step s_out, range r, zero point zp)."""
        raise NotImplementedError

    def quantize_node(self, low: Lowerer, node, v, s_out: float, r: int, zp: int) -> str:
        """An activation quantizer node: its output's value is the codes of v (and the self-check compares them).
        Returns the QAT tensor whose value it set."""
        out = node.output[0]
        low.val[out] = low.record(out, self.requantize(low, v, s_out, r, out, zp))
        return out

    def requantize(self, low: Lowerer, v, s_out: float, r: int, name: str, zp: int = 0):
        """u = clip(round(v / s_out) + zp, 0, r) (and within a folded Relu/Clip of v)."""
        if isinstance(v, Pooled):
            v = acc_of_pooled(low.b, v, f"{name}_pool")
        if isinstance(v, (Float, Plain)):  # (Plain: a tensor computed from constants, e.g. an expanded class token)
            return quantize_float(low, v, s_out, r, name, zp)
        return self.requantize_value(low, v, s_out, r, name, zp)


def quantize_float(low: Lowerer, v, s_out: float, r: int, name: str, zp: int = 0) -> Codes:
    """A float value -> uint8 codes with zero point zp: Clip to the code range, then QuantizeLinear (which rounds half
    to even, as the quantizers do). uint8 with a zero point is onnxruntime's QDQ default; its QDQ propagation
    mishandles int8 codes."""
    b = low.b
    lo_u, hi_u = code_bounds(v.clip if isinstance(v, Acc) else (-np.inf, np.inf), s_out, r, zp)
    xf = to_float(low, v)
    lo = b.const(f"{name}_lo", np.array((lo_u - zp) * s_out, np.float32))
    hi = b.const(f"{name}_hi", np.array((hi_u - zp) * s_out, np.float32))
    y = b.op("Clip", [xf, lo, hi], f"{name}_clip")
    s = b.const(f"{name}_scale", np.array(s_out, np.float32))
    zq = b.const(f"{name}_zp", np.array(zp, np.uint8))
    return Codes(b.op("QuantizeLinear", [y, s, zq], f"{name}_codes"), s_out, r, TensorProto.UINT8, zp)


def dequantized(low: Lowerer, c: Codes) -> Float:
    """Codes as the float tensor a QDQ graph passes on (DequantizeLinear), remembering the grid."""
    return Float(dequantize(low.b, c), grid=c)
