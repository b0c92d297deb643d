"""Ops that move, select or repeat values without changing them: MaxPool, Flatten, Reshape, Squeeze, Unsqueeze,
Transpose, Identity, Dropout (inference), Slice, Split, Gather, Tile, Expand, DepthToSpace, SpaceToDepth, Resize in
nearest mode (linear: resize.py), and Pad with zeros. On codes the same op on the codes (the grid is kept: max pooling is monotone, Pad
writes the code of 0, the rest only move elements), on a table the op on its codes; on float the op itself; on an
accumulator whose scale and bias are one number (or a Transpose, which moves its channel axis) the op on each term.
Side inputs are constants or Plain int64 tensors (shape arithmetic), copied as they are."""

from __future__ import annotations

from dataclasses import replace
from typing import TYPE_CHECKING

import numpy as np
import onnx

from onnxqat.fusion.graph import NoIntegerForm, attrs, node_label
from onnxqat.fusion.ops.resize import lower_linear_resize
from onnxqat.fusion.ops.unary import moved_table
from onnxqat.fusion.values import Acc, Codes, Float, Plain, Pooled, Table

if TYPE_CHECKING:
    from onnxqat.fusion.lowering import Lowerer

GRID_KEEPING_OPS = ("Flatten", "Reshape", "Squeeze", "Unsqueeze", "Identity", "Transpose", "Dropout", "MaxPool",
                    "Slice", "Split", "Gather", "Tile", "Expand", "DepthToSpace", "SpaceToDepth", "Resize", "Pad")
_SHAPE_ONLY = ("Flatten", "Reshape", "Squeeze", "Unsqueeze", "Identity", "Dropout")  # no element changes place


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


def _check(low: Lowerer, node: onnx.NodeProto, v) -> None:
    op, a = node.op_type, attrs(node)
    if op == "MaxPool" and len([o for o in node.output if o]) > 1:
        raise NoIntegerForm(f"{node_label(node)}: MaxPool with an Indices output", "MaxPool with Indices")
    if op == "Resize" and a.get("mode", "nearest") != "nearest":
        raise NoIntegerForm(f"{node_label(node)}: Resize in {a.get('mode')} mode (new values between codes)",
                            f"Resize {a.get('mode')}")
    if op == "Pad":
        if a.get("mode", "constant") != "constant":
            return  # edge / reflect copy existing values
        value = float(low.g.consts[node.input[2]].reshape(-1)[0]) if len(node.input) > 2 and node.input[2] else 0.0
        if value != 0.0:
            raise NoIntegerForm(f"{node_label(node)}: Pad with {value:g} (not 0)", "Pad with a non-zero value")
    if op == "MaxPool" and isinstance(v, Table):
        raise NoIntegerForm(f"{node_label(node)}: MaxPool of a table (not monotone in the codes)", "MaxPool of a table")


def lower_movement(low: Lowerer, node: onnx.NodeProto) -> None:
    v = low.get(node.input[0], node)
    op = node.op_type
    if (op == "Resize" and attrs(node).get("mode", "nearest") == "linear" and isinstance(v, Codes)
            and not low.fmt.float_arithmetic):
        return lower_linear_resize(low, node, v)
    _check(low, node, v)
    if isinstance(v, Pooled) and not v.flat and op == "Flatten" and attrs(node).get("axis", 1) == 1:
        low.val[node.output[0]] = Pooled(v.codes, v.axes, v.count, True)
        return
    outs = [o for o in node.output if o][:1] if op == "Dropout" else [o for o in node.output if o]  # (no mask)
    a = {} if op == "Dropout" else attrs(node)
    extra = [] if op == "Dropout" else side_inputs(low, node)
    op = "Identity" if op == "Dropout" else op
    if isinstance(v, Codes):
        if op == "Pad":  # zeros are the code of 0
            extra = extra[:1] + [low.b.const(f"{outs[0]}_pad_zp", np.array(v.zp, np.uint8))] + extra[2:]
        names = _emit(low, op, v.name, extra, outs, a, codes=True)
        for o, n in zip(outs, names):
            low.val[o] = replace(v, name=n)  # same grid, same values
    elif isinstance(v, Table):
        if op == "Pad":
            raise NoIntegerForm(f"{node_label(node)}: Pad of a table", "Pad of a table")
        moved_table(v, v.codes.name, node)  # refuses moves that change an element's channel
        for o, n in zip(outs, _emit(low, op, v.codes.name, extra, outs, a, codes=True)):
            low.val[o] = moved_table(v, n)
    elif isinstance(v, Float):
        for o, n in zip(outs, _emit(low, op, v.name, extra, outs, a, codes=False)):
            low.val[o] = Float(n, v.grid)
    elif isinstance(v, Acc) and len(outs) == 1 and (_uniform(v) and op in _SHAPE_ONLY + ("Transpose",)
                                                    or op == "Transpose"):
        low.val[outs[0]] = _moved_acc(low, node, v, extra, a)
    else:
        raise NoIntegerForm(f"{node_label(node)}: its input is an integer accumulator (no activation quantizer "
                            "before it)", "input not quantized")


def _emit(low: Lowerer, op: str, x: str, extra: list[str], outs: list[str], a: dict, codes: bool) -> list[str]:
    if len(outs) > 1:  # Split
        return low.b.node(op, [x] + extra, outs[0], n_out=len(outs), **a)
    if codes:
        return [low.fmt.codes_op(low, op, [x] + extra, outs[0], a)]
    return [low.b.op(op, [x] + extra, outs[0], **a)]


def _uniform(v: Acc) -> bool:
    """One scale per term and one bias: the accumulator's real value does not depend on the channel."""
    return all(np.all(t[1] == t[1].reshape(-1)[0]) for t in v.terms) and np.all(v.bias == v.bias.reshape(-1)[0]) \
        and not np.isfinite(v.clip).any()


def _moved_acc(low: Lowerer, node: onnx.NodeProto, v: Acc, extra: list[str], a: dict) -> Acc:
    """The op on each term; a Transpose moves the per-channel vectors' axis with it."""
    b = low.b
    terms = []
    for k, (t, sc, bd) in enumerate(v.terms):
        moved = b.op("Identity" if node.op_type == "Dropout" else node.op_type, [t] + extra,
                     f"{node.output[0]}_t{k}", **a)
        low.fmt.moved_term(t, moved)
        terms.append((moved, sc, bd))
    if _uniform(v):
        return Acc([(t, sc.reshape(-1)[:1], bd) for t, sc, bd in terms], v.bias.reshape(-1)[:1], (), 1)
    perm = list(a.get("perm", []))
    rank = len(v.cshape)
    if not perm or rank < 2:
        raise NoIntegerForm(f"{node_label(node)}: Transpose of a per-channel accumulator of unknown rank",
                            "input not quantized")
    axis = v.axis % rank
    new_axis = perm.index(axis)
    cshape = tuple(v.cshape[axis] if k == new_axis else 1 for k in range(rank))
    return Acc(terms, v.bias, cshape, new_axis, v.clip)


HANDLERS = {op: lower_movement for op in GRID_KEEPING_OPS}
