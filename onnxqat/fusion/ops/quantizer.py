"""Activation quantizers (SatActQuant, LsqQuant on an activation): a value -> the codes of the quantizer,
u = clip(round(v / s_out) + zp, lo, hi), written by the format (low.fmt.quantize_node); a lookup table (ops/unary.py)
becomes one Gather of the quantizer's codes of its values."""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import TYPE_CHECKING

import numpy as np
import onnx
from onnx import TensorProto

from onnxqat.errors import FuseError
from onnxqat.fusion.graph import NoIntegerForm, check_range, node_label
from onnxqat.fusion.ops.concat import requantized_concat
from onnxqat.fusion.values import Codes, Float, Joined, Table
from onnxqat.ops import reference as ref

if TYPE_CHECKING:
    from onnxqat.fusion.lowering import Lowerer

F32 = np.float32


@dataclass
class Quantizer:
    """An activation quantizer's parameters, and its arithmetic in the float32 operations of the op (ops/reference.py),
    so that tables computed here hold the very codes and values of the fake-quantized model."""
    op_type: str
    s: float  # step of one code
    r: int
    zp: int  # code of real 0 (signed LSQ: (R + 1) / 2)
    alpha: float = 0.0  # SatActQuant
    step: np.float32 = F32(0)  # LsqQuant

    def codes(self, x: np.ndarray) -> np.ndarray:
        """u = the quantizer's code of every float32 value in x (what its forward rounds to)."""
        x = np.asarray(x, F32)
        if self.op_type == "SatActQuant":
            a, r = F32(self.alpha), F32(self.r)
            return np.round(r * np.clip(x, F32(0), a) / a).astype(np.int64)
        qn, qp = ref.lsq_bounds(self.r, self.zp > 0)
        k = np.round(np.clip((x / self.step).astype(F32), F32(qn), F32(qp)))
        return k.astype(np.int64) + self.zp

    def values(self) -> np.ndarray | None:
        """float32 value of every code where it is not float32(u - zp) * float32(s) (SatActQuant: alpha * (k / R))."""
        if self.op_type != "SatActQuant":
            return None
        k = np.arange(self.r + 1, dtype=F32)
        return (F32(self.alpha) * (k / F32(self.r))).astype(F32)


def quantizer_of(low: Lowerer, node: onnx.NodeProto) -> Quantizer:
    g = low.g
    if node.op_type == "SatActQuant":
        alpha = abs(g.scalar(node, 1, "alpha"))
        r = check_range(node, g.scalar(node, 2, "range"), max_r=255)
        if not alpha > 0:
            raise FuseError(f"{node_label(node)}: alpha is 0")
        return Quantizer("SatActQuant", alpha / r, r, 0, alpha=alpha)
    r = check_range(node, g.scalar(node, 2, "range"), max_r=255)
    zp = (r + 1) // 2 if int(g.scalar(node, 3, "signed")) else 0  # signed codes [-(R+1)/2, (R-1)/2] as u - zp
    step = g.const(node.input[1], node, "step")
    if step.size != 1:
        raise NoIntegerForm(f"{node_label(node)}: per-channel step on an activation", "per-channel activation step")
    s = float(step.reshape(-1)[0])
    if not s > 0:
        raise FuseError(f"{node_label(node)}: step must be > 0, is {s:g}")
    return Quantizer("LsqQuant", s, r, zp, step=F32(s))


def lower_activation_quantizer(low: Lowerer, node: onnx.NodeProto) -> None:
    """SatActQuant (step alpha/R) or LsqQuant on an activation (step s; signed: codes c + (R+1)/2)."""
    if node.input[0] in low.g.consts:
        return  # a weight quantizer: its consumer reads it
    q = quantizer_of(low, node)
    out = node.output[0]
    v = low.get(node.input[0], node, raw=True)
    if isinstance(v, Table) and not low.fmt.float_arithmetic:
        y = low.fmt.table_codes(low, v, q, out)
        low.val[out] = low.record(out, Codes(y, q.s, q.r, TensorProto.UINT8, q.zp, values=q.values()))
        return
    if isinstance(v, Joined):
        low.val[out] = low.record(out, requantized_concat(low, v, q.s, q.r, out, q.zp))
        return
    out = low.fmt.quantize_node(low, node, v, q.s, q.r, q.zp)
    vals = q.values()
    if vals is not None:  # the exact float32 values of SAT codes, for tables read from them
        c = low.val[out]
        low.val[out] = Float(c.name, replace(c.grid, values=vals), c.unit) if isinstance(c, Float) and c.grid \
            else replace(c, values=vals) if isinstance(c, Codes) else c


HANDLERS = {"SatActQuant": lower_activation_quantizer, "LsqQuant": lower_activation_quantizer}
