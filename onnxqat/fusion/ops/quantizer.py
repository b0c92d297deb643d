"""Activation quantizers (SatActQuant, LsqQuant on an activation): a value -> the codes of the quantizer,
u = clip(round(v / s_out) + zp, lo, hi), written by the format (low.fmt.requantize)."""

from __future__ import annotations

from typing import TYPE_CHECKING

import onnx

from onnxqat.errors import FuseError
from onnxqat.fusion.graph import NoIntegerForm, check_range, node_label

if TYPE_CHECKING:
    from onnxqat.fusion.lowering import Lowerer


def lower_activation_quantizer(low: Lowerer, node: onnx.NodeProto) -> None:
    """SatActQuant (step alpha/R) or LsqQuant on an activation (step s; signed: codes c + (R+1)/2)."""
    g = low.g
    out = node.output[0]
    if node.input[0] in g.consts:
        return  # a weight quantizer: its consumer reads it
    if node.op_type == "SatActQuant":
        alpha = abs(g.scalar(node, 1, "alpha"))
        r = check_range(node, g.scalar(node, 2, "range"), max_r=255)
        if not alpha > 0:
            raise FuseError(f"{node_label(node)}: alpha is 0")
        s, zp = alpha / r, 0
    else:
        r = check_range(node, g.scalar(node, 2, "range"), max_r=255)
        zp = (r + 1) // 2 if int(g.scalar(node, 3, "signed")) else 0  # signed codes [-(R+1)/2, (R-1)/2] as u - zp
        step = g.const(node.input[1], node, "step")
        if step.size != 1:
            raise NoIntegerForm(f"{node_label(node)}: per-channel step on an activation", "per-channel activation step")
        s = float(step.reshape(-1)[0])
        if not s > 0:
            raise FuseError(f"{node_label(node)}: step must be > 0, is {s:g}")
    low.fmt.quantize_node(low, node, low.get(node.input[0], node, raw=True), s, r, zp)


HANDLERS = {"SatActQuant": lower_activation_quantizer, "LsqQuant": lower_activation_quantizer}
