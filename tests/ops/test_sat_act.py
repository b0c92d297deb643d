"""SatActQuant / SatActQuantGrad (C++ through onnxruntime) against the numpy reference."""

from __future__ import annotations

import numpy as np
import pytest
from conftest import F32, assert_sum_close, run_op

from onnxqat.ops import reference as ref

RANGES = (1, 3, 15, 255)


def _terms(dy, x, alpha, r):
    """|dy * local| per element (the dalpha sum's terms), in float64."""
    a = F32(abs(float(np.asarray(alpha).reshape(-1)[0])))
    r = F32(r)
    xa = (x / a).astype(F32)
    middle = (np.round(r * x / a) / r - xa).astype(F32)
    local = np.where(x >= a, F32(1), np.where(x > 0, middle, F32(0)))
    return np.abs(dy.astype(np.float64) * local)


def check(x, alpha, r, rng, dy=None):
    alpha = np.asarray(alpha, F32)
    args = [x.astype(F32), alpha, np.array(r, F32)]
    y = run_op("SatActQuant", args)[0]
    np.testing.assert_array_equal(y, ref.sat_act_forward(*args))
    assert y.dtype == np.float32 and y.shape == x.shape
    if dy is None:
        dy = rng.normal(size=x.shape).astype(F32)
    dx, da = run_op("SatActQuantGrad", [dy] + args, n_out=2)
    rdx, rda = ref.sat_act_backward(dy, *args)
    np.testing.assert_array_equal(dx, rdx)
    assert da.shape == alpha.shape and da.dtype == np.float32
    assert_sum_close(da, rda, _terms(dy, x, alpha, r).sum(), "dalpha")
    return y, dx, da


@pytest.mark.parametrize("r", RANGES)
@pytest.mark.parametrize("alpha", [0.5, 2.0, 6.0])
@pytest.mark.parametrize("alpha_shape", [(), (1,)])
def test_random(r, alpha, alpha_shape):
    rng = np.random.default_rng(r * 7 + int(alpha * 10) + len(alpha_shape))
    x = (rng.normal(size=(8, 3, 7, 5)) * alpha).astype(F32)  # negatives, inside and above alpha
    y, dx, da = check(x, np.full(alpha_shape, alpha, F32), r, rng)
    assert len(np.unique(y)) <= r + 1
    assert (x > alpha).any() and (x < 0).any()


@pytest.mark.parametrize("r", RANGES)
def test_rounding_ties(r):
    # alpha = R and x = k + 0.5: R*x/alpha = k + 0.5 exactly; numpy rounds half to even, and so must the kernel
    x = (np.arange(r + 1, dtype=F32) + F32(0.5)).astype(F32)
    z = F32(r) * x / F32(r)
    assert (z == np.floor(z) + F32(0.5)).all()
    y, dx, da = check(x, np.array([r], F32), r, np.random.default_rng(r))
    inside = x < r
    np.testing.assert_array_equal(y[inside], np.round(x[inside]))  # half to even: 0.5 -> 0, 1.5 -> 2, 2.5 -> 2
    if r >= 3:
        assert y[0] == 0 and y[1] == 2 and y[2] == 2


@pytest.mark.filterwarnings("ignore::RuntimeWarning")  # numpy: R * 3e38 overflows in the reference too
def test_edges_and_far_outside():
    rng = np.random.default_rng(5)
    a = F32(1.5)
    x = np.array([-1e30, -3e38, -1.0, -0.0, 0.0, 1e-30, 0.7, a, np.nextafter(a, F32(9)), 10.0, 1e30, 3e38], F32)
    y, dx, da = check(x, np.array(a, F32), 15, rng)
    np.testing.assert_array_equal(y[:6], 0)
    np.testing.assert_array_equal(y[7:], a)
    # dx passes only for 0 < x <= alpha
    assert (dx[[0, 1, 2, 3, 4, 8, 9, 10, 11]] == 0).all() and dx[7] != 0


def test_one_element():
    rng = np.random.default_rng(6)
    for v in (-1.0, 0.3, 5.0):
        check(np.array([v], F32), np.array([2.0], F32), 3, rng)
    check(np.array(0.3, F32), np.array(2.0, F32), 3, rng)  # rank 0


def test_empty():
    y = run_op("SatActQuant", [np.zeros((0, 4), F32), np.array([1.0], F32), np.array(3, F32)])[0]
    assert y.shape == (0, 4)
    dx, da = run_op("SatActQuantGrad", [np.zeros((0, 4), F32), np.zeros((0, 4), F32), np.array([1.0], F32),
                                        np.array(3, F32)], n_out=2)
    assert dx.shape == (0, 4) and da.tolist() == [0.0]


def test_large_tensor_threads():
    rng = np.random.default_rng(9)
    x = (rng.normal(size=(3, 1 << 19)) * 2).astype(F32)  # 1.5M elements: 24 chunks
    check(x, np.array([2.5], F32), 15, rng)
    args = [x, np.array([2.5], F32), np.array(15, F32)]
    dy = rng.normal(size=x.shape).astype(F32)
    a = run_op("SatActQuantGrad", [dy] + args, n_out=2, threads=1)
    b = run_op("SatActQuantGrad", [dy] + args, n_out=2, threads=2)
    for u, v in zip(a, b):
        np.testing.assert_array_equal(u, v)


def test_only_dalpha_output():
    # ORT training leaves GI(0) out when x needs no gradient: the kernel computes what is asked for
    rng = np.random.default_rng(10)
    x = rng.normal(size=(64,)).astype(F32)
    dy = rng.normal(size=x.shape).astype(F32)
    args = [dy, x, np.array([1.0], F32), np.array(3, F32)]
    (da,) = run_op("SatActQuantGrad", args, n_out=2, out_names=["", "dalpha"])
    _, rda = ref.sat_act_backward(*args)
    assert_sum_close(da, rda, _terms(dy, x, np.array([1.0]), 3).sum(), "dalpha")
