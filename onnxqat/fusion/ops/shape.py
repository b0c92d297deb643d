"""Shape: the shape of the codes (or float) tensor that stands for the QAT tensor is the same, so Shape of it is a
Plain int64 tensor; what is computed from shapes (Gather, Unsqueeze, Concat of dims: PyTorch's x.view(x.size(0), -1))
is copied as it is by the walk (lowering.py: nodes whose inputs are all Plain or constant)."""

from __future__ import annotations

from typing import TYPE_CHECKING

import onnx

from onnxqat.fusion.graph import NoIntegerForm, attrs, node_label
from onnxqat.fusion.values import Codes, Float, Plain

if TYPE_CHECKING:
    from onnxqat.fusion.lowering import Lowerer


def lower_shape(low: Lowerer, node: onnx.NodeProto) -> None:
    v = low.get(node.input[0], node)
    if not isinstance(v, (Codes, Float, Plain)):
        raise NoIntegerForm(f"{node_label(node)}: Shape of an accumulator", "Shape of an accumulator")
    low.val[node.output[0]] = Plain(low.b.op("Shape", [v.name], node.output[0], **attrs(node)))


HANDLERS = {"Shape": lower_shape}
