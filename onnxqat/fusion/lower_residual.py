"""A residual Add: one accumulator of the branches' terms (each branch keeps its own scales), requantized once by the
quantizer that follows; a constant Add on an accumulator goes into its bias. QDQ format (or a float branch): float
Add."""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np
import onnx

from onnxqat.errors import FuseError
from onnxqat.fusion.float_islands import to_float
from onnxqat.fusion.graph import node_label
from onnxqat.fusion.lower_pooling import acc_of_pooled
from onnxqat.fusion.values import Acc, Codes, Float, Pooled, as_vector

if TYPE_CHECKING:
    from onnxqat.fusion.lower import Lowerer


def lower_add(low: Lowerer, node: onnx.NodeProto) -> None:
    g = low.g
    ins = list(node.input)
    consts = [i for i in ins if i in g.consts]
    if len(consts) == 1:
        v = low.get([i for i in ins if i not in g.consts][0], node)
        if isinstance(v, Acc):
            c = as_vector(g.consts[consts[0]])
            low.val[node.output[0]] = Acc(v.terms, v.bias + c, v.cshape, v.axis)
            return
        raise FuseError(f"{node_label(node)}: adding a constant to quantized codes is not supported")
    vals = [low.get(i, node) for i in ins]
    vals = [acc_of_pooled(low.b, v, f"{node.output[0]}_{k}") if isinstance(v, Pooled) else v for k, v in enumerate(vals)]
    if low.format == "qdq" or any(isinstance(v, Float) for v in vals):
        fl = [to_float(low, v) for v in vals]
        low.val[node.output[0]] = Float(low.b.op("Add", fl, node.output[0]))
        return
    terms, bias, cshape, axis = [], np.zeros(1), (1,), 1
    for v in vals:
        if isinstance(v, Codes):
            terms.append(v.term())
            bias = bias + v.offset()
        else:
            if np.isfinite(v.clip).any():
                raise FuseError(f"{node_label(node)}: a Relu/Clip inside a residual branch without an activation "
                                "quantizer has no integer form")
            terms += v.terms
            if len(v.cshape) > len(cshape) or np.prod(v.cshape) > np.prod(cshape):
                cshape, axis = v.cshape, v.axis
            bias = bias + v.bias
    low.val[node.output[0]] = Acc(terms, np.asarray(bias, np.float64), cshape, axis)
