"""strip_quantizers: the inverse of insert.

Removes every com.onnxqat quantizer node (and a weight quantizer's restore_scale Mul) and its constant initializers; weight
and LSQ activation quantizers are bypassed (consumers read the float tensor
again), a SatActQuant becomes the activation it replaced (Relu, or the exact
Clip recorded in its doc_string). Weights keep their (trained) float values,
so the two-phase SAT procedure is: train sat4-clamp, strip, insert sat4, train.
"""

from __future__ import annotations

import base64

import onnx
from onnx import helper

from onnxqat.graph import load_model
from onnxqat.ops.schema import DOMAIN, is_quantizer, is_scale_restore

REPLACES_PREFIX = "onnxqat.replaces:"


def encode_replaced(node: onnx.NodeProto) -> str:
    """doc_string of a SatActQuant: the activation node it replaced, serialized."""
    return REPLACES_PREFIX + base64.b64encode(node.SerializeToString()).decode("ascii")


def _replaced_node(q: onnx.NodeProto) -> onnx.NodeProto:
    if q.doc_string.startswith(REPLACES_PREFIX):
        node = onnx.NodeProto()
        node.ParseFromString(base64.b64decode(q.doc_string[len(REPLACES_PREFIX):]))
        node.input[0] = q.input[0]
        del node.output[:]
        node.output.append(q.output[0])
        return node
    name = q.name[: -len("_aquant")] if q.name.endswith("_aquant") else q.name
    return helper.make_node("Relu", [q.input[0]], [q.output[0]], name=name)


def strip_quantizers(model) -> onnx.ModelProto:
    """A copy of `model` (path or ModelProto) without quantizer nodes; float weights kept."""
    m = load_model(model)
    g = m.graph
    rename: dict[str, str] = {}  # bypassed quantizer output -> its input
    removed_inputs: set[str] = set()
    nodes = []
    for node in g.node:
        if is_scale_restore(node):
            removed_inputs.update(node.input[1:])
            rename[node.output[0]] = node.input[0]
            continue
        if not is_quantizer(node):
            nodes.append(node)
            continue
        removed_inputs.update(node.input[1:])
        if node.op_type == "SatActQuant":
            nodes.append(_replaced_node(node))
        else:
            rename[node.output[0]] = node.input[0]

    def resolve(t: str) -> str:
        while t in rename:
            t = rename[t]
        return t

    graph_outputs = {o.name for o in g.output}
    for node in nodes:
        for k, i in enumerate(node.input):
            if i in rename:
                node.input[k] = resolve(i)
    for o in g.output:
        if o.name in rename:  # keep the graph's output name: an Identity
            nodes.append(helper.make_node("Identity", [resolve(o.name)], [o.name], name=f"{o.name}_identity"))
    del g.node[:]
    g.node.extend(nodes)

    used = {i for n in g.node for i in n.input} | graph_outputs
    keep = [t for t in g.initializer if t.name not in removed_inputs or t.name in used]
    del g.initializer[:]
    g.initializer.extend(keep)
    vis = [vi for vi in g.value_info if vi.name not in rename]
    del g.value_info[:]
    g.value_info.extend(vis)
    imports = [op for op in m.opset_import if op.domain != DOMAIN]
    del m.opset_import[:]
    m.opset_import.extend(imports)
    meta = [p for p in m.metadata_props if not p.key.startswith("onnxqat.recipe")]
    del m.metadata_props[:]
    m.metadata_props.extend(meta)
    return m
