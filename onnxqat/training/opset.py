"""Training-copy pass: raise the default-domain opset to one onnxqat's training graph is written for.

The nodes that training adds (the loss, the differentiable rewrites of docs/training-ops.md) take their axes as inputs
(ReduceSum, Squeeze, Unsqueeze, Split: opset 13), and onnxruntime-training's own losses refuse older opsets ("No Op
registered for SoftmaxCrossEntropyLoss with domain_version of 11"). A model below MIN_OPSET is converted with
onnx.version_converter (the quantizer ops, domain com.onnxqat, pass through unchanged once their schemas are
registered with onnx.defs). Only the training copy is converted; the user's file and the trained model keep their
opset, and trained values map back by name (the converter keeps initializer names).
"""

from __future__ import annotations

import onnx

from onnxqat.errors import ModelError
from onnxqat.graph import default_opset, register_quantizer_schemas

MIN_OPSET = 13


def plan_upgrade(model: onnx.ModelProto, minimum: int = MIN_OPSET) -> int | None:
    """The opset the training copy is converted to, or None when the model's is high enough."""
    current = default_opset(model)
    return minimum if current < minimum else None


def upgrade_opset(model: onnx.ModelProto, minimum: int = MIN_OPSET) -> tuple[onnx.ModelProto, str | None]:
    """(model, message): the model converted to opset `minimum` when below it (a new ModelProto), with a one-line
    message saying so; else the model itself and None."""
    target = plan_upgrade(model, minimum)
    if target is None:
        return model, None
    from onnx import version_converter

    register_quantizer_schemas()
    before = default_opset(model)
    try:
        converted = version_converter.convert_version(model, target)
    except Exception as exc:  # the converter raises RuntimeError/IndexError with multi-line C++ text
        first = str(exc).strip().splitlines()[-1] if str(exc).strip() else type(exc).__name__
        raise ModelError(f"cannot convert the training copy from opset {before} to {target}: {first}") from None
    return converted, f"training graph converted from opset {before} to {target} (the model file keeps opset {before})"
