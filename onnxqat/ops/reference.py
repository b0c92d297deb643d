"""Numpy reference of every quantizer op and its gradient.

This is the executable form of ../shared/reference/quantizer-math.md: the C++
and CUDA kernels are tested against it, and onnx.reference runs graphs with
our ops through the `reference_ops()` classes below.

All arithmetic is float32 in the same order as the kernels, so that results
agree exactly; tanh is onnxqat's own float32 function (`tanh_f32`), which the
kernels evaluate with the same operations.
"""

from __future__ import annotations

import numpy as np

from onnxqat.ops.schema import (
    SAT_MODE_ASYMMETRIC,
    SAT_MODE_ASYMMETRIC_CLAMP,
    SAT_MODE_CLAMP,
    SAT_MODE_DOREFA,
    SAT_MODE_FULLRANGE,
    SAT_MODE_SYMMETRIC,
    SAT_MODES_CLAMP,
    SAT_MODES_DOREFA_LEVELS,
)

F32 = np.float32


def _scalar(x) -> float:
    return float(np.asarray(x).reshape(-1)[0])


# ---------------------------------------------------------------- SAT weights

def _c(h: str) -> np.float32:
    """A float32 constant written in hex, as in custom_ops/common/quant_math.h (no decimal rounding on either side)."""
    return F32(float.fromhex(h))


# onnxqat's float32 tanh (quant_math.h `tanh_f32`): the same IEEE float32 operations in the same order in numpy, C++
# and CUDA, so the three agree bit for bit (libm's tanhf, numpy's SIMD tanh and CUDA's tanhf each differ from each
# other by an ulp here and there). Checked on every float32 in [0, 11): at most 1.82 ulp from the exact tanh
# (99.7 % of them correctly rounded), increasing, odd, 1.0 from |x| = 9.01 as the exact tanh.
_TANH_SMALL = (_c("-0x1.55554ap-2"), _c("0x1.110d26p-3"), _c("-0x1.b9287ap-5"), _c("0x1.593d08p-6"),
               _c("-0x1.9b304cp-8"))  # x + x^3 P(x^2) on |x| < 0.55: minimax, relative error 1e-9
_TANH_EXP = (_c("0x1.fffffap-2"), _c("0x1.5553f0p-3"), _c("0x1.5558e0p-5"), _c("0x1.127b12p-7"),
             _c("0x1.6aab3cp-10"))  # e^r = 1 + r + r^2 P(r) on |r| <= ln2/2: minimax, relative error 2e-9
_TANH_SWITCH = _c("0x1.19999ap-1")  # 0.55
_LOG2E = _c("0x1.715476p+0")
_LN2_HI = _c("0x1.62e400p-1")  # 15 significant bits: k * LN2_HI is exact for the k here (k <= 127)
_TANH_CLAMP = F32(44.0)  # e^88 < FLT_MAX; tanh is 1.0 from |x| ~ 9.01, the clamp matters for sech2_f32 only
_LN2_LO = _c("0x1.7f7d1cp-20")
_SHIFTER = F32(12582912.0)
SAT_EXACT_VARIANCE_MAX_RANGE = 65535.0  # quant_math.h kSatExactVarianceMaxRange  # 1.5 * 2^23: (v + shifter) - shifter rounds v to an integer


def _tanh_poly(ax: np.ndarray) -> np.ndarray:
    z = ax * ax
    z2 = z * z
    s0, s1, s2, s3, s4 = _TANH_SMALL
    p = (s0 + s1 * z) + z2 * ((s2 + s3 * z) + z2 * s4)
    return ax + (ax * z) * p


def _tanh_complement(ax: np.ndarray) -> np.ndarray:
    """1 - tanh on the exp half: 2 / (e^{2|x|} + 1), e^y = 2^k e^r (Cody-Waite), |x| clamped to 44."""
    y = F32(2) * np.where(ax < _TANH_CLAMP, ax, _TANH_CLAMP)
    kf = (y * _LOG2E + _SHIFTER) - _SHIFTER
    r = (y - kf * _LN2_HI) - kf * _LN2_LO
    r2 = r * r
    r4 = r2 * r2
    e2, e3, e4, e5, e6 = _TANH_EXP
    q = ((F32(1) + r) + r2 * (e2 + e3 * r)) + r4 * ((e4 + e5 * r) + r2 * e6)
    two_k = ((kf.astype(np.int32) + 127) << 23).view(F32)  # 2^k (NaN and inf were clamped)
    return F32(2) / (q * two_k + F32(1))


def tanh_f32(w: np.ndarray) -> np.ndarray:
    """onnxqat's float32 tanh (see above): |x| < 0.55: x + x^3 P(x^2) (Estrin); else 1 - 2 / (e^{2|x|} + 1) with
    e^y = 2^k e^r (Cody-Waite reduction, |x| clamped to 44); sign copied from x; NaN stays NaN."""
    x = np.asarray(w, dtype=F32)
    with np.errstate(over="ignore", invalid="ignore"):
        ax = np.abs(x)
        t = np.where(ax < _TANH_SWITCH, _tanh_poly(ax), F32(1) - _tanh_complement(ax))
        return np.where(np.isnan(x), x, np.copysign(t, x)).astype(F32)


def sech2_f32(w: np.ndarray) -> np.ndarray:
    """tanh' = 1 - tanh^2 = sech^2 (quant_math.h `sech2_f32`): 1 - t^2 on the polynomial half; u (2 - u) with
    u = 1 - tanh on the exp half, which keeps its precision where 1 - t^2 cancels; 0 from |x| = 44 on."""
    x = np.asarray(w, dtype=F32)
    with np.errstate(over="ignore", invalid="ignore"):
        ax = np.abs(x)
        t = _tanh_poly(ax)
        u = _tanh_complement(ax)
        far = np.where(ax < _TANH_CLAMP, u * (F32(2) - u), F32(0))
        res = np.where(ax < _TANH_SWITCH, F32(1) - t * t, far)
        return np.where(np.isnan(x), x, res).astype(F32)


def sat_weight_max_tanh(w: np.ndarray) -> np.float32:
    """M = max|tanh(W)| (= tanh(max|W|): tanh_f32 is increasing); 1 when every weight is zero (keeps t/M and dW
    finite)."""
    m = np.max(np.abs(tanh_f32(w))) if w.size else F32(0)
    return F32(m) if m > 0 else F32(1)


def _sat_tn(w: np.ndarray) -> np.ndarray:
    """tn = tanh(W) / M in [-1, 1]."""
    return (tanh_f32(w) / sat_weight_max_tanh(w)).astype(F32)


def _half(r: np.float32, mode: int) -> np.float32:
    half = F32(np.floor(r / 2))
    if half < 1:  # R = 1: no level besides 0, and round(0 * tn) / 0 would be NaN
        raise ValueError(f"SAT weight mode {mode} (symmetric/asymmetric) needs R >= 2, got {r}")
    return half


def sat_fullrange_u(tn: np.ndarray, r: np.float32) -> np.ndarray:
    """(1 + 0.9998/R) (tn + 1)/2 - 0.4999/R (quant_math.h sat_fullrange_u, N2D2 FullRange)."""
    return ((F32(1) + F32(0.9998) / r) * ((tn + F32(1)) * F32(0.5)) - F32(0.4999) / r).astype(F32)


def sat_asym_q(tn: np.ndarray, half: np.float32) -> np.ndarray:
    """(1 + 1/(2h)) tn - 1/(2h) (quant_math.h sat_asym_q, N2D2 Asymmetric)."""
    return ((F32(1) + F32(1) / (F32(2) * half)) * tn - F32(1) / (F32(2) * half)).astype(F32)


def sat_weight_grad_gain(r: float, mode: int) -> np.float32:
    """d level / d tn of the stretching modes (full range, asymmetric), by which N2D2 multiplies the gradient; 1."""
    r = F32(r)
    if mode == SAT_MODE_FULLRANGE:
        return F32(F32(1) + F32(0.9998) / r)
    if mode in (SAT_MODE_ASYMMETRIC, SAT_MODE_ASYMMETRIC_CLAMP):
        return F32(F32(1) + F32(1) / (F32(2) * _half(r, mode)))
    return F32(1)


def sat_weight_index(tn: np.ndarray, r: float, mode: int) -> np.ndarray:
    """Level index j (integer-valued float32): DoReFa round(R (tn + 1) / 2) and full range round(R u) in [0, R];
    symmetric round(h tn) in [-h, h] and asymmetric round(h q) in [-h - 1, h], h = floor(R/2)."""
    r = F32(r)
    if mode == SAT_MODE_DOREFA:
        return np.round(r * ((tn + F32(1)) * F32(0.5))).astype(F32)
    if mode == SAT_MODE_FULLRANGE:
        return np.round(r * sat_fullrange_u(tn, r)).astype(F32)
    if mode == SAT_MODE_SYMMETRIC:
        return np.round(_half(r, mode) * tn).astype(F32)
    if mode == SAT_MODE_ASYMMETRIC:
        half = _half(r, mode)
        return np.round(half * sat_asym_q(tn, half)).astype(F32)
    raise ValueError(f"unknown SAT weight mode {mode}")


def sat_weight_unscaled(w: np.ndarray, r: float, mode: int) -> np.ndarray:
    """The levels before ApplyScaling: tn (clamp), q (asymmetric clamp), 2 j / R - 1 (DoReFa, full range),
    j / floor(R/2) (symmetric, asymmetric)."""
    tn = _sat_tn(w)
    if mode == SAT_MODE_CLAMP:
        return tn
    if mode == SAT_MODE_ASYMMETRIC_CLAMP:
        return sat_asym_q(tn, _half(F32(r), mode))
    j = sat_weight_index(tn, r, mode)
    r = F32(r)
    if mode in SAT_MODES_DOREFA_LEVELS:
        return (F32(2) * (j / r) - F32(1)).astype(F32)
    return (j / F32(np.floor(r / 2))).astype(F32)


def sat_weight_scale(w: np.ndarray, r: float, mode: int, fan_out: int) -> np.float32:
    """S = sqrt(n * Var(Wq)) with Bessel correction, n = fan_out; 1 without scaling (fan_out <= 0), for fewer than 2
    elements, when a weight is NaN or when Var is 0. For DoReFa and symmetric with R <= 65535, Var is that of the
    exact levels 2 j / R - 1 and j / floor(R/2), from exact integer sums of the indices j (the float32 levels differ
    from these by at most an ulp; the kernels' int64 sums stay exact up to 16 bits); for clamp and larger R, that of
    the float32 levels."""
    w = np.asarray(w, dtype=F32)
    if fan_out <= 0 or w.size < 2 or np.isnan(w).any():
        return F32(1)
    if mode in SAT_MODES_CLAMP or r > SAT_EXACT_VARIANCE_MAX_RANGE:
        var = float(np.var(sat_weight_unscaled(w, r, mode).astype(np.float64), ddof=1))
    else:
        tn = _sat_tn(w)
        j = sat_weight_index(tn, r, mode).astype(np.int64)
        n = int(j.size)
        num = n * int(np.sum(j * j)) - int(np.sum(j)) ** 2  # exact (Python integers)
        var_j = float(num) / float(n * (n - 1))
        rf = float(F32(r))
        half = float(np.floor(F32(r) / F32(2)))
        var = var_j * 4.0 / (rf * rf) if mode in SAT_MODES_DOREFA_LEVELS else var_j / (half * half)
    s = F32(np.sqrt(fan_out * var))
    return s if s > 0 else F32(1)


def sat_weight_forward(w, r, mode, fan_out) -> np.ndarray:
    r, mode = _scalar(r), int(_scalar(mode))
    wq = sat_weight_unscaled(w, r, mode)
    s = sat_weight_scale(w, r, mode, int(_scalar(fan_out)))
    return (wq / s).astype(F32)


def sat_weight_grad_factor(w, r, mode, fan_out) -> np.ndarray:
    """The derivative factor dWq/dW = sech^2(W) / (M * S / g) (float32: sech2_f32, M*S, / g, then one division; g the
    stretch of the full-range and asymmetric modes, 1 otherwise); M and S constants, rounding STE. SatWeightQuant's
    optional second output."""
    m = sat_weight_max_tanh(w)
    mode = int(_scalar(mode))
    s = sat_weight_scale(w, _scalar(r), mode, int(_scalar(fan_out)))
    ms = F32(F32(m * s) / sat_weight_grad_gain(_scalar(r), mode))
    return (sech2_f32(w) / ms).astype(F32)


def sat_weight_backward(dwq, w, r, mode, fan_out, factor=None) -> np.ndarray:
    """dW = dWq * (sech^2(W) / (M * S)): dWq times the derivative factor (SatWeightQuantGrad's optional
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
    inside = (vs > qn) & (vs < qp)  # strictly: at a bound the step moves, not v (LSQ paper Eq. 3, N2D2)
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
