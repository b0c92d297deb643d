"""SatWeightQuant / SatWeightQuantGrad (C++ through onnxruntime) against the numpy reference."""

from __future__ import annotations

import numpy as np
import pytest
from conftest import F32, I64, run_op

from onnxqat.ops import reference as ref
from onnxqat.ops.schema import (
    SAT_MODE_ASYMMETRIC,
    SAT_MODE_ASYMMETRIC_CLAMP,
    SAT_MODE_CLAMP,
    SAT_MODE_DOREFA,
    SAT_MODE_FULLRANGE,
    SAT_MODE_SYMMETRIC,
    SAT_MODES_CLAMP,
    SAT_MODES_HALF,
)

RANGES = (1, 3, 15, 255)
MODES = (SAT_MODE_CLAMP, SAT_MODE_DOREFA, SAT_MODE_SYMMETRIC, SAT_MODE_FULLRANGE, SAT_MODE_ASYMMETRIC,
         SAT_MODE_ASYMMETRIC_CLAMP)


def _args(w, r, mode, fan):
    return [w.astype(F32), np.array(r, F32), np.array(mode, I64), np.array(fan, I64)]


def _s_exact(mode, fan, w, r=15):
    """ApplyScaling's S is bit-equal to the reference's for DoReFa and symmetric up to R = 65535 (exact integer
    variance of the level indices); in clamp mode and above, it comes from double sums taken in another order
    (1 float32 ulp at most)."""
    return not (fan > 0 and w.size >= 2 and (mode in SAT_MODES_CLAMP or r > 65535))


def check_forward(w, r, mode, fan):
    """The kernel evaluates the reference's operations (onnxqat's float32 tanh included): bit-equal outputs, except
    S in clamp mode with ApplyScaling (see _s_exact)."""
    args = _args(w, r, mode, fan)
    got = run_op("SatWeightQuant", args)[0]
    want = ref.sat_weight_forward(*args)
    assert got.shape == want.shape and got.dtype == np.float32
    assert np.isfinite(got).all()
    if _s_exact(mode, fan, w, r):
        np.testing.assert_array_equal(got, want)
    else:
        np.testing.assert_allclose(got, want, rtol=2.0**-22, atol=0)
        unscaled = run_op("SatWeightQuant", _args(w, r, mode, 0))[0]
        np.testing.assert_array_equal(unscaled, ref.sat_weight_forward(*_args(w, r, mode, 0)))
    return got, want


def check_backward(w, r, mode, fan, rng):
    args = _args(w, r, mode, fan)
    dy = rng.normal(size=w.shape).astype(F32)
    got = run_op("SatWeightQuantGrad", [dy] + args)[0]
    want = ref.sat_weight_backward(dy, *args)
    assert got.shape == w.shape and got.dtype == np.float32
    assert np.isfinite(got).all()
    if _s_exact(mode, fan, w, r):
        np.testing.assert_array_equal(got, want)
    else:
        np.testing.assert_allclose(got, want, rtol=2.0**-21, atol=0)  # S: 1 ulp, then one more rounding
    return got, want


@pytest.mark.parametrize("r", RANGES)
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("scaled", [False, True])
def test_forward_backward_random(r, mode, scaled):
    rng = np.random.default_rng(1000 * r + 10 * mode + scaled)
    w = (rng.normal(size=(16, 8, 3, 3)) * 0.7).astype(F32)
    fan = 16 * 9 if scaled else 0
    if mode in SAT_MODES_HALF and r < 2:
        # floor(R/2) = 0 levels: rejected (test_bad_inputs checks the message), by the reference as well
        with pytest.raises(Exception, match="symmetric"):
            run_op("SatWeightQuant", _args(w, r, mode, fan))
        return
    got, want = check_forward(w, r, mode, fan)
    if mode not in SAT_MODES_CLAMP:
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
        elif mode in (SAT_MODE_CLAMP, SAT_MODE_SYMMETRIC, SAT_MODE_ASYMMETRIC):
            # asymmetric: h q = -1/2 rounds half to even to 0
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
    # asymmetric: one more level below -1, (-h - 1) / h = -8/7 at R = 15 (h = 7); its clamp phase reaches it too
    low = F32(-8) / F32(7) if mode in (SAT_MODE_ASYMMETRIC, SAT_MODE_ASYMMETRIC_CLAMP) else -1.0
    if mode == SAT_MODE_ASYMMETRIC_CLAMP:  # float32 q(+-1): within an ulp of 1 and -8/7 (equal to the reference)
        np.testing.assert_allclose(got[[0, -1]], [low, 1.0], rtol=2e-7)
    else:
        assert got[0] == low and got[-1] == 1.0
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
    """The optional second output dWq_dW = sech^2(W)/(M S) equals the reference factor; the gradient op given it
    returns dWq * dWq_dW, bit-equal to the gradient op that recomputes the factor from W (same M, same S)."""
    rng = np.random.default_rng(11 + mode + fan)
    w = (rng.normal(size=(16, 8, 3, 3)) * 0.7).astype(F32)
    w[3, 2, 1, 1] = 10.0  # saturated element (tanh = 1.0f, so 1 - t^2 would be 0): factor sech^2(10) / (M S)
    args = _args(w, 15, mode, fan)
    wq1 = run_op("SatWeightQuant", args)[0]
    wq, f = run_op("SatWeightQuant", args, n_out=2)
    np.testing.assert_array_equal(wq, wq1)  # the extra output changes nothing
    want_f = ref.sat_weight_grad_factor(*args)
    assert f.shape == w.shape and f.dtype == np.float32
    if _s_exact(mode, fan, w):
        np.testing.assert_array_equal(f, want_f)
    else:
        np.testing.assert_allclose(f, want_f, rtol=2.0**-22, atol=0)  # S: 1 ulp at most
    # the ratio of two factors is the ratio of the true sech^2 (M S cancels): accurate where 1 - t^2 is 0
    want_ratio = np.cosh(np.float64(w[0, 0, 0, 0])) ** 2 / np.cosh(10.0) ** 2
    assert f[3, 2, 1, 1] / np.float64(f[0, 0, 0, 0]) == pytest.approx(want_ratio, rel=1e-6)
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


def test_tanh_sweep_matches_reference():
    """Clamp mode with M = 1 outputs tanh itself: bit-equal to the reference's tanh_f32 on ~4.4M floats over 34
    binades; the factor is sech2_f32."""
    w = _float_sweep()
    args = _args(w, 15, SAT_MODE_CLAMP, 0)
    t, f = run_op("SatWeightQuant", args, n_out=2)
    want = ref.tanh_f32(w)
    np.testing.assert_array_equal(t, want)
    np.testing.assert_array_equal(f, ref.sech2_f32(w))


def _ulps(got: np.ndarray, exact: np.ndarray) -> np.ndarray:
    """|got - exact| in units of the float32 spacing at the correctly rounded value (exact: float64)."""
    cr = exact.astype(F32)
    spacing = np.spacing(np.abs(cr)).astype(np.float64)
    return np.abs(got.astype(np.float64) - exact) / spacing


def test_reference_tanh_accuracy():
    """onnxqat's tanh against float64 tanh (independent): at most 1.82 ulp (measured over every float32 in [0, 11)
    with a C copy of the function: 1.811), correctly rounded on > 98 % of the sweep, exactly 1.0 from the first float
    whose correctly rounded tanh is 1.0, odd, NaN/inf handled."""
    w = _float_sweep(stride=61)
    t = ref.tanh_f32(w)
    exact = np.tanh(w.astype(np.float64))
    err = _ulps(t, exact)
    assert err.max() <= 1.82
    assert np.mean(t == exact.astype(F32)) > 0.98
    np.testing.assert_array_equal(ref.tanh_f32(-w), -t)
    edge = np.float32([np.inf, -np.inf, np.nan, 0.0, -0.0, 1e-45, 9.0, 9.02, 3.4e38])
    te = ref.tanh_f32(edge)
    assert te[0] == 1 and te[1] == -1 and np.isnan(te[2])
    assert te[3] == 0 and not np.signbit(te[3]) and te[4] == 0 and np.signbit(te[4])
    assert te[5] == F32(1e-45)  # x + x^3 P: x for tiny x (denormal)
    np.testing.assert_array_equal(te[6:], np.tanh(edge[6:].astype(np.float64)).astype(F32))


def test_kernel_tanh_increasing_on_every_float():
    """M = max|tanh W| is computed as tanh(max|W|), which needs tanh increasing: checked on every float32 in
    [0, 10] through the kernel (clamp mode, M = tanh(10) = 1, so the output is tanh itself), in chunks."""
    top = int(np.float32(10.0).view(np.int32))
    chunk = 1 << 25
    prev = F32(0)
    for lo in range(0, top + 1, chunk):
        w = np.arange(lo, min(lo + chunk, top + 1), dtype=np.int32).view(F32)
        t = run_op("SatWeightQuant", _args(np.append(w, F32(10.0)), 15, SAT_MODE_CLAMP, 0))[0][:-1]
        assert t[0] >= prev and np.all(t[1:] >= t[:-1]), f"tanh decreases in the chunk from {w[0]}"
        prev = t[-1]
    assert prev == 1.0


@pytest.mark.parametrize("fan", [0, 9])
@pytest.mark.parametrize("mode", MODES)
def test_nan_weight_matches_reference(mode, fan):
    """A NaN weight: M = 1 and S = 1 (as the reference: max and Var are NaN, not > 0), NaN at that element only."""
    w = np.array([[0.5, -0.2, np.nan], [0.1, 0.9, -1.5]], F32)
    args = _args(w, 15, mode, fan)
    got = run_op("SatWeightQuant", args)[0]
    want = ref.sat_weight_forward(*args)
    np.testing.assert_array_equal(got, want)  # NaNs compare equal here
    assert np.isnan(got[0, 2]) and np.isfinite(np.delete(got.ravel(), 2)).all()
    if mode == SAT_MODE_CLAMP:
        np.testing.assert_array_equal(got[1], ref.tanh_f32(w[1]))  # t / M with M = 1
    rng = np.random.default_rng(5)
    dy = rng.normal(size=w.shape).astype(F32)
    np.testing.assert_array_equal(run_op("SatWeightQuantGrad", [dy] + args)[0], ref.sat_weight_backward(dy, *args))


@pytest.mark.parametrize("fan", [0, 64])
@pytest.mark.parametrize("mode", MODES)
def test_small_weight_blocks(mode, fan):
    """Blocks (512 elements) whose |W| all lie below 0.55 take tanh's polynomial alone: the same bits as the
    reference; one block holds a single larger weight (both halves), one a value just below the switch point."""
    rng = np.random.default_rng(21 + mode + fan)
    w = (0.05 * rng.normal(size=3000)).astype(F32)
    w[700] = 0.6
    w[1800] = np.nextafter(F32(0.55), F32(0))
    w[2500] = F32(0.55)
    if mode == SAT_MODE_SYMMETRIC:
        check_forward(w, 15, mode, fan)
    else:
        check_forward(w, 255, mode, fan)
    check_backward(w, 15, mode, fan, rng)
    wq, f = run_op("SatWeightQuant", _args(w, 15, mode, fan), n_out=2)
    assert_factor = np.testing.assert_array_equal if _s_exact(mode, fan, w) else (
        lambda a, b: np.testing.assert_allclose(a, b, rtol=2.0**-22, atol=0))
    assert_factor(f, ref.sat_weight_grad_factor(*_args(w, 15, mode, fan)))


@pytest.mark.parametrize("mode", [SAT_MODE_DOREFA, SAT_MODE_SYMMETRIC])
def test_scaling_above_16_bits_uses_level_sums(mode):
    """R > 65535: S comes from double sums of the levels (reference: their float64 variance), within an ulp. With
    R = 2^24 on 10^6 weights the int64 sums of j^2 that serve R <= 65535 would overflow (sum j^2 > 2^63)."""
    rng = np.random.default_rng(31 + mode)
    w = (0.5 * rng.normal(size=1_000_000)).astype(F32)
    r = float(2**24)
    tn = ref.tanh_f32(w) / ref.sat_weight_max_tanh(w)
    j = ref.sat_weight_index(tn.astype(F32), r, mode).astype(np.float64)
    assert np.sum(j * j) > 2.0**63  # the case the fallback exists for
    check_forward(w, r, mode, 64)
    check_backward(w, r, mode, 64, rng)
    got = run_op("SatWeightQuant", _args(w, r, mode, 64))[0]
    assert abs(np.std(got.astype(np.float64), ddof=1) * np.sqrt(64) - 1) < 1e-6


def test_sech2_is_accurate_where_one_minus_tanh_squared_cancels():
    """sech^2 = tanh' on 2,000,001 points of [0, 44): within 4 ulp of float64's 1/cosh^2 (1 - tanh_f32^2 is 6 % off at
    |w| = 8 and 0 from |w| ~ 9.01, where tanh_f32 is 1.0f); 0 from 44 on; tanh's bits are those of 1 - u."""
    x = np.linspace(0, 43.9, 2_000_001).astype(F32)
    got = ref.sech2_f32(x).astype(np.float64)
    exact = 1 / np.cosh(x.astype(np.float64)) ** 2
    ulp = np.spacing(exact.astype(F32)).astype(np.float64)
    assert np.max(np.abs(got - exact) / ulp) <= 4.0
    assert ref.sech2_f32(np.array([44.0, 1e30, np.inf], F32)).tolist() == [0.0, 0.0, 0.0]
    assert np.isnan(ref.sech2_f32(np.array([np.nan], F32))[0])
    np.testing.assert_array_equal(ref.sech2_f32(-x), ref.sech2_f32(x))  # even
    assert ref.tanh_f32(np.array([9.02, 10.0, 43.0, 1e30], F32)).tolist() == [1.0, 1.0, 1.0, 1.0]


@pytest.mark.parametrize("fan", [0, 32])
def test_factor_bit_equal_to_the_reference_on_large_weights(fan):
    """C++ against numpy on weights up to |w| = 50 (the exp half, the clamp, the zeros beyond it)."""
    rng = np.random.default_rng(12)
    w = (rng.uniform(-50, 50, size=(8, 4, 3, 3))).astype(F32)
    w.reshape(-1)[:6] = [0.0, -0.3, 0.55, 8.0, -9.5, 44.0]
    args = _args(w, 15, SAT_MODE_DOREFA, fan)
    _, f = run_op("SatWeightQuant", args, n_out=2)
    np.testing.assert_array_equal(f, ref.sat_weight_grad_factor(*args))
    dy = rng.normal(size=w.shape).astype(F32)
    np.testing.assert_array_equal(run_op("SatWeightQuantGrad", [dy] + args)[0], ref.sat_weight_backward(dy, *args))
