"""LsqQuant / LsqQuantGrad (C++ through onnxruntime) against the numpy reference."""

from __future__ import annotations

import numpy as np
import pytest
from conftest import F32, I64, assert_sum_close, run_op

from onnxqat.ops import reference as ref

RANGES = (1, 3, 15, 255)


def _args(v, step, r, signed, g, axis):
    return [v.astype(F32), np.asarray(step, F32), np.array(r, F32), np.array(signed, I64), np.array(g, F32),
            np.array(axis, I64)]


def _dstep_terms(dy, v, step, r, signed, axis):
    """sum |dy * local| per step element (float64): the scale of the dstep sums."""
    qn, qp = ref.lsq_bounds(r, bool(signed))
    step = np.asarray(step, F32)
    s = ref._broadcast_step(step, v, axis)
    vs = (v / s).astype(F32)
    local = np.where(vs <= qn, F32(qn), np.where(vs >= qp, F32(qp), np.round(vs) - vs)).astype(F32)
    t = np.abs(dy.astype(np.float64) * local)
    if step.size == 1:
        return np.full(step.shape, t.sum())
    ax = axis % v.ndim
    return t.sum(axis=tuple(i for i in range(v.ndim) if i != ax)).reshape(step.shape)


def check(v, step, r, signed, g, axis, rng, dy=None, threads=0):
    args = _args(v, step, r, signed, g, axis)
    y = run_op("LsqQuant", args, threads=threads)[0]
    np.testing.assert_array_equal(y, ref.lsq_forward(*args))
    assert y.dtype == np.float32 and y.shape == v.shape
    if dy is None:
        dy = rng.normal(size=v.shape).astype(F32)
    dv, ds = run_op("LsqQuantGrad", [dy] + args, n_out=2, threads=threads)
    rdv, rds = ref.lsq_backward(dy, *args)
    np.testing.assert_array_equal(dv, rdv)
    assert ds.shape == np.asarray(step).shape and ds.dtype == np.float32
    terms = abs(g) * _dstep_terms(dy, args[0], args[1], r, signed, axis)
    assert_sum_close(ds, rds, terms, "dstep")
    return y, dv, ds


@pytest.mark.parametrize("r", RANGES)
@pytest.mark.parametrize("signed", [0, 1])
@pytest.mark.parametrize("step_shape", [(), (1,)])
def test_per_tensor(r, signed, step_shape):
    rng = np.random.default_rng(r + 1000 * signed + 7 * len(step_shape))
    v = (rng.normal(size=(6, 5, 4, 3)) * 0.8).astype(F32)
    v[0, 0, 0, :2] = [-10.0, 10.0]
    qn, qp = ref.lsq_bounds(r, bool(signed))
    step = np.full(step_shape, 1.6 / max(qp, 1), F32)
    g = 1 / np.sqrt(v.size * max(qp, 1))
    y, _, _ = check(v, step, r, signed, g, 0, rng)
    codes = np.round(y / step.reshape(-1)[0])
    assert codes.min() >= qn and codes.max() <= qp
    assert (codes == qp).any() and (codes == qn).any()  # both clip sides exercised


@pytest.mark.parametrize("r", RANGES)
@pytest.mark.parametrize("signed", [0, 1])
@pytest.mark.parametrize("axis", [0, 1, -1])
def test_per_channel(r, signed, axis):
    rng = np.random.default_rng(r + 100 * signed + 10 * (axis + 1))
    v = (rng.normal(size=(5, 6, 7)) * 0.8).astype(F32)
    c = v.shape[axis]
    _, qp = ref.lsq_bounds(r, bool(signed))
    step = (np.linspace(0.5, 2.0, c) / max(qp, 1)).astype(F32)
    check(v, step, r, signed, 0.01, axis, rng)


@pytest.mark.parametrize("axis", [0, 1])
def test_per_channel_conv_layouts(axis):
    # axis 0: Conv weight [C_out, C_in, kH, kW]; axis 1: NCHW activation
    rng = np.random.default_rng(axis)
    v = (rng.normal(size=(8, 6, 3, 3)) * 0.5).astype(F32)
    step = (rng.uniform(0.02, 0.2, size=v.shape[axis])).astype(F32)
    check(v, step, 15, 1 - axis, 0.05, axis, rng)


@pytest.mark.parametrize("signed", [0, 1])
def test_rounding_ties(signed):
    # step = 0.5 and v = (k + 0.5) / 2: v/s = k + 0.5 exactly; half to even
    r = 15
    qn, qp = ref.lsq_bounds(r, bool(signed))
    k = np.arange(qn, qp, dtype=F32)
    v = ((k + F32(0.5)) * F32(0.5)).astype(F32)
    vs = v / F32(0.5)
    assert (vs == np.floor(vs) + F32(0.5)).all()
    y, dv, ds = check(v, np.array(0.5, F32), r, signed, 1.0, 0, np.random.default_rng(1))
    np.testing.assert_array_equal(y / F32(0.5), np.round(vs))
    assert y[list(k).index(0)] == 0.0  # 0.5 -> 0
    assert y[list(k).index(1)] == 1.0  # 1.5 -> 2 (times the step 0.5)


@pytest.mark.filterwarnings("ignore::RuntimeWarning")  # numpy: inf/inf in the reference
def test_far_outside_and_edges():
    rng = np.random.default_rng(2)
    v = np.array([-3e38, -1e30, -100.0, -4.0, -0.0, 0.0, 3.5, 3.75, 100.0, 1e30, 3e38, np.inf, -np.inf], F32)
    y, dv, ds = check(v, np.array(0.5, F32), 15, 1, 0.1, 0, rng)
    assert y[0] == -4.0 and y[-3] == 3.5 and y[-1] == -4.0  # clipped to Qn*s = -4, Qp*s = 3.5
    # STE: dv passes strictly inside (Qn, Qp); at v/s = Qn (-4.0) and Qp (3.5) it is 0 (LSQ paper Eq. 3, N2D2)
    np.testing.assert_array_equal(dv == 0, [True, True, True, True, False, False, True, True, True, True, True,
                                            True, True])


@pytest.mark.parametrize("signed", [0, 1])
def test_bounds_partition_dv_and_dstep(signed):
    """At and beyond a bound the step takes the gradient (local factor Qn or Qp) and v none; inside, v takes dy
    and the step round(v/s) - v/s: each element feeds exactly one of them (the LSQ paper's Eq. 3 and 5)."""
    qn, qp = (-8.0, 7.0) if signed else (0.0, 15.0)
    s = np.float32(0.25)
    vs = np.array([qn - 1, qn, qn + 0.5, 0.25, qp - 0.5, qp, qp + 1], F32)
    v = (vs * s).astype(F32)
    dy = np.ones_like(v)
    dv, ds = ref.lsq_backward(dy, v, s, 15, signed, 1.0)
    inside = (vs > qn) & (vs < qp)
    np.testing.assert_array_equal(dv, inside.astype(F32))
    local = np.where(vs <= qn, qn, np.where(vs >= qp, qp, np.round(vs) - vs))
    assert ds == pytest.approx(float(local.sum()), abs=1e-6)
    got = run_op("LsqQuantGrad", [dy] + _args(v, np.array(s), 15, signed, 1.0, 0), n_out=2)
    np.testing.assert_array_equal(got[0], dv)
    np.testing.assert_allclose(got[1], ds, rtol=1e-6)


def test_one_element():
    rng = np.random.default_rng(3)
    check(np.array([0.37], F32), np.array([0.1], F32), 15, 1, 1.0, 0, rng)
    check(np.array(0.37, F32), np.array(0.1, F32), 15, 0, 1.0, 0, rng)
    check(np.array([[0.37]], F32), np.array([0.1], F32), 15, 1, 1.0, 1, rng)  # one channel = per tensor


@pytest.mark.parametrize("per_channel", [False, True])
def test_large_tensor_threads(per_channel):
    rng = np.random.default_rng(4)
    v = rng.normal(size=(1024, 1100)).astype(F32)  # 1.1M elements: 18 chunks
    step = rng.uniform(0.05, 0.3, size=1024).astype(F32) if per_channel else np.array(0.1, F32)
    check(v, step, 15, 1, 1e-3, 0, rng)
    dy = rng.normal(size=v.shape).astype(F32)
    a = run_op("LsqQuantGrad", [dy] + _args(v, step, 15, 1, 1e-3, 0), n_out=2, threads=1)
    b = run_op("LsqQuantGrad", [dy] + _args(v, step, 15, 1, 1e-3, 0), n_out=2, threads=2)
    for u, w in zip(a, b):
        np.testing.assert_array_equal(u, w)


def test_large_per_channel_last_axis():
    # channel axis last (one element per row): many channels, chunks start mid-row
    rng = np.random.default_rng(5)
    v = rng.normal(size=(300, 4099)).astype(F32)
    step = rng.uniform(0.05, 0.3, size=4099).astype(F32)
    check(v, step, 255, 0, 0.5, 1, rng)


def test_only_dstep_output():
    rng = np.random.default_rng(6)
    v = rng.normal(size=(10, 4)).astype(F32)
    dy = rng.normal(size=v.shape).astype(F32)
    args = [dy] + _args(v, np.array([0.2, 0.3, 0.4, 0.5], F32), 15, 1, 0.5, 1)
    (ds,) = run_op("LsqQuantGrad", args, n_out=2, out_names=["", "dstep"])
    _, rds = ref.lsq_backward(*args)
    assert_sum_close(ds, rds, 0.5 * _dstep_terms(dy, v, args[2], 15, 1, 1), "dstep")
