"""Numpy reference of every quantizer op and its gradient.

This is the executable form of ../shared/reference/quantizer-math.md: the C++
and CUDA kernels are tested against it, and onnx.reference runs graphs with
our ops through the `reference_ops()` classes below.

All arithmetic is float32 in the same order as the kernels, so that results
agree exactly except where a 1-ulp difference in tanh moves a value across a
rounding boundary.
"""

from __future__ import annotations

import numpy as np

from onnxqat.ops.schema import SAT_MODE_CLAMP, SAT_MODE_DOREFA, SAT_MODE_SYMMETRIC

F32 = np.float32


def _scalar(x) -> float:
    return float(np.asarray(x).reshape(-1)[0])


# ---------------------------------------------------------------- SAT weights

def tanh_f32(w: np.ndarray) -> np.ndarray:
    """float32 tanh, correctly rounded: computed in float64 and rounded once. numpy's own float32 tanh is a SIMD
    approximation that differs by an ulp on about a third of the inputs, and differently on different CPUs; the
    C++ kernel's tanh is correctly rounded as well (bit-equal to this)."""
    return np.tanh(np.asarray(w, dtype=F32).astype(np.float64)).astype(F32)


def sat_weight_max_tanh(w: np.ndarray) -> np.float32:
    """M = max|tanh(W)|; 1 when every weight is zero (keeps t/M and dW finite)."""
    m = np.max(np.abs(tanh_f32(w))) if w.size else F32(0)
    return F32(m) if m > 0 else F32(1)


def sat_weight_unscaled(w: np.ndarray, r: float, mode: int) -> np.ndarray:
    t = tanh_f32(w)
    m = sat_weight_max_tanh(w)
    tn = (t / m).astype(F32)
    r = F32(r)
    if mode == SAT_MODE_CLAMP:
        return tn
    if mode == SAT_MODE_DOREFA:
        u = ((tn + F32(1)) * F32(0.5)).astype(F32)
        uq = (np.round(r * u) / r).astype(F32)
        return (F32(2) * uq - F32(1)).astype(F32)
    if mode == SAT_MODE_SYMMETRIC:
        half = F32(np.floor(r / 2))
        if half < 1:  # R = 1: no level besides 0, and round(0 * tn) / 0 would be NaN
            raise ValueError(f"SAT weight mode {mode} (symmetric) needs R >= 2, got {r}")
        return (np.round(half * tn) / half).astype(F32)
    raise ValueError(f"unknown SAT weight mode {mode}")


def sat_weight_scale(wq: np.ndarray, fan_out: int) -> np.float32:
    """S = sqrt(n * Var(Wq)) with Bessel correction; 1 without scaling or when Var is 0."""
    if fan_out <= 0 or wq.size < 2:
        return F32(1)
    var = np.var(wq.astype(np.float64), ddof=1)
    s = np.sqrt(fan_out * var)
    return F32(s) if s > 0 else F32(1)


def sat_weight_forward(w, r, mode, fan_out) -> np.ndarray:
    wq = sat_weight_unscaled(w, _scalar(r), int(_scalar(mode)))
    s = sat_weight_scale(wq, int(_scalar(fan_out)))
    return (wq / s).astype(F32)


def sat_weight_grad_factor(w, r, mode, fan_out) -> np.ndarray:
    """The derivative factor dWq/dW = (1 - tanh(W)^2) / (M * S) (float32: 1 - t*t, M*S, then one division); M and S
    constants, rounding STE. SatWeightQuant's optional second output."""
    t = tanh_f32(w)
    m = sat_weight_max_tanh(w)
    wq = sat_weight_unscaled(w, _scalar(r), int(_scalar(mode)))
    s = sat_weight_scale(wq, int(_scalar(fan_out)))
    return ((F32(1) - t * t) / (m * s)).astype(F32)


def sat_weight_backward(dwq, w, r, mode, fan_out, factor=None) -> np.ndarray:
    """dW = dWq * ((1 - tanh(W)^2) / (M * S)): dWq times the derivative factor (SatWeightQuantGrad's optional
    input 5, else computed from W)."""
    f = sat_weight_grad_factor(w, r, mode, fan_out) if factor is None else np.asarray(factor, F32)
    return (np.asarray(dwq, F32) * f).astype(F32)


# ------------------------------------------------------------- SAT activations

def sat_act_forward(x, alpha, r) -> np.ndarray:
    a = F32(abs(_scalar(alpha)))
    r = F32(_scalar(r))
    xc = np.clip(x.astype(F32), F32(0), a)
    return (a * (np.round(r * xc / a) / r)).astype(F32)


def sat_act_backward(dy, x, alpha, r):
    """Returns (dx, dalpha) with dalpha shaped like alpha (CG-PACT gradient)."""
    alpha = np.asarray(alpha, dtype=F32)
    a = F32(abs(_scalar(alpha)))
    r = F32(_scalar(r))
    x = x.astype(F32)
    dy = dy.astype(F32)
    inside = (x > 0) & (x <= a)
    dx = np.where(inside, dy, F32(0)).astype(F32)
    xa = (x / a).astype(F32)
    middle = (np.round(r * x / a) / r - xa).astype(F32)
    local = np.where(x >= a, F32(1), np.where(x > 0, middle, F32(0))).astype(F32)
    dalpha = np.sum(dy.astype(np.float64) * local.astype(np.float64))
    return dx, np.full(alpha.shape, dalpha, dtype=F32)


# ---------------------------------------------------------------------- LSQ

def lsq_bounds(r: float, signed: bool) -> tuple[float, float]:
    r = int(round(r))
    if signed:
        return float(-((r + 1) // 2)), float((r - 1) // 2)
    return 0.0, float(r)


def _broadcast_step(step, v: np.ndarray, axis: int) -> np.ndarray:
    step = np.asarray(step, dtype=F32)
    if step.size == 1:
        return step.reshape(())
    shape = [1] * v.ndim
    shape[axis % v.ndim] = step.size
    return step.reshape(shape)


def lsq_forward(v, step, r, signed, grad_scale=1.0, axis=0) -> np.ndarray:
    qn, qp = lsq_bounds(_scalar(r), bool(_scalar(signed)))
    s = _broadcast_step(step, v, int(_scalar(axis)))
    q = np.clip((v.astype(F32) / s).astype(F32), F32(qn), F32(qp))
    return (np.round(q) * s).astype(F32)


def lsq_backward(dy, v, step, r, signed, grad_scale, axis=0):
    """Returns (dv, dstep) with dstep shaped like step."""
    step_arr = np.asarray(step, dtype=F32)
    ax = int(_scalar(axis)) % max(v.ndim, 1)
    qn, qp = lsq_bounds(_scalar(r), bool(_scalar(signed)))
    g = F32(_scalar(grad_scale))
    s = _broadcast_step(step_arr, v, ax)
    vs = (v.astype(F32) / s).astype(F32)
    dy = dy.astype(F32)
    inside = (vs >= qn) & (vs <= qp)
    dv = np.where(inside, dy, F32(0)).astype(F32)
    local = np.where(vs <= qn, F32(qn), np.where(vs >= qp, F32(qp), np.round(vs) - vs)).astype(F32)
    prod = dy.astype(np.float64) * local.astype(np.float64)
    if step_arr.size == 1:
        ds = np.full(step_arr.shape, g * prod.sum(), dtype=F32)
    else:
        other = tuple(i for i in range(v.ndim) if i != ax)
        ds = (g * prod.sum(axis=other)).astype(F32).reshape(step_arr.shape)
    return dv, ds


# ------------------------------------------------- onnx.reference integration

def reference_ops():
    """OpRun classes for onnx.reference.ReferenceEvaluator(model, new_ops=...)."""
    from onnx.reference.op_run import OpRun

    from onnxqat.ops.schema import DOMAIN

    class SatWeightQuant(OpRun):
        op_domain = DOMAIN

        def _run(self, w, r, mode, fan_out):
            wq = sat_weight_forward(w, r, mode, fan_out)
            if len(self.output) > 1 and self.output[1]:  # optional second output: dWq/dW
                return (wq, sat_weight_grad_factor(w, r, mode, fan_out))
            return (wq,)

    class SatActQuant(OpRun):
        op_domain = DOMAIN

        def _run(self, x, alpha, r):
            return (sat_act_forward(x, alpha, r),)

    class LsqQuant(OpRun):
        op_domain = DOMAIN

        def _run(self, v, step, r, signed, grad_scale, axis):
            return (lsq_forward(v, step, r, signed, grad_scale, axis),)

    return [SatWeightQuant, SatActQuant, LsqQuant]
