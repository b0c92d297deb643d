"""GlobalAveragePool / ReduceMean over all spatial axes: the mean of codes = (sum of codes) * scale / count.

The mean is kept as a Pooled value: a quantizer after it rescales an int32 ReduceSum (convert.acc_of_pooled); a
Gemm/MatMul after it (through Flatten) runs first as a 1x1 ConvInteger on the codes (formats/integer.py). On a float
value (QDQ format, float islands) the pooling is the float op.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np
import onnx

from onnxqat.fusion.graph import NoIntegerForm, attrs, node_label
from onnxqat.fusion.values import Codes, Float, Pooled

if TYPE_CHECKING:
    from onnxqat.fusion.lowering import Lowerer


def lower_global_pool(low: Lowerer, node: onnx.NodeProto) -> None:
    v = low.get(node.input[0], node)
    if isinstance(v, Float):
        extra = [low.b.const(i, low.g.consts[i]) for i in node.input[1:] if i]
        low.val[node.output[0]] = Float(low.b.op(node.op_type, [v.name] + extra, node.output[0], **attrs(node)))
        return
    if not isinstance(v, Codes):
        raise NoIntegerForm(f"{node_label(node)}: mean of an unquantized value", "mean of an unquantized value")
    dims = low.g.shape_of(node.input[0])
    a = attrs(node)
    if node.op_type == "GlobalAveragePool":
        axes = list(range(2, len(dims))) if dims else None
    else:
        axes = list(low.g.consts[node.input[1]] if len(node.input) > 1 else a.get("axes", []))
    if not dims or axes is None or any(dims[i] is None for i in axes):
        raise NoIntegerForm(f"{node_label(node)}: spatial size of '{node.input[0]}' unknown (needs a static shape)",
                            "mean over a dynamic size")
    count = int(np.prod([dims[i] for i in axes]))
    if sorted(ax % len(dims) for ax in axes) != list(range(2, len(dims))):
        raise NoIntegerForm(f"{node_label(node)}: a mean over other axes than all spatial ones",
                            "mean over other axes")
    flat = node.op_type == "ReduceMean" and not a.get("keepdims", 1)  # [N, C]: what Flatten of the mean gives
    low.val[node.output[0]] = Pooled(v, list(range(2, len(dims))), count, flat)


HANDLERS = {"GlobalAveragePool": lower_global_pool, "ReduceMean": lower_global_pool}
