"""Float in the integer graph: nodes kept in float (keep_float, ConvTranspose, a Softmax tail) and the conversions of
codes, accumulators and pooled sums to float (DequantizeLinear, or a float rescale of a sum of terms) and back."""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np
import onnx
from onnx import TensorProto, helper

from onnxqat.fusion.builder import GraphBuilder
from onnxqat.fusion.graph import QatGraph, attrs
from onnxqat.fusion.lower_pooling import acc_of_pooled
from onnxqat.fusion.outputs import acc_output
from onnxqat.fusion.values import Acc, Codes, Float, Pooled
from onnxqat.ops.schema import DOMAIN

if TYPE_CHECKING:
    from onnxqat.fusion.lower import Lowerer


def keep_float(low: Lowerer, node: onnx.NodeProto, record: bool = True) -> None:
    """The node itself on float inputs (weights fake-quantized as constants); its outputs are Float."""
    g, b = low.g, low.b
    ins = []
    for i in node.input:
        q = g.producer.get(i)
        if not i:
            ins.append("")
        elif i in g.consts:
            ins.append(b.const(i, g.consts[i]))
        elif q is not None and q.domain == DOMAIN and q.input[0] in g.consts:  # fake-quantized weight, as a constant
            ins.append(b.const(i, fake_quantized_weight(g, q)))
        else:
            ins.append(to_float(low, low.get(i, node)))
    outs = [b.fresh(o) if o else "" for o in node.output]
    b.nodes.append(helper.make_node(node.op_type, ins, outs, name=b.fresh(node.name or outs[0]), domain=node.domain,
                                    **attrs(node)))
    for o_old, o_new in zip(node.output, outs):
        if o_old:
            low.val[o_old] = Float(o_new)
    if record:
        low.kept.append(node.name or node.output[0])


def fake_quantized_weight(g: QatGraph, q: onnx.NodeProto) -> np.ndarray:
    from onnxqat.ops import reference as ref

    args = [g.const(i, q, "input") for i in q.input]
    if q.op_type == "SatWeightQuant":
        return ref.sat_weight_forward(*args)
    return ref.lsq_forward(*args)


def dequantize(b: GraphBuilder, c: Codes) -> str:
    s = b.const(f"{c.name}_scale", np.array(c.scale, np.float32))
    zp = b.const(f"{c.name}_zp", np.array(c.zp, helper.tensor_dtype_to_np_dtype(c.dtype)))
    return b.op("DequantizeLinear", [c.name, s, zp], f"{c.name}_dq")


def to_float(low: Lowerer, v) -> str:
    b = low.b
    if isinstance(v, Pooled):
        v = acc_of_pooled(b, v, f"{v.codes.name}_pool")
    if isinstance(v, Float):
        return v.name
    if isinstance(v, Codes):
        return dequantize(b, v)
    if len(v.terms) == 1 and not np.isfinite(v.clip).any():  # int32 codes + DequantizeLinear, as for an output
        out = b.fresh(f"{v.terms[0][0]}_dq")
        acc_output(b, v, out, out, True)
        return out
    parts = []
    for t, sc, _ in v.terms:
        tf = b.cast(t, TensorProto.FLOAT, f"{t}_f")
        parts.append(b.op("Mul", [tf, b.const(f"{t}_s", sc.astype(np.float32).reshape(_cshape(v, sc)))], f"{t}_real"))
    y = parts[0]
    for p in parts[1:]:
        y = b.op("Add", [y, p], f"{y}_sum")
    y = b.op("Add", [y, b.const(f"{y}_b", v.bias.astype(np.float32).reshape(_cshape(v, v.bias)))], f"{y}_b")
    if np.isfinite(v.clip).any():
        lo = b.const(f"{y}_lo", np.array(v.clip[0] if np.isfinite(v.clip[0]) else -np.finfo(np.float32).max, np.float32))
        hi = b.const(f"{y}_hi", np.array(v.clip[1] if np.isfinite(v.clip[1]) else np.finfo(np.float32).max, np.float32))
        y = b.op("Clip", [y, lo, hi], f"{y}_clip")
    return y


def to_codes(b: GraphBuilder, v: Float) -> Codes:
    """A float tensor known to lie on a grid of codes (v.grid) back to those codes: QuantizeLinear."""
    c = v.grid
    s = b.const(f"{v.name}_scale", np.array(c.scale, np.float32))
    zp = b.const(f"{v.name}_zp", np.array(c.zp, helper.tensor_dtype_to_np_dtype(c.dtype)))
    return Codes(b.op("QuantizeLinear", [v.name, s, zp], f"{v.name}_q"), c.scale, c.r, c.dtype, c.zp)


def _cshape(v: Acc, per_channel: np.ndarray) -> tuple:
    return v.cshape if per_channel.size > 1 else ()
