"""Concat of codes on one grid: the same op on the codes."""

from __future__ import annotations

from typing import TYPE_CHECKING

import onnx

from onnxqat.fusion.graph import NoIntegerForm, attrs, node_label
from onnxqat.fusion.values import Codes

if TYPE_CHECKING:
    from onnxqat.fusion.lowering import Lowerer


def lower_concat(low: Lowerer, node: onnx.NodeProto) -> None:
    vals = [low.get(i, node) for i in node.input]
    if all(isinstance(v, Codes) for v in vals) and len({(v.scale, v.dtype, v.zp) for v in vals}) == 1:
        out = low.b.op("Concat", [v.name for v in vals], node.output[0], **attrs(node))
        low.val[node.output[0]] = Codes(out, vals[0].scale, max(v.r for v in vals), vals[0].dtype, vals[0].zp)
        return
    raise NoIntegerForm(f"{node_label(node)}: Concat of inputs with different quantization scales",
                        "Concat of different scales")


HANDLERS = {"Concat": lower_concat}
