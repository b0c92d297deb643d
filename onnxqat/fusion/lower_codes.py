"""Ops between weighted layers that keep codes codes: Relu/Clip (on codes, or folded into the next quantizer), a scalar
Mul/Div/Add/Sub of codes (the input normalisation: a new scale and zero point), MaxPool and shape ops, Concat."""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

import numpy as np
import onnx

from onnxqat.errors import FuseError
from onnxqat.fusion.graph import attrs, node_label
from onnxqat.fusion.lower_pooling import acc_of_pooled
from onnxqat.fusion.values import Acc, Codes, Float, Pooled

if TYPE_CHECKING:
    from onnxqat.fusion.lower import Lowerer


def lower_clip(low: Lowerer, node: onnx.NodeProto) -> None:
    g, b = low.g, low.b
    v = low.get(node.input[0], node)
    if isinstance(v, Pooled):
        v = acc_of_pooled(b, v, node.output[0])
    if node.op_type == "Relu":
        lo, hi = 0.0, np.inf
    else:
        a = attrs(node)
        lo = float(g.const(node.input[1], node, "min").reshape(-1)[0]) if len(node.input) > 1 and node.input[1] \
            else float(a.get("min", -np.inf))
        hi = float(g.const(node.input[2], node, "max").reshape(-1)[0]) if len(node.input) > 2 and node.input[2] \
            else float(a.get("max", np.inf))
    if isinstance(v, Float):
        low.val[node.output[0]] = Float(b.op(node.op_type, [v.name] + [b.const(i, g.consts[i]) if i else ""
                                                                      for i in node.input[1:]], node.output[0],
                                             **attrs(node)))
        return
    if isinstance(v, Acc):  # folded into the activation quantizer that follows: its code bounds shrink
        low.val[node.output[0]] = Acc(v.terms, v.bias, v.cshape, v.axis, (max(v.clip[0], lo), min(v.clip[1], hi)))
        return
    if lo <= -v.scale * v.zp and hi >= v.scale * (v.r - v.zp):
        low.val[node.output[0]] = v  # every code is inside already
        return
    lo_u = max(0, math.ceil(lo / v.scale - 1e-9) + v.zp) if np.isfinite(lo) else 0
    hi_u = min(v.r, math.floor(hi / v.scale + 1e-9) + v.zp) if np.isfinite(hi) else v.r
    exact = all(not np.isfinite(t) or abs(t / v.scale - round(t / v.scale)) < 1e-6 for t in (lo, hi))
    if not exact:
        raise FuseError(f"{node_label(node)}: clipping quantized codes at {lo:g}..{hi:g}, off their grid "
                        f"(step {v.scale:g})")
    y = b.op("Clip", [v.name, b.const(f"{node.output[0]}_lo", np.array(lo_u, np.uint8)),
                      b.const(f"{node.output[0]}_hi", np.array(hi_u, np.uint8))], node.output[0])
    low.val[node.output[0]] = Codes(y, v.scale, v.r, v.dtype, v.zp)


def lower_affine(low: Lowerer, node: onnx.NodeProto, v: Codes) -> None:
    """A scalar Mul/Div/Add/Sub of codes (the input normalisation): a new scale and zero point, no op."""
    g, op = low.g, node.op_type
    ci = [i for i in node.input if i in g.consts]
    c = g.consts[ci[0]] if ci else None
    if c is None or c.size != 1:
        raise FuseError(f"{node_label(node)}: only a scalar constant {op} of quantized codes has an integer form")
    c = float(c.reshape(-1)[0])
    scale, zp = v.scale, float(v.zp)
    if op in ("Mul", "Div"):
        f = c if op == "Mul" else 1.0 / c
        if not f > 0:
            raise FuseError(f"{node_label(node)}: {op} by {c:g} (only a positive factor keeps the codes)")
        scale *= f
    elif op == "Sub" and node.input[1] == ci[0]:
        zp += c / scale
    elif op == "Add":
        zp -= c / scale
    else:
        raise FuseError(f"{node_label(node)}: constant minus codes has no integer form")
    if abs(zp - round(zp)) > 1e-3 or not 0 <= round(zp) <= 255:
        raise FuseError(f"{node_label(node)}: the offset {op} {c:g} is not a whole number of codes "
                        f"(zero point {zp:g}, step {scale:g})")
    low.val[node.output[0]] = Codes(v.name, scale, v.r, v.dtype, int(round(zp)))


def lower_shape_op(low: Lowerer, node: onnx.NodeProto) -> None:
    """MaxPool, Flatten, Reshape, ... on codes (or float): the same op, the same quantization grid."""
    v = low.get(node.input[0], node)
    b, g = low.b, low.g
    if node.op_type == "MaxPool" and len([o for o in node.output if o]) > 1:
        raise FuseError(f"{node_label(node)}: MaxPool with an Indices output is not supported")
    if isinstance(v, Pooled) and not v.flat and node.op_type == "Flatten" and attrs(node).get("axis", 1) == 1:
        low.val[node.output[0]] = Pooled(v.codes, v.axes, v.count, True)
        return
    if not isinstance(v, (Codes, Float)):
        raise FuseError(f"{node_label(node)}: its input is an integer accumulator (no activation quantizer before it)")
    extra = []
    for i in node.input[1:]:
        if not i:
            extra.append("")
            continue
        if i not in g.consts:
            raise FuseError(f"{node_label(node)}: input '{i}' must be a constant")
        extra.append(b.const(i, g.consts[i]))
    op = "Identity" if node.op_type == "Dropout" else node.op_type
    if op == "Identity":
        extra = []
    out = b.op(op, [v.name] + extra, node.output[0], **({} if node.op_type == "Dropout" else attrs(node)))
    # max pooling and reshaping keep values on the quantization grid
    low.val[node.output[0]] = Codes(out, v.scale, v.r, v.dtype, v.zp) if isinstance(v, Codes) else Float(out, v.grid)


def lower_concat(low: Lowerer, node: onnx.NodeProto) -> None:
    vals = [low.get(i, node) for i in node.input]
    if all(isinstance(v, Codes) for v in vals) and len({(v.scale, v.dtype, v.zp) for v in vals}) == 1:
        out = low.b.op("Concat", [v.name for v in vals], node.output[0], **attrs(node))
        low.val[node.output[0]] = Codes(out, vals[0].scale, max(v.r for v in vals), vals[0].dtype, vals[0].zp)
        return
    raise FuseError(f"{node_label(node)}: Concat of inputs with different quantization scales is not supported")
