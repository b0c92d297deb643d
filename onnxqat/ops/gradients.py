"""Gradient definitions of the quantizer ops for ONNX Runtime training.

ORT builds the backward graph of a custom op from a registered definition: one gradient node
`<Op>Grad(GO(0), I(0), I(1), ...)` -> `GI(k)` for every trainable forward input k (schema.py `grad_of`).
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
    node.inputs = ["GO(0)"] + [f"I({i})" for i in range(len(op.inputs))]
    node.outputs = [f"GI({i})" for i in op.grad_of]
    node.attributes = []
    return f"{DOMAIN}::{op.name}", [node]


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
