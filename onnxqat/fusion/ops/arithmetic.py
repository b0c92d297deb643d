"""Add / Sub / Mul / Div.

- a scalar constant Mul/Div/Add/Sub of codes (the input normalisation x*255/128 - 127/128): a new scale and zero
  point, no op (ConvInteger pads with the zero point, as the float model pads the normalised image with 0);
- a constant Add on an accumulator: into its bias;
- a residual Add of two values: one accumulator of the branches' terms (each branch keeps its own scales), requantized
  once by the quantizer that follows; in the QDQ format (or with a float branch) a float Add.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np
import onnx

from onnxqat.fusion.convert import acc_of_pooled, to_float
from onnxqat.fusion.graph import NoIntegerForm, node_label
from onnxqat.fusion.ops.unary import applied, product_table, same_codes, table_of_codes
from onnxqat.fusion.values import Acc, Codes, CodesProduct, Float, Plain, Pooled, Table, as_vector

if TYPE_CHECKING:
    from onnxqat.fusion.lowering import Lowerer


def lower_arithmetic(low: Lowerer, node: onnx.NodeProto) -> None:
    g, op = low.g, node.op_type
    consts = [i for i in node.input if i in g.consts]
    if len(node.input) == 2 and len(consts) == 1:
        v = low.get([i for i in node.input if i not in g.consts][0], node)
        if isinstance(v, Table) or (isinstance(v, Codes) and not low.fmt.float_arithmetic
                                     and not _scales_codes(low, node, v)):
            return table_of_constant_op(low, node, v)
        if isinstance(v, Codes):
            return constant_on_codes(low, node, v)
        if op == "Add" and isinstance(v, Acc):
            low.val[node.output[0]] = Acc(v.terms, v.bias + as_vector(g.consts[consts[0]]), v.cshape, v.axis)
            return
    elif op == "Add" and len(node.input) == 2 and not consts:
        return residual_add(low, node)
    elif op == "Mul" and len(node.input) == 2 and not consts and not low.fmt.float_arithmetic:
        return product(low, node)
    raise NoIntegerForm(f"{node_label(node)}: no integer form for {op} of these inputs", f"{op} of these inputs")


def _scales_codes(low: Lowerer, node: onnx.NodeProto, v: Codes) -> bool:
    """Whether a scalar constant op keeps the codes codes: a positive Mul/Div, or an Add/Sub of whole codes."""
    c = low.g.consts[[i for i in node.input if i in low.g.consts][0]]
    if c.size != 1:
        return False
    c = float(c.reshape(-1)[0])
    if node.op_type in ("Mul", "Div"):
        return c > 0
    if node.op_type == "Sub" and node.input[0] in low.g.consts:
        return False
    zp = v.zp + (c / v.scale if node.op_type == "Sub" else -c / v.scale)
    return abs(zp - round(zp)) <= 1e-3 and 0 <= round(zp) <= 255


def table_of_constant_op(low: Lowerer, node: onnx.NodeProto, v) -> None:
    """x op c for a constant c that does not map codes to codes (a per-channel mean, an offset that is no whole code):
    f(x) of the codes as a table, where c is one value."""
    if node.input[0] in low.g.consts:
        raise NoIntegerForm(f"{node_label(node)}: constant {node.op_type} codes", f"constant {node.op_type} codes")
    t = v if isinstance(v, Table) else table_of_codes(v)
    low.val[node.output[0]] = applied(low, node, t)


def product(low: Lowerer, node: onnx.NodeProto) -> None:
    """Mul of two activations: of the same codes (x * Sigmoid(x)), a table; of two codes (squeeze-excitation
    gating with a quantized gate), as the format writes it (the int32 product (u1 - z1)(u2 - z2) with scale s1 s2,
    requantized by the quantizer after it, or a kernel that does both)."""
    a, b_ = (low.get(i, node) for i in node.input)
    if isinstance(a, (Codes, Table)) and isinstance(b_, (Codes, Table)) and same_codes(a, b_):
        low.val[node.output[0]] = product_table(a, b_)
        return
    if not (isinstance(a, Codes) and isinstance(b_, Codes)):
        raise NoIntegerForm(f"{node_label(node)}: Mul of these inputs (not two quantized tensors)", "Mul of these inputs")
    low.val[node.output[0]] = low.fmt.product(low, CodesProduct(a, b_, node.output[0]))


def activation_matmul(low: Lowerer, node: onnx.NodeProto) -> None:
    """MatMul of two quantized activations (attention's Q K^T and P V): MatMulInteger of the codes with their zero
    points, the exact int32 sum of (u1 - z1)(u2 - z2) with scale s1 s2, requantized by the quantizer after it."""
    a, b_ = (low.get(i, node) for i in node.input)
    if not (isinstance(a, Codes) and isinstance(b_, Codes)):
        raise NoIntegerForm(f"{node_label(node)}: MatMul of activations needs a quantizer on both inputs "
                            "(recipe key activations.integer_export)", "MatMul of unquantized activations")
    b = low.b
    base = node.output[0]
    zps = [b.const(f"{base}_zp{k}", np.array(c.zp, onnx.helper.tensor_dtype_to_np_dtype(c.dtype)))
           for k, c in enumerate((a, b_))]
    acc = b.op("MatMulInteger", [a.name, b_.name, zps[0], zps[1]], f"{base}_acc")
    shape = low.g.shape_of(node.input[0]) or [None]
    k = shape[-1] if shape and shape[-1] else 1 << 16  # the summed dimension (unknown: a generous bound)
    low.val[node.output[0]] = Acc([(acc, np.array([a.scale * b_.scale]), k * a.bound * b_.bound)], np.zeros(1), (), -1)


def constant_on_codes(low: Lowerer, node: onnx.NodeProto, v: Codes) -> None:
    """A scalar Mul/Div/Add/Sub of codes: a new scale and zero point, no op."""
    g, op = low.g, node.op_type
    ci = [i for i in node.input if i in g.consts]
    c = g.consts[ci[0]]
    if c.size != 1:
        raise NoIntegerForm(f"{node_label(node)}: only a scalar constant {op} of codes changes scale or zero point",
                            f"per-channel {op} of codes")
    c = float(c.reshape(-1)[0])
    scale, zp = v.scale, float(v.zp)
    if op in ("Mul", "Div"):
        f = c if op == "Mul" else 1.0 / c
        if not f > 0:
            raise NoIntegerForm(f"{node_label(node)}: {op} by {c:g} (only a positive factor keeps the codes)",
                                f"{op} by a negative constant")
        scale *= f
    elif op == "Sub" and node.input[1] == ci[0]:
        zp += c / scale
    elif op == "Add":
        zp -= c / scale
    else:
        raise NoIntegerForm(f"{node_label(node)}: constant minus codes", "constant minus codes")
    if abs(zp - round(zp)) > 1e-3 or not 0 <= round(zp) <= 255:
        raise NoIntegerForm(f"{node_label(node)}: the offset {op} {c:g} is not a whole number of codes "
                            f"(zero point {zp:g}, step {scale:g})", "offset not a whole number of codes")
    low.val[node.output[0]] = Codes(v.name, scale, v.r, v.dtype, int(round(zp)))


def residual_add(low: Lowerer, node: onnx.NodeProto) -> None:
    vals = [low.get(i, node) for i in node.input]
    vals = [acc_of_pooled(low.b, v, f"{node.output[0]}_{k}") if isinstance(v, Pooled) else v
            for k, v in enumerate(vals)]
    if low.fmt.float_arithmetic or any(isinstance(v, (Float, Plain, Table)) for v in vals):
        fl = [to_float(low, v) for v in vals]
        low.val[node.output[0]] = Float(low.b.op("Add", fl, node.output[0]))
        return
    if not all(isinstance(v, (Acc, Codes)) for v in vals):  # a constant tensor, a table ...: float
        raise NoIntegerForm(f"{node_label(node)}: Add of these inputs", "Add of these inputs")
    terms, bias, cshape, axis = [], np.zeros(1), (1,), 1
    for v in vals:
        if isinstance(v, Codes):
            terms.append(v.term())
            bias = bias + v.offset()
        else:
            if np.isfinite(v.clip).any():
                raise NoIntegerForm(f"{node_label(node)}: a Relu/Clip inside a residual branch without an activation "
                                    "quantizer", "Relu/Clip in a residual branch without a quantizer")
            terms += v.terms
            if len(v.cshape) > len(cshape) or np.prod(v.cshape) > np.prod(cshape):
                cshape, axis = v.cshape, v.axis
            bias = bias + v.bias
    sources = tuple(vals) if all(isinstance(v, Codes) for v in vals) else ()
    low.val[node.output[0]] = Acc(terms, np.asarray(bias, np.float64), cshape, axis, sources=sources)


HANDLERS = {op: lower_arithmetic for op in ("Add", "Sub", "Mul", "Div")}
