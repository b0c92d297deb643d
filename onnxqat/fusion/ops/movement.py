"""Ops that move or select values without changing them: MaxPool, Flatten, Reshape, Squeeze, Unsqueeze, Transpose,
Identity, Dropout (inference). On codes the same op on the codes (the quantization grid is kept: max pooling is
monotone, the rest only move elements); on float the op itself. Their shape inputs are constants or Plain int64
tensors (a Shape -> Gather -> Concat chain), copied as they are."""

from __future__ import annotations

from dataclasses import replace

from typing import TYPE_CHECKING

import onnx

from onnxqat.fusion.graph import NoIntegerForm, attrs, node_label
from onnxqat.fusion.ops.unary import moved_table
from onnxqat.fusion.values import Codes, Float, Plain, Pooled, Table

if TYPE_CHECKING:
    from onnxqat.fusion.lowering import Lowerer

GRID_KEEPING_OPS = ("Flatten", "Reshape", "Squeeze", "Unsqueeze", "Identity", "Transpose", "Dropout", "MaxPool")


def side_inputs(low: Lowerer, node: onnx.NodeProto) -> list[str]:
    """The node's inputs after the first: constants (copied) and Plain tensors (shape arithmetic)."""
    out = []
    for i in node.input[1:]:
        if not i:
            out.append("")
        elif i in low.g.consts:
            out.append(low.b.const(i, low.g.consts[i]))
        else:
            v = low.get(i, node)
            if not isinstance(v, Plain):
                raise NoIntegerForm(f"{node_label(node)}: input '{i}' is not a constant or a shape",
                                    "data-dependent side input")
            out.append(v.name)
    return out


def lower_movement(low: Lowerer, node: onnx.NodeProto) -> None:
    v = low.get(node.input[0], node)
    if node.op_type == "MaxPool" and len([o for o in node.output if o]) > 1:
        raise NoIntegerForm(f"{node_label(node)}: MaxPool with an Indices output", "MaxPool with Indices")
    if isinstance(v, Pooled) and not v.flat and node.op_type == "Flatten" and attrs(node).get("axis", 1) == 1:
        low.val[node.output[0]] = Pooled(v.codes, v.axes, v.count, True)
        return
    if isinstance(v, Table) and node.op_type != "MaxPool":  # move the codes; the table stays
        out = low.fmt.codes_op(low, node.op_type if node.op_type != "Dropout" else "Identity",
                               [v.codes.name] + (side_inputs(low, node) if node.op_type != "Dropout" else []),
                               node.output[0], attrs(node) if node.op_type != "Dropout" else {})
        low.val[node.output[0]] = moved_table(v, out)
        return
    if not isinstance(v, (Codes, Float)):
        raise NoIntegerForm(f"{node_label(node)}: its input is an integer accumulator (no activation quantizer "
                            "before it)", "input not quantized")
    if node.op_type == "Dropout":
        op, extra, a = "Identity", [], {}
    else:
        op, extra, a = node.op_type, side_inputs(low, node), attrs(node)
    if isinstance(v, Codes):
        out = low.fmt.codes_op(low, op, [v.name] + extra, node.output[0], a)
        low.val[node.output[0]] = replace(v, name=out)  # same grid, same values
    else:
        low.val[node.output[0]] = Float(low.b.op(op, [v.name] + extra, node.output[0], **a), v.grid)


HANDLERS = {op: lower_movement for op in GRID_KEEPING_OPS}
