"""Conversions between the representations of a value (values.py) in the graph being written: codes, accumulators
and pooled sums to float (DequantizeLinear, or a float rescale of a sum of terms), float back to codes, an
accumulator to int32 output codes; and the float island: a QAT node copied as it is onto float inputs."""

from __future__ import annotations

from dataclasses import replace

import math
from typing import TYPE_CHECKING

import numpy as np
import onnx
from onnx import TensorProto, helper

from onnxqat.errors import FuseError
from onnxqat.fusion.builder import GraphBuilder
from onnxqat.fusion.graph import QatGraph, attrs
from onnxqat.fusion.values import Acc, Codes, Float, Joined, OutputInfo, Plain, Pooled, Table
from onnxqat.ops.schema import DOMAIN

if TYPE_CHECKING:
    from onnxqat.fusion.lowering import Lowerer


def float_island(low: Lowerer, node: onnx.NodeProto) -> None:
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
        elif i in g.weight_restore:
            wq, c = g.weight_restore[i]
            ins.append(b.const(i, (fake_quantized_weight(g, wq) * c).astype(np.float32)))
        else:
            ins.append(to_float(low, low.get(i, node)))
    outs = [b.fresh(o) if o else "" for o in node.output]
    b.nodes.append(helper.make_node(node.op_type, ins, outs, name=b.fresh(node.name or outs[0]), domain=node.domain,
                                    **attrs(node)))
    for o_old, o_new in zip(node.output, outs):
        if o_old:
            low.val[o_old] = Float(o_new, island=True)


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
    if isinstance(v, (Float, Plain)):
        return v.name
    if isinstance(v, Codes):
        return dequantize(b, v)
    if isinstance(v, Joined):
        return b.op("Concat", [dequantize(b, c) for c in v.parts], f"{v.parts[0].name}_joined", axis=v.axis)
    if isinstance(v, Table):  # the float values the fake-quantized model has, by code
        return low.fmt.table_floats(low, v, f"{v.codes.name}_f")
    return low.fmt.acc_to_float(low, v, f"{v.terms[0][0]}_real")


def acc_to_float(b: GraphBuilder, v: Acc, name: str, float_terms: set = frozenset()) -> str:
    """sum_i t_i scale_i + bias in float (Cast of integer terms, Mul, Add), clipped by a folded Relu/Clip. Not a
    DequantizeLinear of int32: onnxruntime's QDQ propagation moves such a DequantizeLinear across a Transpose and
    writes a QuantizeLinear with its int32 zero point, which it then refuses (seen on two corpus models)."""
    parts = []
    for k, (t, sc, _) in enumerate(v.terms):
        tf = t if t in float_terms else b.cast(t, TensorProto.FLOAT, f"{name}_t{k}")
        parts.append(b.op("Mul", [tf, b.const(f"{name}_s{k}", sc.astype(np.float32).reshape(_cshape(v, sc)))],
                          f"{name}_p{k}"))
    y = parts[0]
    for p in parts[1:]:
        y = b.op("Add", [y, p], f"{name}_sum")
    if np.any(v.bias != 0):  # (a float accumulator has its bias inside already: one node less at batch 1)
        y = b.op("Add", [y, b.const(f"{name}_b", v.bias.astype(np.float32).reshape(_cshape(v, v.bias)))], f"{name}_b")
    if np.isfinite(v.clip).any():
        lo = b.const(f"{name}_lo", np.array(v.clip[0] if np.isfinite(v.clip[0]) else -np.finfo(np.float32).max,
                                            np.float32))
        hi = b.const(f"{name}_hi", np.array(v.clip[1] if np.isfinite(v.clip[1]) else np.finfo(np.float32).max,
                                            np.float32))
        y = b.op("Clip", [y, lo, hi], f"{name}_clip")
    return y


def to_codes(b: GraphBuilder, v: Float) -> Codes:
    """A float tensor known to lie on a grid of codes (v.grid) back to those codes: QuantizeLinear."""
    c = v.grid
    s = b.const(f"{v.name}_scale", np.array(c.scale, np.float32))
    zp = b.const(f"{v.name}_zp", np.array(c.zp, helper.tensor_dtype_to_np_dtype(c.dtype)))
    return replace(c, name=b.op("QuantizeLinear", [v.name, s, zp], f"{v.name}_q"))


def acc_of_pooled(b: GraphBuilder, p: Pooled, base: str) -> Acc:
    """The pooled mean as an accumulator: the int32 sum of the codes with scale / count."""
    v = p.codes
    x32 = b.cast(v.name, TensorProto.INT32, f"{base}_i32")
    ssum = b.op("ReduceSum", [x32, b.const(f"{base}_axes", np.array(p.axes, np.int64))], f"{base}_sum",
                keepdims=0 if p.flat else 1)
    s = v.scale / p.count
    return Acc([(ssum, np.array([s]), v.bound * p.count)], np.array([-s * v.zp * p.count]), (), 1)


def acc_output(b: GraphBuilder, v: Acc, name: str, out_name: str, dequantize: bool) -> OutputInfo:
    """Acc -> int32 codes in accumulator steps (c = acc + round(bias/scale)); with dequantize, refined by 2^k so
    the bias keeps 2^-k of a step, then DequantizeLinear to float. The last node writes `out_name`."""
    if len(v.terms) != 1:
        raise FuseError(f"'{name}' is a sum of branches without an activation quantizer")
    if np.isfinite(v.clip).any():
        raise FuseError(f"'{name}': a Relu/Clip after the last layer without a quantizer is not supported")
    t, sc, bound = v.terms[0]
    n = max(sc.size, v.bias.size)
    sc = np.broadcast_to(sc, (n,)).copy()
    bias = np.broadcast_to(v.bias, (n,))
    sgn = np.where(sc < 0, -1, 1)
    mag = np.abs(sc)
    mag = np.where(mag > 0, mag, np.max(mag) if np.max(mag) > 0 else 1.0)
    bcode = bias / mag
    room = (2 ** 30) / max(bound + np.max(np.abs(bcode)) + 1, 1)
    k = int(max(0, min(16, math.floor(math.log2(room))))) if dequantize else 0
    cshape = v.cshape if n > 1 else ()
    mul = (sgn * (1 << k)).astype(np.int32)
    y = t
    if np.any(mul != 1):
        mul_c = mul.reshape(cshape) if np.any(mul != mul[0]) else mul[:1].reshape(())
        y = b.op("Mul", [t, b.const(f"{name}_mul", mul_c)], f"{name}_acc")
    badd = np.floor(bcode * (1 << k) + 0.5).astype(np.int32)
    out_scale = mag / (1 << k)
    if not dequantize:
        b.nodes.append(helper.make_node("Add", [y, b.const(f"{name}_bias", badd.reshape(cshape))], [out_name],
                                        name=b.fresh(f"{name}_codes")))
        return OutputInfo(out_name, mag, v.axis, TensorProto.INT32, accumulator=True)
    y = b.op("Add", [y, b.const(f"{name}_bias", badd.reshape(cshape))], f"{name}_codes")
    if n > 1 and not np.all(out_scale == out_scale[0]):
        s = b.const(f"{name}_scale", out_scale.astype(np.float32))
        zp = b.const(f"{name}_zp", np.zeros(n, np.int32))
        dq_attrs = {"axis": v.axis}
    else:
        s = b.const(f"{name}_scale", np.array(out_scale[0], np.float32))
        zp = b.const(f"{name}_zp", np.array(0, np.int32))
        dq_attrs = {}
    b.nodes.append(helper.make_node("DequantizeLinear", [y, s, zp], [out_name], name=b.fresh(f"{name}_dequantize"),
                                    **dq_attrs))
    return OutputInfo(out_name, mag, v.axis, TensorProto.FLOAT, accumulator=True)


def _cshape(v: Acc, per_channel: np.ndarray) -> tuple:
    return v.cshape if per_channel.size > 1 else ()
