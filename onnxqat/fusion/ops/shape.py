"""Shape: the shape of the codes (or float) tensor that stands for the QAT tensor is the same, so Shape of it is a
Plain int64 tensor; what is computed from shapes (Gather, Unsqueeze, Concat of dims: PyTorch's x.view(x.size(0), -1))
is copied as it is by the walk (lowering.py: nodes whose inputs are all Plain or constant)."""

from __future__ import annotations

from typing import TYPE_CHECKING

import onnx

from onnxqat.fusion.graph import NoIntegerForm, attrs, node_label
from onnxqat.fusion.convert import acc_of_pooled
from onnxqat.fusion.values import Acc, Codes, Float, Plain, Pooled

if TYPE_CHECKING:
    from onnxqat.fusion.lowering import Lowerer


def lower_shape(low: Lowerer, node: onnx.NodeProto) -> None:
    v = low.get(node.input[0], node)
    if isinstance(v, Pooled):  # the mean's shape: the codes' with the pooled axes kept as 1
        v = acc_of_pooled(low.b, v, f"{node.output[0]}_pool")
    if isinstance(v, Acc):
        # every term of an accumulator has the value's shape except broadcast per-tensor sums; the first term of a
        # weighted layer or a residual Add is the full tensor
        name = v.terms[0][0]
    elif isinstance(v, (Codes, Float, Plain)):
        name = v.name
    else:
        raise NoIntegerForm(f"{node_label(node)}: Shape of this input", "Shape of this input")
    low.val[node.output[0]] = Plain(low.b.op("Shape", [name], node.output[0], **attrs(node)))


HANDLERS = {"Shape": lower_shape}
