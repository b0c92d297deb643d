"""Concat of codes: on one grid the same op on the codes; on several grids (each input its own quantizer) a Joined
value, which the quantizer after it writes as a requantization of each part to its own grid, then the Concat of
the parts' codes: exact (the quantizer rounds each element on its own, wherever the Concat puts it); anything else
reads it as the Concat of the parts' float values."""

from __future__ import annotations

from dataclasses import replace
from typing import TYPE_CHECKING

import onnx

from onnxqat.fusion.graph import NoIntegerForm, attrs, node_label
from onnxqat.fusion.convert import to_float
from onnxqat.fusion.values import Codes, Float, Joined

if TYPE_CHECKING:
    from onnxqat.fusion.lowering import Lowerer


def lower_concat(low: Lowerer, node: onnx.NodeProto) -> None:
    vals = [low.get(i, node) for i in node.input]
    if all(isinstance(v, Codes) for v in vals) and len({(v.scale, v.dtype, v.zp) for v in vals}) == 1:
        out = low.b.op("Concat", [v.name for v in vals], node.output[0], **attrs(node))
        values = vals[0].values if all(v.values is vals[0].values for v in vals) else None
        low.val[node.output[0]] = replace(vals[0], name=out, r=max(v.r for v in vals), values=values)
        return
    if all(isinstance(v, Codes) for v in vals) and not low.fmt.float_arithmetic:
        low.val[node.output[0]] = Joined(vals, int(attrs(node).get("axis", 0)))
        return
    if low.fmt.float_arithmetic and all(isinstance(v, (Float, Codes)) for v in vals):  # QDQ: the float op
        ins = [v.name if isinstance(v, Float) else to_float(low, v) for v in vals]
        low.val[node.output[0]] = Float(low.b.op("Concat", ins, node.output[0], **attrs(node)))
        return
    raise NoIntegerForm(f"{node_label(node)}: Concat of these inputs", "Concat of these inputs")


def requantized_concat(low: Lowerer, v: Joined, s_out: float, r: int, name: str, zp: int) -> Codes:
    """Each part requantized to the quantizer's grid, then concatenated."""
    parts = [low.fmt.requantize(low, c, s_out, r, f"{name}_part{k}", zp) for k, c in enumerate(v.parts)]
    out = low.b.op("Concat", [p.name for p in parts], f"{name}_concat", axis=v.axis)
    return replace(parts[0], name=out)


HANDLERS = {"Concat": lower_concat}
