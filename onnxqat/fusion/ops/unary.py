"""Elementwise functions of codes as lookup tables.

An elementwise op f (Sigmoid, HardSigmoid, HardSwish, Tanh, Erf, Exp, LeakyRelu, Softplus, PRelu with one slope ...)
of codes of at most 8 bits takes at most 256 values: f of each code's float32 value, computed once here by
onnxruntime running the very node on those values (so rounding and approximations are the fake-quantized model's),
is a Table. The next activation quantizer turns the table into its codes: one Gather, integer-only and bit-exact;
x * f(x) of the same codes (SiLU, HardSwish written as ops) is a table too; anything else reads the float values
through one Gather (the same floats the fake-quantized model has there). QDQ keeps the float op.
"""

from __future__ import annotations

from dataclasses import replace
from typing import TYPE_CHECKING

import numpy as np
import onnx
from onnx import TensorProto, helper

from onnxqat.fusion.graph import FUSED_OPSET, NoIntegerForm, node_label
from onnxqat.fusion.values import Codes, Table

if TYPE_CHECKING:
    from onnxqat.fusion.lowering import Lowerer

ELEMENTWISE = ("Sigmoid", "HardSigmoid", "HardSwish", "Tanh", "Erf", "Exp", "Log", "Sqrt", "Reciprocal", "Abs", "Neg",
               "LeakyRelu", "Softplus", "Softsign", "Elu", "Selu", "Celu", "Gelu", "Mish", "ThresholdedRelu", "PRelu",
               "Sin", "Cos", "Floor", "Ceil", "Round", "Sign", "Relu", "Clip")


def lower_unary(low: Lowerer, node: onnx.NodeProto) -> None:
    v = low.get(node.input[0], node)
    if low.fmt.float_arithmetic:
        raise NoIntegerForm(f"{node_label(node)}: float op (QDQ)", "float op")
    if isinstance(v, Codes):
        codes, x = v, v.real_values()
    elif isinstance(v, Table):
        codes, x = v.codes, v.values
    else:
        raise NoIntegerForm(f"{node_label(node)}: {node.op_type} of an unquantized value (no quantizer before it)",
                            "input not quantized")
    if codes.r > 255:
        raise NoIntegerForm(f"{node_label(node)}: a table of {codes.r + 1} codes", "codes wider than 8 bits")
    low.val[node.output[0]] = Table(codes, apply_node(low, node, x))


def apply_node(low: Lowerer, node: onnx.NodeProto, x: np.ndarray) -> np.ndarray:
    """The node on a float32 vector, by onnxruntime (its other inputs: constants of the QAT graph; a per-channel
    PRelu slope has no single table and is refused)."""
    import onnxruntime as ort

    g = low.g
    extra = []
    for i in node.input[1:]:
        if i and i not in g.consts:
            raise NoIntegerForm(f"{node_label(node)}: input '{i}' is not a constant", "data-dependent side input")
        if i and g.consts[i].size != 1:
            raise NoIntegerForm(f"{node_label(node)}: per-channel parameter '{i}'", "per-channel parameter")
        extra.append(i)
    inits = [onnx.numpy_helper.from_array(g.consts[i].reshape(()) if node.op_type != "PRelu"
                                          else g.consts[i].reshape(1), i) for i in extra if i]
    n = helper.make_node(node.op_type, ["x"] + list(node.input[1:]), ["y"], domain=node.domain,
                         **{a.name: helper.get_attribute_value(a) for a in node.attribute})
    m = helper.make_model(helper.make_graph([n], "table", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [None])],
                                            [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)], inits),
                          opset_imports=[helper.make_opsetid("", FUSED_OPSET)], ir_version=10)
    so = ort.SessionOptions()
    so.log_severity_level = 3
    try:
        sess = ort.InferenceSession(m.SerializeToString(), so, providers=["CPUExecutionProvider"])
        return np.asarray(sess.run(None, {"x": np.asarray(x, np.float32)})[0], np.float32)
    except Exception as exc:
        raise NoIntegerForm(f"{node_label(node)}: no table ({str(exc).splitlines()[0][:80]})", "no table") from None


def same_codes(a, b) -> bool:
    ca = a.codes if isinstance(a, Table) else a
    cb = b.codes if isinstance(b, Table) else b
    return isinstance(ca, Codes) and isinstance(cb, Codes) and ca.name == cb.name and ca.scale == cb.scale \
        and ca.zp == cb.zp and ca.r == cb.r


def table_of(v) -> np.ndarray:
    return v.values if isinstance(v, Table) else v.real_values()


def product_table(a, b) -> Table:
    """a * b of two functions of the same codes (x * Sigmoid(x), x * HardSigmoid(x)): float32 products of the values,
    the multiplication the fake-quantized model does."""
    codes = a.codes if isinstance(a, Table) else a
    return Table(codes, (table_of(a) * table_of(b)).astype(np.float32))


def moved_table(t: Table, name: str) -> Table:
    return Table(replace(t.codes, name=name), t.values)


HANDLERS = {op: lower_unary for op in ELEMENTWISE if op not in ("Relu", "Clip")}
