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
from onnxqat.fusion.values import CODES_REPLAY, Codes, Replay, Table

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
        t = table_of_codes(v)
    elif isinstance(v, Table):
        t = v
    else:
        raise NoIntegerForm(f"{node_label(node)}: {node.op_type} of an unquantized value (no quantizer before it)",
                            "input not quantized")
    if t.codes.r > 255:
        raise NoIntegerForm(f"{node_label(node)}: a table of {t.codes.r + 1} codes", "codes wider than 8 bits")
    low.val[node.output[0]] = applied(low, node, t)


def table_of_codes(c: Codes) -> Table:
    """The identity table of codes; replayable from their DequantizeLinear unless the quantizer computes its values
    otherwise (SAT: alpha * (k / R))."""
    return Table(c, c.real_values(), replay=CODES_REPLAY if c.values is None else None)


def applied(low: Lowerer, node: onnx.NodeProto, t: Table) -> Table:
    """The table of node(t): the node evaluated by onnxruntime on the table's values, with its constant inputs; a
    per-channel constant (a PRelu slope [C, 1, 1], a mean [1, C, 1, 1]) gives one row per channel."""
    g = low.g
    rank = len(g.shape_of(node.input[0]) or []) or t.rank
    consts, originals = {}, {}
    axis = t.axis if t.per_channel else None
    for i in node.input[1:]:
        if not i:
            continue
        if i not in g.consts:
            raise NoIntegerForm(f"{node_label(node)}: input '{i}' is not a constant", "data-dependent side input")
        c = originals[i] = np.asarray(g.consts[i])
        if c.size > 1:
            ch = [k for k, d in enumerate(c.shape) if d > 1]
            if len(ch) != 1 or not rank:
                raise NoIntegerForm(f"{node_label(node)}: parameter '{i}' of shape {list(c.shape)}",
                                    "parameter not per channel")
            a = rank - c.ndim + ch[0]
            if axis is not None and a != axis:
                raise NoIntegerForm(f"{node_label(node)}: parameters on two axes", "parameter not per channel")
            axis = a
            c = c.reshape(-1, 1)  # [C, 1] against the [C, codes] values
        else:
            c = c.reshape(())
        consts[i] = c
    x = t.values
    if axis is not None and x.ndim == 1:
        n_ch = max(c.shape[0] for c in consts.values() if c.ndim == 2)
        x = np.broadcast_to(x, (n_ch, x.size))
    y = run_node(node, x, consts)
    replay = Replay(("node", node, originals), t.replay) if t.replay is not None else None
    return Table(t.codes, y.reshape(x.shape), axis if axis is not None else 1, rank, replay)


def run_node(node: onnx.NodeProto, x: np.ndarray, consts: dict) -> np.ndarray:
    """The node on a float32 array by onnxruntime, its other inputs the given constants."""
    import onnxruntime as ort

    inits = [onnx.numpy_helper.from_array(np.asarray(v, np.float32 if v.dtype.kind == "f" else v.dtype), k)
             for k, v in consts.items()]
    n = helper.make_node(node.op_type, ["x"] + list(node.input[1:]), ["y"], domain=node.domain,
                         **{a.name: helper.get_attribute_value(a) for a in node.attribute})
    m = helper.make_model(helper.make_graph([n], "table", [helper.make_tensor_value_info("x", TensorProto.FLOAT,
                                                                                         [None] * x.ndim)],
                                            [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)], inits),
                          opset_imports=[helper.make_opsetid("", FUSED_OPSET)], ir_version=10)
    so = ort.SessionOptions()
    so.log_severity_level = 3
    try:
        sess = ort.InferenceSession(m.SerializeToString(), so, providers=["CPUExecutionProvider"])
        return np.asarray(sess.run(None, {"x": np.ascontiguousarray(x, np.float32)})[0], np.float32)
    except Exception as exc:
        raise NoIntegerForm(f"{node.op_type} '{node.name}': no table ({str(exc).splitlines()[0][:80]})",
                            "no table") from None


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
    per = next((t for t in (a, b) if isinstance(t, Table) and t.per_channel), None)
    values = (table_of(a) * table_of(b)).astype(np.float32)
    ra, rb = (t.replay if isinstance(t, Table) else table_of_codes(t).replay for t in (a, b))
    replay = Replay(("mul",), ra, rb) if ra is not None and rb is not None else None
    return Table(codes, values, per.axis, per.rank, replay) if per is not None else Table(codes, values, replay=replay)


def moved_table(t: Table, name: str, node: onnx.NodeProto | None = None) -> Table:
    """The table on moved codes (a per-channel table only where no element changes channel)."""
    if t.per_channel and node is not None and node.op_type not in ("Identity", "Dropout", "MaxPool", "Slice", "Pad",
                                                                   "Resize", "Tile", "Expand"):
        raise NoIntegerForm(f"{node_label(node)}: {node.op_type} of a per-channel table", "moves channels")
    # a per-channel constant of the replay broadcasts against the original layout only
    return Table(replace(t.codes, name=name), t.values, t.axis, t.rank, None if t.per_channel else t.replay)


def table_lookup(low: Lowerer, t: Table, table: np.ndarray, name: str) -> str:
    """table[u] (or table[c, u] of a per-channel table) for every code u of t's codes: one Gather of the flattened
    table (indices int32; a per-channel table adds c * (r + 1) to each index first)."""
    b = low.b
    idx = b.cast(t.codes.name, TensorProto.INT32, f"{name}_idx")
    if table.ndim == 2:
        shape = [1] * t.rank
        shape[t.axis] = table.shape[0]
        rows = (np.arange(table.shape[0], dtype=np.int32) * table.shape[1]).reshape(shape)
        idx = b.op("Add", [idx, b.const(f"{name}_rows", rows)], f"{name}_idx_c")
    return b.op("Gather", [b.const(f"{name}_table", table.reshape(-1)), idx], f"{name}_lut", axis=0)


def emit_replay(low: Lowerer, t: Table, name: str) -> str:
    """t's float values computed by float ops from the DequantizeLinear of its codes (t.replay must be set): the very
    ops of the fake-quantized model, on the same float32 inputs, so the same values."""
    from onnxqat.fusion.convert import dequantize

    b, memo = low.b, {}

    def emit(r: Replay) -> str:
        if id(r) in memo:
            return memo[id(r)]
        if r.op is None:
            out = dequantize(b, t.codes)
        elif r.op[0] == "mul":
            out = b.op("Mul", [emit(r.parent), emit(r.other)], f"{name}_r{len(memo)}")
        else:
            node, consts = r.op[1], r.op[2]
            ins = [emit(r.parent)] + [b.const(f"{name}_r{len(memo)}_{k}", c) if i else ""
                                      for k, (i, c) in enumerate((i, consts.get(i)) for i in node.input[1:])]
            out = b.op(node.op_type, ins, f"{name}_r{len(memo)}", domain=node.domain,
                       **{a.name: helper.get_attribute_value(a) for a in node.attribute})
        memo[id(r)] = out
        return out

    return emit(t.replay)


HANDLERS = {op: lower_unary for op in ELEMENTWISE if op not in ("Relu", "Clip")}
