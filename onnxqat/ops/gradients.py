"""Gradient definitions of the quantizer ops for ONNX Runtime training.

ORT builds the backward graph of a custom op from a registered definition: one gradient node
`<Op>Grad(GO(0), I(0), I(1), ..., O(k)...)` -> `GI(k)` for every trainable forward input k (schema.py `grad_of`);
the O(k) are the forward outputs of schema.py `grad_uses_outputs` (SatWeightQuant: its derivative factor dWq_dW,
so that SatWeightQuantGrad evaluates no tanh). ORT needs the forward node to *have* those outputs: run
add_gradient_outputs(model) on the graph given to generate_artifacts (onnxqat.training.artifacts does).
Per-node values (R, mode, qmin/qmax...) are forward *inputs*, so they reach the gradient node as I(i): attributes
would be fixed per op type at registration. Call register_gradients() in the process that calls
onnxruntime.training.artifacts.generate_artifacts, before that call.
"""

from __future__ import annotations

import threading

from onnxqat.ops.schema import ALL_OPS, DOMAIN, OpSignature

_lock = threading.Lock()
_registered = False


def gradient_definition(op: OpSignature):
    """(key, [GradientNodeDefinition]) of one op, as register_gradient_definition takes them."""
    from onnxruntime.capi import _pybind_state as C

    node = C.GradientNodeDefinition()
    node.op_type = op.grad_name
    node.domain = DOMAIN
    node.inputs = ["GO(0)"] + [f"I({i})" for i in range(len(op.inputs))] + [f"O({k})" for k in op.grad_uses_outputs]
    node.outputs = [f"GI({i})" for i in op.grad_of]
    node.attributes = []
    return f"{DOMAIN}::{op.name}", [node]


def add_gradient_outputs(model):
    """Gives every quantizer node of `model` (in place; returned) the optional forward outputs its gradient reads
    (schema.py `grad_uses_outputs`), named `<output 0>_<output name>` (e.g. `W1_q_dWq_dW`), with value_info shaped
    like the node's input 0 where that shape is known. Nodes that already have them are left alone."""
    from onnx import TensorProto, helper

    from onnxqat.ops.schema import is_quantizer, signature

    g = model.graph
    shapes = {i.name: list(i.dims) for i in g.initializer}
    for vi in list(g.input) + list(g.value_info) + list(g.output):
        t = vi.type.tensor_type
        if t.HasField("shape") and all(d.HasField("dim_value") for d in t.shape.dim):
            shapes.setdefault(vi.name, [d.dim_value for d in t.shape.dim])
    known = {vi.name for vi in list(g.value_info) + list(g.output)}
    for n in g.node:
        if not is_quantizer(n):
            continue
        op = signature(n.op_type)
        for k in op.grad_uses_outputs:
            while len(n.output) <= k:
                n.output.append("")
            if n.output[k]:
                continue
            name = f"{n.output[0]}_{op.outputs[k]}"
            n.output[k] = name
            if name not in known and n.input[0] in shapes:
                g.value_info.append(helper.make_tensor_value_info(name, TensorProto.FLOAT, shapes[n.input[0]]))
    return model


def register_gradients() -> None:
    """Register the gradient of every quantizer op with ORT training (idempotent, thread-safe)."""
    global _registered
    with _lock:
        if _registered:
            return
        from onnxruntime.capi import _pybind_state as C

        for op in ALL_OPS:
            key, defs = gradient_definition(op)
            C.register_gradient_definition(key, defs)
        _registered = True
