"""The one applier: turns a Plan into graph edits.

- weight quantizer `<layer>_wquant`: input = the weight (name unchanged), output `<weight>_q` on the layer(s);
  with SAT's weights.restore_scale, Mul(`<weight>_q`, `<layer>_wquant.restore_scale`) -> `<weight>_qs` on the layer(s);
- SatActQuant `<act>_aquant` replaces the Relu/Clip it was planned on (same input, same output name);
- LsqQuant `<act>_aquant` goes after the activation, output `<tensor>_q`, the activation's consumers rewired;
- per-quantizer constants are initializers `<quantizer>.<input>` (CONVENTIONS.md);
- weights and biases of weighted layers stored as Constant nodes become initializers (same names), so that
  training can update them; IR < 4 models go to IR 4 with initializers no longer listed as graph inputs;
- every quantizer output gets a value_info (type and shape of its input) so shape inference runs through;
- metadata `onnxqat.recipe`, `onnxqat.recipe_toml`; opset import com.onnxqat 1.
"""

from __future__ import annotations

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from onnxqat.graph import GraphIndex, ensure_opset, infer_shapes, register_quantizer_schemas
from onnxqat.ops.schema import DOMAIN, SCALE_RESTORE_DOC
from onnxqat.passes.plan import Plan, PlanEntry
from onnxqat.passes.strip import encode_replaced
from onnxqat.passes.weights import SAT_MODE_VALUES
from onnxqat.recipes import WEIGHTED_OP_TYPES, Recipe


def _scalar_f(name: str, v: float) -> TensorProto:
    return numpy_helper.from_array(np.array(v, dtype=np.float32), name)


def _scalar_i(name: str, v: int) -> TensorProto:
    return numpy_helper.from_array(np.array(v, dtype=np.int64), name)


def quantizer_node(e: PlanEntry, input_name: str, output_name: str) -> tuple[onnx.NodeProto, list[TensorProto]]:
    q = e.name
    if e.op_type == "SatWeightQuant":
        inits = [
            _scalar_f(f"{q}.range", e.range),
            _scalar_i(f"{q}.mode", SAT_MODE_VALUES[e.mode]),
            _scalar_i(f"{q}.fan_out", e.fan_out),
        ]
    elif e.op_type == "SatActQuant":
        inits = [
            numpy_helper.from_array(np.array([e.alpha], dtype=np.float32), f"{q}.alpha"),
            _scalar_f(f"{q}.range", e.range),
        ]
    else:
        inits = [
            numpy_helper.from_array(np.array(e.step, dtype=np.float32), f"{q}.step"),
            _scalar_f(f"{q}.range", e.range),
            _scalar_i(f"{q}.signed", int(e.signed)),
            _scalar_f(f"{q}.grad_scale", e.grad_scale),
            _scalar_i(f"{q}.axis", e.axis),
        ]
    node = helper.make_node(e.op_type, [input_name] + [t.name for t in inits], [output_name], name=q, domain=DOMAIN)
    return node, inits


def restore_scale_node(e: PlanEntry, weight_shape) -> tuple[onnx.NodeProto, TensorProto]:
    """Mul(<weight>_q, <quantizer>.restore_scale) -> <weight>_qs, the constant shaped to broadcast along the output-channel
    axis (one value: a scalar)."""
    c = np.asarray(e.restore_scale, dtype=np.float32)
    if c.size > 1:
        shape = [1] * len(weight_shape)
        shape[e.axis] = c.size
        c = c.reshape(shape)
    else:
        c = c.reshape(())
    init = numpy_helper.from_array(c, f"{e.name}.restore_scale")
    node = helper.make_node("Mul", [e.output, init.name], [e.layer_input], name=f"{e.name}_restore",
                            doc_string=SCALE_RESTORE_DOC)
    return node, init


def _constants_to_initializers(m: onnx.ModelProto, tensors: set[str]) -> None:
    """Constant nodes producing `tensors` become initializers of the same name."""
    g = m.graph
    keep = []
    for node in g.node:
        if node.op_type == "Constant" and node.domain in ("", "ai.onnx") and node.output[0] in tensors:
            value = next((a for a in node.attribute if a.name == "value"), None)
            if value is not None:
                t = TensorProto()
                t.CopyFrom(value.t)
                t.name = node.output[0]
                g.initializer.append(t)
                continue
        keep.append(node)
    del g.node[:]
    g.node.extend(keep)


def apply_plan(m: onnx.ModelProto, plan: Plan, recipe: Recipe) -> onnx.ModelProto:
    """Edit `m` (a prepared copy) in place as `plan` says; returns it."""
    register_quantizer_schemas()
    g = m.graph
    shapes = infer_shapes(m)

    # weights/biases of weighted layers held by Constant nodes -> initializers (trainable)
    trainable = set()
    for node in g.node:
        if node.op_type in WEIGHTED_OP_TYPES and node.domain in ("", "ai.onnx"):
            trainable.update(i for i in node.input[1:] if i)
    trainable.update(e.tensor for e in plan.weights)
    _constants_to_initializers(m, trainable)

    index = GraphIndex(m)
    position = {id(n): k for k, n in enumerate(g.node)}
    before: dict[int, list[onnx.NodeProto]] = {}  # node index -> quantizers to put before it
    after: dict[int, list[onnx.NodeProto]] = {}
    replace: dict[int, onnx.NodeProto] = {}
    new_inits: list[TensorProto] = []
    value_infos: list[tuple[str, str]] = []  # (output, like input)

    for e in plan.weights:
        node, inits = quantizer_node(e, e.tensor, e.output)
        new_inits += inits
        consumers = [index.nodes_by_name[c] for c in e.consumers]
        for c in consumers:
            for k, i in enumerate(c.input):
                if i == e.tensor:
                    c.input[k] = e.layer_input
        first = min(position[id(c)] for c in consumers)
        before.setdefault(first, []).append(node)
        value_infos.append((e.output, e.tensor))
        if e.restore_scale is not None:
            restore, init = restore_scale_node(e, index.constant_value(e.tensor).shape)
            new_inits.append(init)
            before[first].append(restore)
            value_infos.append((e.layer_input, e.tensor))

    for e in plan.activations:
        act = index.nodes_by_name[e.node]
        k = position[id(act)]
        if e.op_type == "SatActQuant":
            node, inits = quantizer_node(e, act.input[0], act.output[0])
            node.doc_string = encode_replaced(act)  # strip_quantizers restores exactly this node
            replace[k] = node
            value_infos.append((act.output[0], act.output[0]))
        else:
            out = e.output
            node, inits = quantizer_node(e, e.tensor, out)
            for c, port in index.consumers.get(e.tensor, []):
                c.input[port] = out
            after.setdefault(k, []).append(node)
            value_infos.append((out, e.tensor))
        new_inits += inits

    nodes = []
    for k, node in enumerate(g.node):
        nodes += before.get(k, [])
        nodes.append(replace.get(k, node))
        nodes += after.get(k, [])
    del g.node[:]
    g.node.extend(nodes)
    g.initializer.extend(new_inits)

    if m.ir_version < 4:  # IR 3 lists every initializer as a graph input; IR >= 4 need not (and training must not)
        m.ir_version = 4
        init_names = {t.name for t in g.initializer}
        keep = [i for i in g.input if i.name not in init_names]
        del g.input[:]
        g.input.extend(keep)

    known = {vi.name for vi in g.value_info}
    for out, like in value_infos:
        if out in known:
            continue
        shape = shapes.get(like)
        vi = helper.make_tensor_value_info(out, TensorProto.FLOAT, list(shape) if shape is not None else None)
        if shape is not None:
            for d, v in zip(vi.type.tensor_type.shape.dim, shape):
                if v is None:
                    d.ClearField("dim_value")
        g.value_info.append(vi)

    ensure_opset(m)
    meta = {p.key: p for p in m.metadata_props}
    for key, value in (("onnxqat.recipe", recipe.name), ("onnxqat.recipe_toml", recipe.toml_text)):
        if key in meta:
            meta[key].value = value
        else:
            m.metadata_props.append(onnx.StringStringEntryProto(key=key, value=value))
    return m
