"""Relu / Clip: on codes a uint8 Clip at whole codes (or nothing when every code is inside); on an accumulator folded
into the next quantizer (its code bounds shrink: round(min(v, 6)/s) = min(round(v/s), round(6/s))); on float the op
itself."""

from __future__ import annotations

from dataclasses import replace

import math
from typing import TYPE_CHECKING

import numpy as np
import onnx

from onnxqat.fusion.convert import acc_of_pooled
from onnxqat.fusion.graph import NoIntegerForm, attrs, node_label
from onnxqat.fusion.ops.unary import lower_unary
from onnxqat.fusion.values import Acc, Codes, Float, Pending, Pooled, Table

if TYPE_CHECKING:
    from onnxqat.fusion.lowering import Lowerer


def clip_range(low: Lowerer, node: onnx.NodeProto) -> tuple[float, float]:
    g = low.g
    if node.op_type == "Relu":
        return 0.0, np.inf
    a = attrs(node)
    lo = float(g.const(node.input[1], node, "min").reshape(-1)[0]) if len(node.input) > 1 and node.input[1] \
        else float(a.get("min", -np.inf))
    hi = float(g.const(node.input[2], node, "max").reshape(-1)[0]) if len(node.input) > 2 and node.input[2] \
        else float(a.get("max", np.inf))
    return lo, hi


def lower_clip(low: Lowerer, node: onnx.NodeProto) -> None:
    g, b = low.g, low.b
    v = low.get(node.input[0], node, raw=True)
    if isinstance(v, Pending):  # folded into the quantizer that follows, like on an accumulator
        lo, hi = clip_range(low, node)
        low.val[node.output[0]] = Pending(v.layer, (max(v.clip[0], lo), min(v.clip[1], hi)))
        return
    if isinstance(v, Pooled):
        v = acc_of_pooled(b, v, node.output[0])
    if isinstance(v, Float):
        low.val[node.output[0]] = Float(b.op(node.op_type, [v.name] + [b.const(i, g.consts[i]) if i else ""
                                                                      for i in node.input[1:]], node.output[0],
                                             **attrs(node)))
        return
    lo, hi = clip_range(low, node)
    if isinstance(v, Acc):
        low.val[node.output[0]] = replace(v, clip=(max(v.clip[0], lo), min(v.clip[1], hi)))  # keeps its sources
        return
    if isinstance(v, Table):
        return lower_unary(low, node)
    if not isinstance(v, Codes):
        raise NoIntegerForm(f"{node_label(node)}: {node.op_type} of this input", f"{node.op_type} of this input")
    if lo <= -v.scale * v.zp and hi >= v.scale * (v.r - v.zp):
        low.val[node.output[0]] = v  # every code is inside already
        return
    lo_u = max(0, math.ceil(lo / v.scale - 1e-9) + v.zp) if np.isfinite(lo) else 0
    hi_u = min(v.r, math.floor(hi / v.scale + 1e-9) + v.zp) if np.isfinite(hi) else v.r
    exact = all(not np.isfinite(t) or abs(t / v.scale - round(t / v.scale)) < 1e-6 for t in (lo, hi))
    if not exact:  # off the grid (a ReLU6 whose 6 is no whole code): a table of the codes
        return lower_unary(low, node)
    y = b.op("Clip", [v.name, b.const(f"{node.output[0]}_lo", np.array(lo_u, np.uint8)),
                      b.const(f"{node.output[0]}_hi", np.array(hi_u, np.uint8))], node.output[0])
    low.val[node.output[0]] = replace(v, name=y)


HANDLERS = {"Relu": lower_clip, "Clip": lower_clip}
