"""GlobalAveragePool / ReduceMean over all spatial axes: the mean of codes = (sum of codes) * scale / count.

The mean is kept as a Pooled value: a quantizer after it rescales an int32 ReduceSum (acc_of_pooled); a Gemm/MatMul
after it (through Flatten) runs first as a 1x1 ConvInteger on the codes (lower_integer.py). In the QDQ format the
pooling is the float op.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np
import onnx
from onnx import TensorProto

from onnxqat.errors import FuseError
from onnxqat.fusion.builder import GraphBuilder
from onnxqat.fusion.graph import attrs, node_label
from onnxqat.fusion.values import Acc, Codes, Float, Pooled

if TYPE_CHECKING:
    from onnxqat.fusion.lower import Lowerer


def lower_global_pool(low: Lowerer, node: onnx.NodeProto) -> None:
    """Average of codes = (sum of codes) * scale / count: an int32 ReduceSum, rescaled by the next quantizer."""
    v: Codes = low.val[node.input[0]]
    dims = low.shape_of(node.input[0])
    a = attrs(node)
    if node.op_type == "GlobalAveragePool":
        axes = list(range(2, len(dims))) if dims else None
    else:
        axes = list(low.g.consts[node.input[1]] if len(node.input) > 1 else a.get("axes", []))
    if not dims or axes is None or any(dims[i] is None for i in axes):
        raise FuseError(f"{node_label(node)}: spatial size of '{node.input[0]}' unknown (needs a static shape)")
    if node.op_type == "ReduceMean" and not a.get("keepdims", 1):
        raise FuseError(f"{node_label(node)}: ReduceMean with keepdims=0 is not supported")
    count = int(np.prod([dims[i] for i in axes]))
    if sorted(ax % len(dims) for ax in axes) != list(range(2, len(dims))):
        raise FuseError(f"{node_label(node)}: only the mean over all spatial axes is supported")
    low.val[node.output[0]] = Pooled(v, list(range(2, len(dims))), count)


def lower_float_pool(low: Lowerer, node: onnx.NodeProto) -> None:
    """QDQ format: the float op on the dequantized tensor."""
    extra = [low.b.const(i, low.g.consts[i]) for i in node.input[1:] if i]
    low.val[node.output[0]] = Float(low.b.op(node.op_type, [low.val[node.input[0]].name] + extra, node.output[0],
                                             **attrs(node)))


def acc_of_pooled(b: GraphBuilder, p: Pooled, base: str) -> Acc:
    """The pooled mean as an accumulator: the int32 sum of the codes with scale / count."""
    v = p.codes
    x32 = b.cast(v.name, TensorProto.INT32, f"{base}_i32")
    ssum = b.op("ReduceSum", [x32, b.const(f"{base}_axes", np.array(p.axes, np.int64))], f"{base}_sum",
                keepdims=0 if p.flat else 1)
    s = v.scale / p.count
    return Acc([(ssum, np.array([s]), v.bound * p.count)], np.array([-s * v.zp * p.count]), (), 1)
