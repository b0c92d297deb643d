"""Weight quantizers -> integer weight codes.

Every supported weight quantizer gives Wq = W_int * s_w exactly (s_w per tensor or per output channel):
- SAT DoReFa (mode 1): Wq = (2*uq - 1)/S with uq = k/R, k = round(R*u) in [0, R], so
  W_int = R*S*Wq = 2k - R (odd integers in [-R, R] for odd R: no zero level) and s_w = 1/(R*S).
- SAT full range (mode 3): the DoReFa form with j = round(R u'), u' the stretched (t/M + 1)/2.
- SAT symmetric (mode 2): Wq = round(h*t/M)/(h*S), h = floor(R/2): W_int in [-h, h], s_w = 1/(h*S).
- SAT asymmetric (mode 4): Wq = j/(h*S), j in [-h-1, h] (an 8-bit weight is an int8): W_int = j, s_w = 1/(h*S).
- LSQ signed: Wq = s*round(clip(W/s, Qn, Qp)): W_int in [Qn, Qp] = [-(R+1)/2, (R-1)/2], s_w = s.
(S = the ApplyScaling factor, 1 without scaling.) The codes are taken from the numpy reference itself, so they
are the very values the fake-quantized model uses.

Storage: W_int = mult*u + offset with u an unsigned code in [0, umax] (DoReFa: u = k, mult 2, offset -R;
symmetric: offset -h; LSQ: offset Qn); u needs `bits` = ceil(log2(umax+1)) bits.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import onnx

from onnxqat.errors import FuseError
from onnxqat.fusion.graph import QatGraph, check_range, node_label
from onnxqat.ops import reference as ref
from onnxqat.ops.schema import SAT_MODE_ASYMMETRIC, SAT_MODE_SYMMETRIC, SAT_MODES_CLAMP, SAT_MODES_DOREFA_LEVELS


@dataclass
class WeightCodes:
    w_int: np.ndarray  # int64, same layout as the original weight
    scale: np.ndarray  # float64, shape [C_out] (per output channel; a per-tensor scale is repeated)
    u: np.ndarray  # uint8 unsigned storage codes, same layout
    mult: int
    offset: int
    bits: int  # bits per stored code
    kind: str  # "sat-dorefa", "sat-symmetric", "lsq"

    @property
    def int_min(self) -> int:
        return self.offset

    @property
    def int_max(self) -> int:
        return self.mult * ((1 << self.bits) - 1) + self.offset


def _bits_for(umax: int) -> int:
    return max(1, math.ceil(math.log2(umax + 1)))


def weight_codes(g: QatGraph, q: onnx.NodeProto, out_axis: int, n_out: int) -> WeightCodes:
    """Integer codes of the weight quantized by node `q`; out_axis = the output-channel axis of the weight."""
    w = g.const(q.input[0], q, "weight").astype(np.float32)
    if q.op_type == "SatWeightQuant":
        r = check_range(q, g.scalar(q, 1, "range"))
        mode = int(g.scalar(q, 2, "mode"))
        fan_out = int(g.scalar(q, 3, "scale_fan_out"))
        if mode in SAT_MODES_CLAMP:
            raise FuseError(f"{node_label(q)} is in clamp mode (mode {mode}): its weights are not quantized yet "
                            "(train with a quantizing mode before fusing)")
        wq = ref.sat_weight_unscaled(w, r, mode)
        s = float(ref.sat_weight_scale(w, r, mode, fan_out))
        if mode in SAT_MODES_DOREFA_LEVELS:  # DoReFa and full range: levels 2 j / R - 1
            wint = np.round(wq.astype(np.float64) * r)
            k = (wint + r) / 2
            if np.any(k != np.round(k)):
                raise FuseError(f"{node_label(q)}: DoReFa codes are not of the form 2k-R")
            err = np.max(np.abs(wq.astype(np.float64) * r - wint)) if w.size else 0.0
            u, mult, offset, umax, step, kind = k, 2, -r, r, 1.0 / r, "sat-dorefa"
        elif mode in (SAT_MODE_SYMMETRIC, SAT_MODE_ASYMMETRIC):
            h = r // 2
            if h < 1:
                raise FuseError(f"{node_label(q)}: inconsistent range R={r} for (a)symmetric mode (needs R >= 3)")
            wint = np.round(wq.astype(np.float64) * h)
            err = np.max(np.abs(wq.astype(np.float64) * h - wint)) if w.size else 0.0
            low = h + 1 if mode == SAT_MODE_ASYMMETRIC else h  # asymmetric: j in [-h - 1, h]
            u, mult, offset, umax, step = wint + low, 1, -low, h + low, 1.0 / h
            kind = "sat-asymmetric" if mode == SAT_MODE_ASYMMETRIC else "sat-symmetric"
        else:
            raise FuseError(f"{node_label(q)}: unknown SAT weight mode {mode}")
        if err > 1e-3:
            raise FuseError(f"{node_label(q)}: quantized weights are off the integer grid (max error {err:g})")
        scale = np.full(n_out, step / s, dtype=np.float64)
    elif q.op_type == "LsqQuant":
        r = check_range(q, g.scalar(q, 2, "range"))
        signed = int(g.scalar(q, 3, "signed"))
        if not signed:
            raise FuseError(f"{node_label(q)}: an unsigned LsqQuant on a weight is not supported (weights use signed=1)")
        step = g.const(q.input[1], q, "step").astype(np.float32)
        axis = int(g.scalar(q, 5, "axis")) % max(w.ndim, 1) if len(q.input) > 5 else 0
        if np.any(~(step > 0)):
            raise FuseError(f"{node_label(q)}: step sizes must be > 0")
        qn, qp = ref.lsq_bounds(r, True)
        if step.size == 1:
            sb = step.reshape(())
            scale = np.full(n_out, float(step.reshape(-1)[0]), dtype=np.float64)
        else:
            if axis != out_axis or step.size != n_out or w.shape[axis] != step.size:
                raise FuseError(f"{node_label(q)}: inconsistent per-channel step: {step.size} steps on axis {axis}, "
                                f"weight shape {list(w.shape)} has {n_out} output channels on axis {out_axis}")
            shape = [1] * w.ndim
            shape[axis] = step.size
            sb = step.reshape(shape)
            scale = step.reshape(-1).astype(np.float64)
        wint = np.round(np.clip((w / sb).astype(np.float32), np.float32(qn), np.float32(qp))).astype(np.float64)
        u, mult, offset, umax, kind = wint - qn, 1, int(qn), int(qp - qn), "lsq"
    else:
        raise FuseError(f"{node_label(q)}: not a weight quantizer")
    bits = _bits_for(int(umax))
    if bits > 8:
        raise FuseError(f"{node_label(q)}: weight range R={r} needs {bits}-bit codes; at most 8 are supported")
    return WeightCodes(w_int=wint.astype(np.int64), scale=scale, u=u.astype(np.uint8), mult=mult,
                       offset=int(offset), bits=bits, kind=kind)
