"""SatWeightQuant / SatWeightQuantGrad (C++ through onnxruntime) against the numpy reference."""

from __future__ import annotations

import numpy as np
import pytest
from conftest import F32, I64, run_op

from onnxqat.ops import reference as ref
from onnxqat.ops.schema import SAT_MODE_CLAMP, SAT_MODE_DOREFA, SAT_MODE_SYMMETRIC

RANGES = (1, 3, 15, 255)
MODES = (SAT_MODE_CLAMP, SAT_MODE_DOREFA, SAT_MODE_SYMMETRIC)


def _args(w, r, mode, fan):
    return [w.astype(F32), np.array(r, F32), np.array(mode, I64), np.array(fan, I64)]


def check_forward(w, r, mode, fan):
    """The kernel's tanh is correctly rounded, like the reference's: every output is bit-equal, except that the
    ApplyScaling factor S comes from double sums taken in another order (1 float32 ulp at most)."""
    args = _args(w, r, mode, fan)
    got = run_op("SatWeightQuant", args)[0]
    want = ref.sat_weight_forward(*args)
    assert got.shape == want.shape and got.dtype == np.float32
    assert np.isfinite(got).all()
    if fan > 0 and w.size >= 2:
        np.testing.assert_allclose(got, want, rtol=2.0**-22, atol=0)
        unscaled = run_op("SatWeightQuant", _args(w, r, mode, 0))[0]
        np.testing.assert_array_equal(unscaled, ref.sat_weight_forward(*_args(w, r, mode, 0)))
    else:
        np.testing.assert_array_equal(got, want)
    return got, want


def check_backward(w, r, mode, fan, rng):
    args = _args(w, r, mode, fan)
    dy = rng.normal(size=w.shape).astype(F32)
    got = run_op("SatWeightQuantGrad", [dy] + args)[0]
    want = ref.sat_weight_backward(dy, *args)
    assert got.shape == w.shape and got.dtype == np.float32
    assert np.isfinite(got).all()
    if fan > 0 and w.size >= 2:
        np.testing.assert_allclose(got, want, rtol=2.0**-21, atol=0)  # S: 1 ulp, then one more rounding
    else:
        np.testing.assert_array_equal(got, want)
    return got, want


@pytest.mark.parametrize("r", RANGES)
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("scaled", [False, True])
def test_forward_backward_random(r, mode, scaled):
    rng = np.random.default_rng(1000 * r + 10 * mode + scaled)
    w = (rng.normal(size=(16, 8, 3, 3)) * 0.7).astype(F32)
    fan = 16 * 9 if scaled else 0
    if mode == SAT_MODE_SYMMETRIC and r < 2:
        # floor(R/2) = 0 levels: rejected (test_bad_inputs checks the message), by the reference as well
        with pytest.raises(Exception, match="symmetric"):
            run_op("SatWeightQuant", _args(w, r, mode, fan))
        return
    got, want = check_forward(w, r, mode, fan)
    if mode != SAT_MODE_CLAMP:
        # the levels really are quantized: at most R+1 distinct values
        assert len(np.unique(got)) <= r + 1
    check_backward(w, r, mode, fan, rng)


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("fan", [0, 9])
def test_all_zero_weights(mode, fan):
    # M = 1 by definition; DoReFa: R*u = R/2, an exact tie for odd R (rounds half to even); Var = 0 -> S = 1
    w = np.zeros((4, 9), F32)
    for r in (3, 15, 255):
        got, want = check_forward(w, r, mode, fan)
        if mode == SAT_MODE_DOREFA:
            # round(R/2) half to even: R=3 -> 2 -> 2*2/3-1 = 1/3; R=15 -> 8 -> 1/15; R=255 -> 128 -> 1/255
            expect = {3: 2 * F32(2) / F32(3) - 1, 15: 2 * (F32(8) / F32(15)) - 1, 255: 2 * (F32(128) / F32(255)) - 1}
            np.testing.assert_array_equal(got, np.full(w.shape, expect[r], F32))
        else:
            np.testing.assert_array_equal(got, np.zeros_like(w))
        rng = np.random.default_rng(r)
        dw, _ = check_backward(w, r, mode, fan, rng)


@pytest.mark.parametrize("mode", MODES)
def test_one_element(mode):
    w = np.array([0.3], F32)
    for fan in (0, 5):
        got, want = check_forward(w, 15, mode, fan)
        if mode == SAT_MODE_CLAMP:
            np.testing.assert_array_equal(got, [1.0])  # t/M with M = |t|
        check_backward(w, 15, mode, fan, np.random.default_rng(0))


@pytest.mark.parametrize("mode", MODES)
def test_far_outside(mode):
    # |W| large: tanh saturates at +-1, 1 - t^2 = 0 (no gradient), no NaN
    w = np.array([-1e30, -50.0, -3.0, 0.0, 0.01, 3.0, 50.0, 1e30, 3e38], F32)
    got, want = check_forward(w, 15, mode, 0)
    assert got[0] == -1.0 and got[-1] == 1.0
    dw, _ = check_backward(w, 15, mode, 0, np.random.default_rng(1))
    assert dw[0] == 0 and dw[-1] == 0


def test_scalar_weight_shape():
    w = np.array(0.5, F32)  # rank 0
    got = run_op("SatWeightQuant", _args(w, 15, SAT_MODE_DOREFA, 0))[0]
    assert got.shape == () and got == 1.0


@pytest.mark.parametrize("mode", [SAT_MODE_DOREFA, SAT_MODE_CLAMP])
def test_large_tensor_threads(mode):
    # > 1M elements: several parallel chunks (64K each) for tanh/max, the variance sums and the gradient
    rng = np.random.default_rng(7)
    w = (rng.normal(size=(1200, 1001)) * 0.5).astype(F32)
    w[1100, 1000] = 4.0  # the max sits in the last chunk
    check_forward(w, 15, mode, 1200)
    check_backward(w, 15, mode, 1200, rng)


def test_threads_agree_with_serial():
    rng = np.random.default_rng(8)
    w = (rng.normal(size=(1 << 20) + 17) * 0.5).astype(F32)
    args = _args(w, 15, SAT_MODE_DOREFA, 64)
    dy = rng.normal(size=w.shape).astype(F32)
    a = run_op("SatWeightQuant", args, threads=1)[0]
    b = run_op("SatWeightQuant", args, threads=2)[0]
    np.testing.assert_array_equal(a, b)  # fixed chunks, fixed combination order: deterministic
    a = run_op("SatWeightQuantGrad", [dy] + args, threads=1)[0]
    b = run_op("SatWeightQuantGrad", [dy] + args, threads=2)[0]
    np.testing.assert_array_equal(a, b)


def test_scaling_factor_value():
    # ApplyScaling divides by S = sqrt(n Var(Wq)) (Bessel): check S itself from the outputs
    rng = np.random.default_rng(3)
    w = rng.normal(size=(32, 16)).astype(F32)
    unscaled = run_op("SatWeightQuant", _args(w, 15, SAT_MODE_DOREFA, 0))[0]
    scaled = run_op("SatWeightQuant", _args(w, 15, SAT_MODE_DOREFA, 32))[0]
    s = np.sqrt(32 * np.var(unscaled.astype(np.float64), ddof=1))
    np.testing.assert_allclose(scaled, unscaled / s, rtol=1e-6)
    assert abs(np.std(scaled.astype(np.float64), ddof=1) * np.sqrt(32) - 1) < 1e-6


def test_symmetric_r1_rejected_by_reference_too():
    with pytest.raises(ValueError, match="R >= 2"):
        ref.sat_weight_forward(np.ones(3, F32), 1.0, SAT_MODE_SYMMETRIC, 0)


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("fan", [0, 144])
def test_derivative_factor_output_and_grad_input(mode, fan):
    """The optional second output dWq_dW = (1 - t^2)/(M S) equals the reference factor; the gradient op given it
    returns dWq * dWq_dW, bit-equal to the gradient op that recomputes the factor from W (same M, same S)."""
    rng = np.random.default_rng(11 + mode + fan)
    w = (rng.normal(size=(16, 8, 3, 3)) * 0.7).astype(F32)
    w[3, 2, 1, 1] = 10.0  # saturated element (tanh = 1.0f): factor 0
    args = _args(w, 15, mode, fan)
    wq1 = run_op("SatWeightQuant", args)[0]
    wq, f = run_op("SatWeightQuant", args, n_out=2)
    np.testing.assert_array_equal(wq, wq1)  # the extra output changes nothing
    want_f = ref.sat_weight_grad_factor(*args)
    assert f.shape == w.shape and f.dtype == np.float32
    if fan:
        np.testing.assert_allclose(f, want_f, rtol=2.0**-22, atol=0)  # S: 1 ulp at most
    else:
        np.testing.assert_array_equal(f, want_f)
    assert f[3, 2, 1, 1] == 0
    dy = rng.normal(size=w.shape).astype(F32)
    dw = run_op("SatWeightQuantGrad", [dy] + args + [f])[0]
    np.testing.assert_array_equal(dw, dy * f)
    np.testing.assert_array_equal(dw, ref.sat_weight_backward(dy, *args, factor=f))
    np.testing.assert_array_equal(dw, run_op("SatWeightQuantGrad", [dy] + args)[0])  # no factor: recomputed


def test_derivative_factor_large_tensor_threads():
    rng = np.random.default_rng(12)
    w = (rng.normal(size=(1 << 20) + 5) * 0.5).astype(F32)
    for fan in (0, 64):
        args = _args(w, 15, SAT_MODE_DOREFA, fan)
        a = run_op("SatWeightQuant", args, n_out=2, threads=1)
        b = run_op("SatWeightQuant", args, n_out=2, threads=2)
        np.testing.assert_array_equal(a[0], b[0])
        np.testing.assert_array_equal(a[1], b[1])
        np.testing.assert_array_equal(a[0], run_op("SatWeightQuant", args)[0])
        if not fan:
            np.testing.assert_array_equal(a[1], ref.sat_weight_grad_factor(*args))


def test_grad_factor_shape_mismatch_rejected():
    w = np.ones((4, 3), F32)
    args = _args(w, 15, SAT_MODE_DOREFA, 0)
    with pytest.raises(Exception, match="dWq_dW has shape"):
        run_op("SatWeightQuantGrad", [w] + args + [np.ones((3, 4), F32)])


def _float_sweep(lo=2.0**-30, hi=12.0, stride=127):
    """Every `stride`-th float32 in [lo, hi) (all binades between), both signs, and 10.0 (tanh = 1.0f: M = 1)."""
    b = np.arange(np.float32(lo).view(np.int32), np.float32(hi).view(np.int32), stride, dtype=np.int32)
    x = b.view(F32)
    return np.concatenate([x, -x, np.float32([10.0, 0.0, -0.0])])


def test_tanh_sweep_is_correctly_rounded():
    """Clamp mode with M = 1 outputs tanh itself: bit-equal to the reference's correctly rounded tanh on ~4.4M floats
    over 34 binades (the kernel's fast tanh path and its exact fallback for the ambiguous elements); the factor is
    1 - t^2."""
    w = _float_sweep()
    args = _args(w, 15, SAT_MODE_CLAMP, 0)
    t, f = run_op("SatWeightQuant", args, n_out=2)
    want = ref.tanh_f32(w)
    np.testing.assert_array_equal(t, want)
    np.testing.assert_array_equal(f, (F32(1) - want * want).astype(F32))


def test_tanh_plain_path_agrees(tmp_path):
    """ONNXQAT_PLAIN_TANH=1 selects the plain tanh (no FMA fast path): same bits."""
    import os
    import subprocess
    import sys

    from onnxqat.ops.library import library_path

    w = _float_sweep(stride=997)
    np.save(tmp_path / "w.npy", w)
    code = ("import sys, numpy as np; sys.path.insert(0, sys.argv[2]); from conftest import run_op, F32, I64; "
            "w = np.load(sys.argv[1]); "
            "t = run_op('SatWeightQuant', [w, np.array(15, F32), np.array(0, I64), np.array(0, I64)])[0]; "
            "np.save(sys.argv[1], t)")
    env = dict(os.environ, ONNXQAT_PLAIN_TANH="1", ONNXQAT_OPS_LIBRARY=library_path())
    out = subprocess.run([sys.executable, "-c", code, str(tmp_path / "w.npy"), os.path.dirname(__file__)],
                         env=env, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    plain = np.load(tmp_path / "w.npy")
    fast = run_op("SatWeightQuant", _args(w, 15, SAT_MODE_CLAMP, 0))[0]
    np.testing.assert_array_equal(plain, fast)
    np.testing.assert_array_equal(fast, ref.tanh_f32(w))
