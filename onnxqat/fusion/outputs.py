"""Graph outputs (float logits from a last DequantizeLinear, or the integer codes themselves) and the fused ModelProto.

An accumulator output becomes int32 codes in accumulator steps, c = acc + round(bias / scale); with the final
DequantizeLinear the codes are refined by 2^k (k <= 16, int32 headroom checked) so the float logits keep the bias to
2^-k of a step.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

import numpy as np
import onnx
from onnx import TensorProto, helper

from onnxqat.errors import FuseError
from onnxqat.fusion.builder import GraphBuilder
from onnxqat.fusion.lower_pooling import acc_of_pooled
from onnxqat.fusion.values import Acc, Codes, Float, OutputInfo, Pooled

if TYPE_CHECKING:
    from onnxqat.fusion.lower import Lowerer

OPSET = 21
IR_VERSION = 10


def lower_output(low: Lowerer, name: str) -> OutputInfo:
    b = low.b
    v = low.val.get(name)
    if v is None:
        raise FuseError(f"graph output '{name}' has no integer form")
    if isinstance(v, Pooled):
        v = acc_of_pooled(b, v, f"{name}_pool")
    if isinstance(v, Float) and v.grid is not None and low.format == "qdq":
        c = v.grid
        rename(b, v.name, name)
        return OutputInfo(name, np.array([c.scale]), 1, TensorProto.FLOAT)
    if isinstance(v, Float):
        rename(b, v.name, name)
        unit, axis = v.unit if v.unit is not None else (np.array([0.0]), 1)
        return OutputInfo(name, np.abs(unit), axis, TensorProto.FLOAT)
    if isinstance(v, Codes):
        if low.dequantize_output:
            s = b.const(f"{name}_scale", np.array(v.scale, np.float32))
            zp = b.const(f"{name}_zp", np.array(v.zp, np.uint8))
            b.nodes.append(helper.make_node("DequantizeLinear", [v.name, s, zp], [name], name=b.fresh(f"{name}_dequantize")))
            return OutputInfo(name, np.array([v.scale]), 1, TensorProto.FLOAT)
        rename(b, v.name, name)
        return OutputInfo(name, np.array([v.scale]), 1, v.dtype)
    return acc_output(b, v, name, name, low.dequantize_output)


def acc_output(b: GraphBuilder, v: Acc, name: str, out_name: str, dequantize: bool) -> OutputInfo:
    """Acc -> int32 codes in accumulator steps (c = acc + round(bias/scale)); with dequantize, refined by 2^k so
    the bias keeps 2^-k of a step, then DequantizeLinear to float. The last node writes `out_name`."""
    if len(v.terms) != 1:
        raise FuseError(f"'{name}' is a sum of branches without an activation quantizer")
    if np.isfinite(v.clip).any():
        raise FuseError(f"'{name}': a Relu/Clip after the last layer without a quantizer is not supported")
    t, sc, bound = v.terms[0]
    n = max(sc.size, v.bias.size)
    sc = np.broadcast_to(sc, (n,)).copy()
    bias = np.broadcast_to(v.bias, (n,))
    sgn = np.where(sc < 0, -1, 1)
    mag = np.abs(sc)
    mag = np.where(mag > 0, mag, np.max(mag) if np.max(mag) > 0 else 1.0)
    bcode = bias / mag
    room = (2 ** 30) / max(bound + np.max(np.abs(bcode)) + 1, 1)
    k = int(max(0, min(16, math.floor(math.log2(room))))) if dequantize else 0
    cshape = v.cshape if n > 1 else ()
    mul = (sgn * (1 << k)).astype(np.int32)
    y = t
    if np.any(mul != 1):
        mul_c = mul.reshape(cshape) if np.any(mul != mul[0]) else mul[:1].reshape(())
        y = b.op("Mul", [t, b.const(f"{name}_mul", mul_c)], f"{name}_acc")
    badd = np.floor(bcode * (1 << k) + 0.5).astype(np.int32)
    out_scale = mag / (1 << k)
    if not dequantize:
        b.nodes.append(helper.make_node("Add", [y, b.const(f"{name}_bias", badd.reshape(cshape))], [out_name],
                                        name=b.fresh(f"{name}_codes")))
        return OutputInfo(out_name, mag, v.axis, TensorProto.INT32)
    y = b.op("Add", [y, b.const(f"{name}_bias", badd.reshape(cshape))], f"{name}_codes")
    if n > 1 and not np.all(out_scale == out_scale[0]):
        s = b.const(f"{name}_scale", out_scale.astype(np.float32))
        zp = b.const(f"{name}_zp", np.zeros(n, np.int32))
        dq_attrs = {"axis": v.axis}
    else:
        s = b.const(f"{name}_scale", np.array(out_scale[0], np.float32))
        zp = b.const(f"{name}_zp", np.array(0, np.int32))
        dq_attrs = {}
    b.nodes.append(helper.make_node("DequantizeLinear", [y, s, zp], [out_name], name=b.fresh(f"{name}_dequantize"),
                                    **dq_attrs))
    return OutputInfo(out_name, mag, v.axis, TensorProto.FLOAT)


def rename(b: GraphBuilder, old: str, new: str) -> None:
    """Rename a tensor of the graph being written (to the graph output's name)."""
    if old == new:
        return
    for n in b.nodes:
        for i, o in enumerate(n.output):
            if o == old:
                n.output[i] = new
        for i, x in enumerate(n.input):
            if x == old:
                n.input[i] = new


def assemble_model(src: onnx.ModelProto, inp: onnx.ValueInfoProto, outputs: list[OutputInfo], b: GraphBuilder,
                   input_type: str, format: str) -> onnx.ModelProto:
    """The fused model: the written nodes and initializers, the input as uint8 codes (or float), onnxqat metadata."""
    dims = [d.dim_param or d.dim_value or None for d in inp.type.tensor_type.shape.dim]
    in_type = TensorProto.UINT8 if input_type == "uint8" else TensorProto.FLOAT
    graph_inputs = [helper.make_tensor_value_info(inp.name, in_type, dims or None)]
    orig_out = {o.name: o for o in src.graph.output}
    graph_outputs = []
    for o in outputs:
        d = [x.dim_param or x.dim_value or None for x in orig_out[o.name].type.tensor_type.shape.dim]
        graph_outputs.append(helper.make_tensor_value_info(o.name, o.dtype, d or None))
    graph = helper.make_graph(b.nodes, f"{src.graph.name or 'model'}_{format}", graph_inputs, graph_outputs,
                              b.initializers)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)],
                              producer_name="onnxqat", ir_version=IR_VERSION)
    for p in src.metadata_props:
        if p.key.startswith("onnxqat."):
            model.metadata_props.add(key=p.key, value=p.value)
    return model
