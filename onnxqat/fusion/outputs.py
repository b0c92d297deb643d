"""Graph outputs (float logits from a last DequantizeLinear, or the integer codes themselves) and the fused ModelProto.

An accumulator output becomes int32 codes in accumulator steps, c = acc + round(bias / scale); with the final
DequantizeLinear the codes are refined by 2^k (k <= 16, int32 headroom checked) so the float logits keep the bias to
2^-k of a step.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np
import onnx
from onnx import TensorProto, helper

from onnxqat.errors import FuseError
from onnxqat.fusion.builder import GraphBuilder
from onnxqat.fusion.graph import FUSED_OPSET
from onnxqat.fusion.convert import acc_of_pooled, acc_output, to_float
from onnxqat.fusion.values import Codes, Float, Joined, OutputInfo, Pending, Plain, Pooled, Table

if TYPE_CHECKING:
    from onnxqat.fusion.lowering import Lowerer

OPSET = FUSED_OPSET
IR_VERSION = 10


def lower_output(low: Lowerer, name: str) -> OutputInfo:
    b = low.b
    v = low.val.get(name)
    if v is None:
        raise FuseError(f"graph output '{name}' has no integer form")
    if isinstance(v, Pending):
        v = low.fmt.materialize(low, v)
    if isinstance(v, (Table, Joined)):  # a function of codes / parts on several grids as a graph output: floats
        v = Float(to_float(low, v))
    if isinstance(v, Pooled):
        v = acc_of_pooled(b, v, f"{name}_pool")
    if isinstance(v, Plain):
        rename(b, v.name, name)
        return OutputInfo(name, np.array([0.0]), 1, low.g.elem_type(name))
    if isinstance(v, Float) and v.grid is not None and low.format == "qdq":
        c = v.grid
        rename(b, v.name, name)
        return OutputInfo(name, np.array([c.scale]), 1, TensorProto.FLOAT)
    if isinstance(v, Float):
        rename(b, v.name, name)
        unit, axis = v.unit if v.unit is not None else (np.array([0.0]), 1)
        return OutputInfo(name, np.abs(unit), axis, TensorProto.FLOAT, accumulator=True)
    if isinstance(v, Codes):
        if low.dequantize_output:
            s = b.const(f"{name}_scale", np.array(v.scale, np.float32))
            zp = b.const(f"{name}_zp", np.array(v.zp, np.uint8))
            b.nodes.append(helper.make_node("DequantizeLinear", [v.name, s, zp], [name], name=b.fresh(f"{name}_dequantize")))
            return OutputInfo(name, np.array([v.scale]), 1, TensorProto.FLOAT)
        rename(b, v.name, name)
        return OutputInfo(name, np.array([v.scale]), 1, v.dtype)
    y = low.fmt.output_acc(low, v, name) if low.dequantize_output else None
    if y is None and (len(v.terms) > 1 or np.isfinite(v.clip).any()):  # a sum of branches, or a Relu of the logits
        if not low.dequantize_output:
            raise FuseError(f"graph output '{name}' is a sum of branches or clipped: no single int32 code grid "
                            "(leave --integer-output out)")
        y = to_float(low, v)
    if y is not None:
        rename(b, y, name)
        unit = np.abs(np.broadcast_to(v.terms[0][1], (max(t[1].size for t in v.terms),)))
        return OutputInfo(name, unit, v.axis, TensorProto.FLOAT, accumulator=True)
    return acc_output(b, v, name, name, low.dequantize_output)


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


def assemble_model(src: onnx.ModelProto, graph_inputs: list[onnx.ValueInfoProto], outputs: list[OutputInfo],
                   b: GraphBuilder, format: str) -> onnx.ModelProto:
    """The fused model: the written nodes and initializers, the inputs as the walk declared them, onnxqat metadata."""
    orig_out = {o.name: o for o in src.graph.output}
    graph_outputs = []
    for o in outputs:
        d = [x.dim_param or x.dim_value or None for x in orig_out[o.name].type.tensor_type.shape.dim]
        graph_outputs.append(helper.make_tensor_value_info(o.name, o.dtype, d or None))
    graph = helper.make_graph(b.nodes, f"{src.graph.name or 'model'}_{format}", graph_inputs, graph_outputs,
                              b.initializers)
    opsets = [helper.make_opsetid("", OPSET)]
    if any(n.domain == "com.microsoft" for n in b.nodes):  # onnxruntime's contrib ops (the ort format)
        opsets.append(helper.make_opsetid("com.microsoft", 1))
    model = helper.make_model(graph, opset_imports=opsets, producer_name="onnxqat", ir_version=IR_VERSION)
    for p in src.metadata_props:
        if p.key.startswith("onnxqat."):
            model.metadata_props.add(key=p.key, value=p.value)
    return model
