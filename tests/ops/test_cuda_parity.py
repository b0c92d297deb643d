"""CUDA kernels (custom_ops/cuda) against the numpy reference and the CPU kernels.

The kernels are reached through libonnxqat_cuda_kernels.so (custom_ops/cuda/c_api.h): a C entry point that takes
host arrays, copies them to the GPU, runs the same launchers the ORT CUDA kernels run, and copies the results back,
so these tests need neither onnxruntime's CUDA provider nor a GPU build of onnxruntime.

- Tests marked `gpu` skip, with the reason, when the library is not built or no CUDA device answers.
- The argument checks run on the host before any CUDA call: those tests run wherever the library is built.

Exactness: forward outputs, dx, dv and every SatWeight output must equal the reference bit for bit (same float32
operations, onnxqat's own tanh_f32, IEEE division, round-half-to-even, no FMA contraction; ApplyScaling's S from exact
integer sums of the level indices). The float64 sums in another order (dalpha, dstep, and S in clamp mode) may
differ by one float32 ulp plus 1e-12 of the sum of |terms|.
"""

from __future__ import annotations

import ctypes
import os
import sysconfig
from pathlib import Path

import numpy as np
import pytest

from onnxqat.ops import reference as ref
from onnxqat.ops.schema import (
    SAT_MODE_ASYMMETRIC,
    SAT_MODE_ASYMMETRIC_CLAMP,
    SAT_MODE_CLAMP,
    SAT_MODE_DOREFA,
    SAT_MODE_FULLRANGE,
    SAT_MODE_SYMMETRIC,
    SAT_MODES_CLAMP,
)

F32 = np.float32
LIB_NAME = "libonnxqat_cuda_kernels.so"
ENV_VAR = "ONNXQAT_CUDA_KERNELS"
REPO = Path(__file__).resolve().parents[2]

OQC_OK, OQC_INVALID_ARGUMENT, OQC_CUDA_ERROR = 0, 1, 2


# --------------------------------------------------------------------------------------------- the C library


def library_candidates() -> list[Path]:
    """Where libonnxqat_cuda_kernels.so may be: beside libonnxqat_ops.so (installed package, site-packages copy of
    an editable install) or in a CMake build under the repository's build/ folder (newest first)."""
    import onnxqat

    paths = [Path(p) / "lib" / LIB_NAME for p in onnxqat.__path__]
    for key in ("platlib", "purelib"):
        p = Path(sysconfig.get_paths()[key]) / "onnxqat" / "lib" / LIB_NAME
        if p not in paths:
            paths.append(p)
    build = REPO / "build"
    if build.is_dir():
        paths += sorted(build.glob(f"**/{LIB_NAME}"), key=lambda p: p.stat().st_mtime, reverse=True)
    return paths


class CudaOpError(RuntimeError):
    def __init__(self, code: int, message: str):
        super().__init__(message)
        self.code = code


_I64P = ctypes.POINTER(ctypes.c_int64)
_F32P = ctypes.POINTER(ctypes.c_float)


def _fp(a: np.ndarray | None):
    return None if a is None else a.ctypes.data_as(_F32P)


def _shape(shape) -> tuple[ctypes.Array, int]:
    arr = (ctypes.c_int64 * max(len(shape), 1))(*shape)
    return arr, len(shape)


class Kernels:
    """numpy-facing wrapper of c_api.h."""

    def __init__(self, lib: ctypes.CDLL):
        self.lib = lib
        lib.oqc_last_error.restype = ctypes.c_char_p
        lib.oqc_device_count.argtypes = [ctypes.POINTER(ctypes.c_int)]
        lib.oqc_device_name.argtypes = [ctypes.c_char_p, ctypes.c_int32]
        lib.oqc_set_misaligned.argtypes = [ctypes.c_int32]
        i64, f32 = ctypes.c_int64, ctypes.c_float
        lib.oqc_sat_weight_forward.argtypes = [_F32P, i64, f32, i64, i64, _F32P]
        lib.oqc_sat_weight_backward.argtypes = [_F32P, _F32P, i64, f32, i64, i64, _F32P]
        lib.oqc_sat_act_forward.argtypes = [_F32P, i64, _F32P, _I64P, ctypes.c_int32, f32, _F32P]
        lib.oqc_sat_act_backward.argtypes = [_F32P, _F32P, i64, _F32P, _I64P, ctypes.c_int32, f32, _F32P, _F32P]
        lib.oqc_lsq_forward.argtypes = [_F32P, _I64P, ctypes.c_int32, _F32P, _I64P, ctypes.c_int32, f32, i64, f32,
                                        i64, _F32P]
        lib.oqc_lsq_backward.argtypes = [_F32P, _F32P, _I64P, ctypes.c_int32, _F32P, _I64P, ctypes.c_int32, f32,
                                         i64, f32, i64, _F32P, _F32P]

    def _call(self, rc: int) -> None:
        if rc != OQC_OK:
            raise CudaOpError(rc, self.lib.oqc_last_error().decode())

    def device_count(self) -> tuple[int, str]:
        c = ctypes.c_int(0)
        rc = self.lib.oqc_device_count(ctypes.byref(c))
        return (c.value, "") if rc == OQC_OK else (0, self.lib.oqc_last_error().decode())

    def device_name(self) -> str:
        buf = ctypes.create_string_buffer(256)
        self._call(self.lib.oqc_device_name(buf, 256))
        return buf.value.decode()

    def set_misaligned(self, on: bool) -> None:
        self.lib.oqc_set_misaligned(1 if on else 0)

    def sat_weight_forward(self, w, r, mode, fan_out):
        w = np.ascontiguousarray(w, dtype=F32)
        out = np.empty_like(w)
        self._call(self.lib.oqc_sat_weight_forward(_fp(w), w.size, r, mode, fan_out, _fp(out)))
        return out

    def sat_weight_backward(self, dwq, w, r, mode, fan_out):
        w = np.ascontiguousarray(w, dtype=F32)
        dwq = np.ascontiguousarray(dwq, dtype=F32)
        out = np.empty_like(w)
        self._call(self.lib.oqc_sat_weight_backward(_fp(dwq), _fp(w), w.size, r, mode, fan_out, _fp(out)))
        return out

    def sat_act_forward(self, x, alpha, r):
        x = np.ascontiguousarray(x, dtype=F32)
        alpha = np.ascontiguousarray(alpha, dtype=F32)
        ashape, andim = _shape(alpha.shape)
        out = np.empty_like(x)
        self._call(self.lib.oqc_sat_act_forward(_fp(x), x.size, _fp(alpha), ashape, andim, r, _fp(out)))
        return out

    def sat_act_backward(self, dy, x, alpha, r, want_dx=True, want_dalpha=True):
        x = np.ascontiguousarray(x, dtype=F32)
        dy = np.ascontiguousarray(dy, dtype=F32)
        alpha = np.ascontiguousarray(alpha, dtype=F32)
        ashape, andim = _shape(alpha.shape)
        dx = np.full_like(x, np.nan) if want_dx else None
        da = np.full(alpha.shape, np.nan, dtype=F32) if want_dalpha else None
        self._call(self.lib.oqc_sat_act_backward(_fp(dy), _fp(x), x.size, _fp(alpha), ashape, andim, r, _fp(dx),
                                                 _fp(da)))
        return dx, da

    def lsq_forward(self, v, step, r, signed, g, axis):
        v = np.ascontiguousarray(v, dtype=F32)
        step = np.ascontiguousarray(step, dtype=F32)
        vshape, vndim = _shape(v.shape)
        sshape, sndim = _shape(step.shape)
        out = np.empty_like(v)
        self._call(self.lib.oqc_lsq_forward(_fp(v), vshape, vndim, _fp(step), sshape, sndim, r, signed, g, axis,
                                            _fp(out)))
        return out

    def lsq_backward(self, dy, v, step, r, signed, g, axis, want_dv=True, want_dstep=True):
        v = np.ascontiguousarray(v, dtype=F32)
        dy = np.ascontiguousarray(dy, dtype=F32)
        step = np.ascontiguousarray(step, dtype=F32)
        vshape, vndim = _shape(v.shape)
        sshape, sndim = _shape(step.shape)
        dv = np.full_like(v, np.nan) if want_dv else None
        ds = np.full(step.shape, np.nan, dtype=F32) if want_dstep else None
        self._call(self.lib.oqc_lsq_backward(_fp(dy), _fp(v), vshape, vndim, _fp(step), sshape, sndim, r, signed, g,
                                             axis, _fp(dv), _fp(ds)))
        return dv, ds


def _load() -> tuple[Kernels | None, str]:
    env = os.environ.get(ENV_VAR)
    paths = [Path(env)] if env else library_candidates()
    for p in paths:
        if p.is_file():
            try:
                return Kernels(ctypes.CDLL(str(p))), ""
            except OSError as e:
                return None, f"{p} does not load: {e}"
    where = f"{ENV_VAR}={env}" if env else "the package's lib/ folder or build/"
    return None, (f"{LIB_NAME} is not built (no CUDA compiler when the op library was built, or "
                  f"ONNXQAT_WITH_CUDA=OFF); looked in {where}")


@pytest.fixture(scope="module")
def kernels() -> Kernels:
    """The C library, whether or not a GPU is present (for the host-side checks)."""
    k, reason = _load()
    if k is None:
        pytest.skip(reason)
    return k


@pytest.fixture(scope="module")
def gpu(kernels: Kernels) -> Kernels:
    count, err = kernels.device_count()
    if count == 0:
        pytest.skip(f"no CUDA GPU: {err or 'cudaGetDeviceCount found none'}")
    kernels.set_misaligned(False)
    return kernels


@pytest.fixture(params=[False, True], ids=["aligned", "misaligned"])
def gpu_any_alignment(request, gpu: Kernels):
    """Runs a test with float4 loads (16-byte aligned copies) and with the scalar path (copies 4 bytes off)."""
    gpu.set_misaligned(request.param)
    yield gpu
    gpu.set_misaligned(False)


# ----------------------------------------------------------------------------------------------- comparisons


def assert_sum_close(got: np.ndarray, want: np.ndarray, abs_terms: np.ndarray | float) -> None:
    """float64 sums in another order, cast to float32: one float32 ulp + 1e-12 of sum|terms| (cancellation)."""
    got = np.asarray(got, dtype=F32)
    want = np.asarray(want, dtype=F32)
    tol = np.spacing(np.abs(want)).astype(np.float64) + 1e-12 * np.asarray(abs_terms, dtype=np.float64)
    diff = np.abs(got.astype(np.float64) - want.astype(np.float64))
    assert np.all(diff <= tol), f"max diff {diff.max()} > tol {tol.min()}: got {got} want {want}"


def sat_weights(n: int, rng: np.random.Generator) -> np.ndarray:
    """Normal weights with exact ties on purpose: 0 (DoReFa R/2 for odd R) and repeated values."""
    w = (0.7 * rng.standard_normal(n)).astype(F32)
    w[: min(n, 3)] = np.array([0.0, 0.25, 0.25], dtype=F32)[: min(n, 3)]
    return w


def assert_sat_weight_equal(got: np.ndarray, want: np.ndarray, mode: int, fan_out: int, n: int) -> None:
    """Bit-equal, except S in clamp mode with ApplyScaling (float64 sums in another order: 1 ulp of S). (The ranges
    here stay below 65536, where DoReFa and symmetric take S from exact integer sums.)"""
    if mode in SAT_MODES_CLAMP and fan_out > 0 and n >= 2:
        np.testing.assert_allclose(got, want, rtol=2.0**-21, atol=0)
    else:
        np.testing.assert_array_equal(got, want)


# ------------------------------------------------------------------------------------------------ SAT weights

SAT_CASES = [
    (SAT_MODE_CLAMP, 15.0),
    (SAT_MODE_DOREFA, 1.0),
    (SAT_MODE_DOREFA, 3.0),
    (SAT_MODE_DOREFA, 15.0),
    (SAT_MODE_DOREFA, 255.0),
    (SAT_MODE_SYMMETRIC, 2.0),
    (SAT_MODE_SYMMETRIC, 15.0),
    (SAT_MODE_SYMMETRIC, 255.0),
    (SAT_MODE_FULLRANGE, 15.0),
    (SAT_MODE_FULLRANGE, 255.0),
    (SAT_MODE_ASYMMETRIC, 15.0),
    (SAT_MODE_ASYMMETRIC, 255.0),
    (SAT_MODE_ASYMMETRIC_CLAMP, 15.0),
]


@pytest.mark.gpu
@pytest.mark.parametrize("mode,r", SAT_CASES)
@pytest.mark.parametrize("fan_out", [0, 64])
def test_sat_weight_matches_reference(gpu_any_alignment, mode, r, fan_out):
    k = gpu_any_alignment
    rng = np.random.default_rng(10 + mode)
    w = sat_weights(4099, rng)
    dy = rng.standard_normal(w.size).astype(F32)
    assert_sat_weight_equal(k.sat_weight_forward(w, r, mode, fan_out), ref.sat_weight_forward(w, r, mode, fan_out),
                            mode, fan_out, w.size)
    assert_sat_weight_equal(k.sat_weight_backward(dy, w, r, mode, fan_out),
                            ref.sat_weight_backward(dy, w, r, mode, fan_out), mode, fan_out, w.size)


@pytest.mark.gpu
@pytest.mark.parametrize("mode,r", SAT_CASES)
@pytest.mark.parametrize("n", [1, 7, 1000, 3 * 2**20 + 5])
def test_sat_weight_sizes_and_scaling(gpu, mode, r, n):
    rng = np.random.default_rng(n)
    w = sat_weights(n, rng)
    for fan_out in (0, 147):
        assert_sat_weight_equal(gpu.sat_weight_forward(w, r, mode, fan_out), ref.sat_weight_forward(w, r, mode, fan_out),
                                mode, fan_out, n)


@pytest.mark.gpu
@pytest.mark.parametrize("mode,r", [(SAT_MODE_CLAMP, 15.0), (SAT_MODE_DOREFA, 15.0), (SAT_MODE_SYMMETRIC, 15.0)])
def test_sat_weight_nan_weight(gpu, mode, r):
    """A NaN weight: M = 1 and S = 1 as in the reference; NaN at that element only."""
    w = np.array([0.5, -0.2, np.nan, 0.1, 0.9, -1.5], dtype=F32)
    for fan_out in (0, 9):
        np.testing.assert_array_equal(gpu.sat_weight_forward(w, r, mode, fan_out), ref.sat_weight_forward(w, r, mode, fan_out))


@pytest.mark.gpu
@pytest.mark.parametrize("mode,r", [(SAT_MODE_DOREFA, 15.0), (SAT_MODE_SYMMETRIC, 255.0), (SAT_MODE_CLAMP, 1.0)])
def test_sat_weight_scaling_is_the_variance_of_the_levels(gpu, mode, r):
    """ApplyScaling: output = levels / float32(sqrt(n * var(levels, ddof=1))), the levels being the kernel's own."""
    rng = np.random.default_rng(3)
    w = (0.5 * rng.standard_normal(3 * 2**20 + 1)).astype(F32)
    levels = gpu.sat_weight_forward(w, r, mode, 0)
    s = F32(np.sqrt(147 * np.var(levels.astype(np.float64), ddof=1)))
    np.testing.assert_allclose(gpu.sat_weight_forward(w, r, mode, 147), (levels / s).astype(F32), rtol=2.5e-7, atol=0)
    dy = rng.standard_normal(w.size).astype(F32)
    dw1 = gpu.sat_weight_backward(dy, w, r, mode, 0)
    np.testing.assert_allclose(gpu.sat_weight_backward(dy, w, r, mode, 147), dw1 / s, rtol=5e-7, atol=0)


@pytest.mark.gpu
def test_sat_weight_all_zero_weights(gpu):
    w = np.zeros(33, dtype=F32)
    for mode, r in [(SAT_MODE_CLAMP, 15.0), (SAT_MODE_DOREFA, 15.0), (SAT_MODE_SYMMETRIC, 15.0)]:
        for fan_out in (0, 9):
            np.testing.assert_array_equal(gpu.sat_weight_forward(w, r, mode, fan_out),
                                          ref.sat_weight_forward(w, r, mode, fan_out))
            dy = np.linspace(-1, 1, 33, dtype=F32)
            np.testing.assert_array_equal(gpu.sat_weight_backward(dy, w, r, mode, fan_out),
                                          ref.sat_weight_backward(dy, w, r, mode, fan_out))


# -------------------------------------------------------------------------------------------- SAT activations

@pytest.mark.gpu
@pytest.mark.parametrize("r", [1.0, 3.0, 15.0, 255.0])
@pytest.mark.parametrize("alpha_shape", [(), (1,)])
@pytest.mark.parametrize("n", [1, 6, 4099, 3 * 2**20 + 3])
def test_sat_act_matches_reference(gpu_any_alignment, r, alpha_shape, n):
    k = gpu_any_alignment
    rng = np.random.default_rng(int(r) + n)
    alpha = np.full(alpha_shape, 2.5, dtype=F32)
    x = rng.uniform(-1, 4, n).astype(F32)
    x[: min(n, 4)] = np.array([0.0, 2.5, -0.0, 1.25], dtype=F32)[: min(n, 4)]  # the boundaries 0 and alpha
    dy = rng.standard_normal(n).astype(F32)
    np.testing.assert_array_equal(k.sat_act_forward(x, alpha, r), ref.sat_act_forward(x, alpha, r))
    dx, da = k.sat_act_backward(dy, x, alpha, r)
    want_dx, want_da = ref.sat_act_backward(dy, x, alpha, r)
    np.testing.assert_array_equal(dx, want_dx)
    assert da.shape == want_da.shape == alpha_shape
    terms = np.abs(dy.astype(np.float64)).sum()
    assert_sum_close(da, want_da, terms)


@pytest.mark.gpu
def test_sat_act_optional_outputs(gpu):
    rng = np.random.default_rng(5)
    x = rng.uniform(-1, 3, 1001).astype(F32)
    dy = rng.standard_normal(1001).astype(F32)
    alpha = np.array([1.5], dtype=F32)
    want_dx, want_da = ref.sat_act_backward(dy, x, alpha, 15.0)
    dx, da = gpu.sat_act_backward(dy, x, alpha, 15.0, want_dalpha=False)
    np.testing.assert_array_equal(dx, want_dx)
    assert da is None
    dx, da = gpu.sat_act_backward(dy, x, alpha, 15.0, want_dx=False)
    assert dx is None
    assert_sum_close(da, want_da, np.abs(dy.astype(np.float64)).sum())


@pytest.mark.gpu
def test_sat_act_empty_input_gives_zero_dalpha(gpu):
    x = np.zeros(0, dtype=F32)
    dx, da = gpu.sat_act_backward(x, x, np.array(1.0, dtype=F32), 15.0)
    assert dx.shape == (0,)
    np.testing.assert_array_equal(da, np.array(0.0, dtype=F32))


# ---------------------------------------------------------------------------------------------------------- LSQ

# (v shape, step shape, axis): per tensor, and per channel in both backward layouts (inner >= 32: rows; else cols)
LSQ_LAYOUTS = [
    ((4099,), (), 0),
    ((3, 5, 7, 11), (1,), 0),
    ((4, 8, 40, 3), (8,), 1),       # rows layout, inner 120
    ((64, 33, 32), (33,), -2),      # rows layout, inner 32, negative axis
    ((32, 3, 3, 3), (32,), 0),      # weights, cols layout, inner 27, outer 1
    ((256, 10), (10,), 1),          # activations [N, C], inner 1
    ((16, 3, 5), (5,), -1),         # last axis
    ((7, 130, 2), (130,), 1),       # cols layout, several column blocks
]


@pytest.mark.gpu
@pytest.mark.parametrize("r,signed", [(1.0, 0), (3.0, 1), (15.0, 0), (15.0, 1), (255.0, 1)])
@pytest.mark.parametrize("v_shape,step_shape,axis", LSQ_LAYOUTS)
def test_lsq_matches_reference(gpu_any_alignment, r, signed, v_shape, step_shape, axis):
    k = gpu_any_alignment
    rng = np.random.default_rng(int(r) * 7 + len(v_shape) + signed)
    step = rng.uniform(0.05, 0.2, step_shape).astype(F32)
    qn, qp = ref.lsq_bounds(r, bool(signed))
    span = float(np.max(step)) * max(abs(qn), qp) * 1.3
    v = rng.uniform(-span, span, v_shape).astype(F32)
    dy = rng.standard_normal(v_shape).astype(F32)
    g = 0.03125
    np.testing.assert_array_equal(k.lsq_forward(v, step, r, signed, g, axis),
                                  ref.lsq_forward(v, step, r, signed, g, axis))
    dv, ds = k.lsq_backward(dy, v, step, r, signed, g, axis)
    want_dv, want_ds = ref.lsq_backward(dy, v, step, r, signed, g, axis)
    np.testing.assert_array_equal(dv, want_dv)
    assert ds.shape == want_ds.shape == step_shape
    terms = g * max(abs(qn), qp) * np.abs(dy.astype(np.float64)).sum()
    assert_sum_close(ds, want_ds, terms)


@pytest.mark.gpu
def test_lsq_large_tensor_per_channel_and_per_tensor(gpu):
    rng = np.random.default_rng(11)
    v = rng.uniform(-2, 2, (24, 64, 2048)).astype(F32)  # 3M elements, rows layout
    dy = rng.standard_normal(v.shape).astype(F32)
    for step in (rng.uniform(0.05, 0.2, 64).astype(F32), np.array(0.1, dtype=F32)):
        dv, ds = gpu.lsq_backward(dy, v, step, 15.0, 1, 1e-3, 1)
        want_dv, want_ds = ref.lsq_backward(dy, v, step, 15.0, 1, 1e-3, 1)
        np.testing.assert_array_equal(dv, want_dv)
        assert_sum_close(ds, want_ds, 1e-3 * 8 * np.abs(dy.astype(np.float64)).sum())
        np.testing.assert_array_equal(gpu.lsq_forward(v, step, 15.0, 1, 1e-3, 1),
                                      ref.lsq_forward(v, step, 15.0, 1, 1e-3, 1))


@pytest.mark.gpu
def test_lsq_optional_outputs_and_empty(gpu):
    rng = np.random.default_rng(2)
    v = rng.uniform(-1, 1, (5, 6)).astype(F32)
    dy = rng.standard_normal((5, 6)).astype(F32)
    step = np.full(6, 0.1, dtype=F32)
    want_dv, want_ds = ref.lsq_backward(dy, v, step, 15.0, 1, 1.0, 1)
    dv, ds = gpu.lsq_backward(dy, v, step, 15.0, 1, 1.0, 1, want_dstep=False)
    np.testing.assert_array_equal(dv, want_dv)
    assert ds is None
    dv, ds = gpu.lsq_backward(dy, v, step, 15.0, 1, 1.0, 1, want_dv=False)
    assert dv is None
    assert_sum_close(ds, want_ds, 8 * np.abs(dy.astype(np.float64)).sum())
    empty = np.zeros((0, 6), dtype=F32)
    dv, ds = gpu.lsq_backward(empty, empty, step, 15.0, 1, 1.0, 1)
    assert dv.shape == (0, 6)
    np.testing.assert_array_equal(ds, np.zeros(6, dtype=F32))


# ------------------------------------------------------------------------------ against the CPU kernels (ORT)


def _ort_runner(provider: str = "CPUExecutionProvider"):
    """run(op_type, inputs, n_outputs) on a one-node model in onnxruntime with libonnxqat_ops.so."""
    try:
        import onnxruntime as ort
        from onnx import TensorProto, helper

        from onnxqat.ops.library import library_path

        lib = library_path()
    except Exception as e:  # noqa: BLE001 - any missing piece means: no ORT kernel to compare with
        pytest.skip(f"op library or onnxruntime not usable here: {e}")
    if provider not in ort.get_available_providers():
        pytest.skip(f"this onnxruntime ({ort.__version__}) has no {provider}")

    def run(op_type: str, inputs: list[np.ndarray], n_outputs: int) -> list[np.ndarray]:
        names = [f"in{i}" for i in range(len(inputs))]
        outs = [f"out{i}" for i in range(n_outputs)]
        elem = {np.dtype(np.float32): TensorProto.FLOAT, np.dtype(np.int64): TensorProto.INT64}
        graph = helper.make_graph(
            [helper.make_node(op_type, names, outs, domain="com.onnxqat")],
            "g",
            [helper.make_tensor_value_info(n, elem[a.dtype], list(a.shape)) for n, a in zip(names, inputs)],
            [helper.make_tensor_value_info(o, TensorProto.FLOAT, None) for o in outs],
        )
        model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17),
                                                        helper.make_opsetid("com.onnxqat", 1)])
        model.ir_version = 9
        so = ort.SessionOptions()
        so.register_custom_ops_library(lib)
        if provider != "CPUExecutionProvider":
            so.add_session_config_entry("session.disable_cpu_ep_fallback", "1")  # every node on `provider`
        sess = ort.InferenceSession(model.SerializeToString(), so, providers=[provider])
        return sess.run(None, dict(zip(names, inputs)))

    return run


def _i64(v: int) -> np.ndarray:
    return np.array(v, dtype=np.int64)


def _f32(v: float) -> np.ndarray:
    return np.array(v, dtype=F32)


@pytest.mark.gpu
def test_cuda_equals_cpu_kernels(gpu):
    cpu = _ort_runner()
    rng = np.random.default_rng(21)
    # SatAct: every output bit for bit (dalpha: sum tolerance)
    x = rng.uniform(-1, 4, (8, 16, 9)).astype(F32)
    dy = rng.standard_normal(x.shape).astype(F32)
    alpha = np.array([2.0], dtype=F32)
    (y_cpu,) = cpu("SatActQuant", [x, alpha, _f32(15.0)], 1)
    np.testing.assert_array_equal(gpu.sat_act_forward(x, alpha, 15.0), y_cpu)
    dx_cpu, da_cpu = cpu("SatActQuantGrad", [dy, x, alpha, _f32(15.0)], 2)
    dx, da = gpu.sat_act_backward(dy, x, alpha, 15.0)
    np.testing.assert_array_equal(dx, dx_cpu)
    assert_sum_close(da, da_cpu, np.abs(dy.astype(np.float64)).sum())
    # LSQ per channel
    step = rng.uniform(0.05, 0.2, 16).astype(F32)
    args = [step, _f32(15.0), _i64(1), _f32(0.01), _i64(1)]
    (y_cpu,) = cpu("LsqQuant", [x] + args, 1)
    np.testing.assert_array_equal(gpu.lsq_forward(x, step, 15.0, 1, 0.01, 1), y_cpu)
    dv_cpu, ds_cpu = cpu("LsqQuantGrad", [dy, x] + args, 2)
    dv, ds = gpu.lsq_backward(dy, x, step, 15.0, 1, 0.01, 1)
    np.testing.assert_array_equal(dv, dv_cpu)
    assert_sum_close(ds, ds_cpu, 0.01 * 8 * np.abs(dy.astype(np.float64)).sum())
    # SatWeight: the same tanh_f32 and level sums on both: bit-equal (S in clamp mode: 1 ulp)
    for mode, r in [(SAT_MODE_CLAMP, 15.0), (SAT_MODE_DOREFA, 15.0), (SAT_MODE_SYMMETRIC, 255.0)]:
        w = sat_weights(1155, rng).reshape(5, 7, 33)
        dw_in = rng.standard_normal(w.shape).astype(F32)
        for fan_out in (0, 99):
            (wq_cpu,) = cpu("SatWeightQuant", [w, _f32(r), _i64(mode), _i64(fan_out)], 1)
            assert_sat_weight_equal(gpu.sat_weight_forward(w, r, mode, fan_out), wq_cpu, mode, fan_out, w.size)
            (dw_cpu,) = cpu("SatWeightQuantGrad", [dw_in, w, _f32(r), _i64(mode), _i64(fan_out)], 1)
            assert_sat_weight_equal(gpu.sat_weight_backward(dw_in, w, r, mode, fan_out), dw_cpu, mode, fan_out, w.size)


# --------------------------------------------------------------------- argument checks (host side, no GPU needed)


def _invalid(call, match: str) -> None:
    with pytest.raises(CudaOpError, match=match) as e:
        call()
    assert e.value.code == OQC_INVALID_ARGUMENT


def test_sat_weight_rejects_bad_arguments(kernels):
    w = np.ones(4, dtype=F32)
    _invalid(lambda: kernels.sat_weight_forward(w, 0.5, SAT_MODE_DOREFA, 0), r"^SatWeightQuant: range R must be")
    _invalid(lambda: kernels.sat_weight_forward(w, float("nan"), SAT_MODE_DOREFA, 0), "range R must be finite")
    _invalid(lambda: kernels.sat_weight_forward(w, 15.0, 9, 0), "unknown mode 9")
    _invalid(lambda: kernels.sat_weight_backward(w, w, 1.0, SAT_MODE_SYMMETRIC, 0), "needs range R >= 2")
    _invalid(lambda: kernels.sat_weight_backward(w, w, 15.0, SAT_MODE_DOREFA, -1),
             r"^SatWeightQuantGrad: scale_fan_out must be >= 0")


@pytest.mark.parametrize("alpha,match", [(0.0, "alpha must be finite and > 0, got 0"),
                                         (-1.0, "alpha must be finite and > 0, got -1"),
                                         (float("inf"), "alpha must be finite and > 0, got inf")])
def test_sat_act_rejects_bad_alpha(kernels, alpha, match):
    x = np.ones(4, dtype=F32)
    _invalid(lambda: kernels.sat_act_forward(x, np.array(alpha, dtype=F32), 15.0), "^SatActQuant: " + match)
    _invalid(lambda: kernels.sat_act_backward(x, x, np.array([alpha], dtype=F32), 15.0), "^SatActQuantGrad: " + match)


def test_sat_act_rejects_bad_shape_and_range(kernels):
    x = np.ones(4, dtype=F32)
    _invalid(lambda: kernels.sat_act_forward(x, np.ones(2, dtype=F32), 15.0), r"alpha must be a scalar .* \[2\]")
    _invalid(lambda: kernels.sat_act_forward(x, np.ones((1, 1), dtype=F32), 15.0), r"got shape \[1, 1\]")
    _invalid(lambda: kernels.sat_act_forward(x, np.array(1.0, dtype=F32), 0.0), "range R must be")


def test_lsq_rejects_bad_arguments(kernels):
    v = np.ones((2, 3, 4), dtype=F32)
    ok_step = np.full(3, 0.1, dtype=F32)
    _invalid(lambda: kernels.lsq_forward(v, np.full(4, 0.1, dtype=F32), 15.0, 1, 1.0, 1),
             r"^LsqQuant: per-channel step has 4 elements but v.shape\[1\] = 3")
    _invalid(lambda: kernels.lsq_forward(v, ok_step, 15.0, 1, 1.0, 3), "axis 3 is out of range")
    _invalid(lambda: kernels.lsq_forward(v, np.full((3, 1), 0.1, dtype=F32), 15.0, 1, 1.0, 1),
             r"step must have shape \[\] or \[1\]")
    _invalid(lambda: kernels.lsq_forward(v, np.array([0.1, -0.2, 0.1], dtype=F32), 15.0, 1, 1.0, 1),
             "step must be finite and > 0, got -0.2.* at channel 1")
    _invalid(lambda: kernels.lsq_forward(v, np.array(0.0, dtype=F32), 15.0, 1, 1.0, 0),
             r"step must be finite and > 0, got 0$")
    _invalid(lambda: kernels.lsq_backward(v, v, ok_step, 15.0, 2, 1.0, 1), "^LsqQuantGrad: signed must be 0 or 1")
    _invalid(lambda: kernels.lsq_backward(v, v, ok_step, 15.0, 1, float("nan"), 1), "grad_scale must be finite")
    _invalid(lambda: kernels.lsq_backward(v, v, ok_step, 0.0, 1, 1.0, 1), "range R must be")


@pytest.mark.gpu
def test_ort_cuda_provider_runs_the_cuda_kernels(gpu):
    """The ORT-facing layer (*_def.cc) where onnxruntime has a CUDA provider: every op placed on it (no CPU
    fallback), outputs against the reference, and an invalid alpha reported as an error naming op and node."""
    run = _ort_runner("CUDAExecutionProvider")
    rng = np.random.default_rng(8)
    x = rng.uniform(-1, 4, (4, 8, 33)).astype(F32)
    dy = rng.standard_normal(x.shape).astype(F32)
    alpha = np.array([2.0], dtype=F32)
    (y,) = run("SatActQuant", [x, alpha, _f32(15.0)], 1)
    np.testing.assert_array_equal(y, ref.sat_act_forward(x, alpha, 15.0))
    dx, da = run("SatActQuantGrad", [dy, x, alpha, _f32(15.0)], 2)
    want_dx, want_da = ref.sat_act_backward(dy, x, alpha, 15.0)
    np.testing.assert_array_equal(dx, want_dx)
    assert_sum_close(da, want_da, np.abs(dy.astype(np.float64)).sum())
    for step in (rng.uniform(0.05, 0.2, 8).astype(F32), np.array(0.1, dtype=F32)):
        args = [step, _f32(15.0), _i64(1), _f32(0.01), _i64(1)]
        (y,) = run("LsqQuant", [x] + args, 1)
        np.testing.assert_array_equal(y, ref.lsq_forward(x, step, 15.0, 1, 0.01, 1))
        dv, ds = run("LsqQuantGrad", [dy, x] + args, 2)
        want_dv, want_ds = ref.lsq_backward(dy, x, step, 15.0, 1, 0.01, 1)
        np.testing.assert_array_equal(dv, want_dv)
        assert_sum_close(ds, want_ds, 0.08 * np.abs(dy.astype(np.float64)).sum())
    w = sat_weights(1056, rng).reshape(4, 8, 33)
    (wq,) = run("SatWeightQuant", [w, _f32(15.0), _i64(SAT_MODE_DOREFA), _i64(72)], 1)
    np.testing.assert_array_equal(wq, ref.sat_weight_forward(w, 15.0, SAT_MODE_DOREFA, 72))
    (dw,) = run("SatWeightQuantGrad", [dy, w, _f32(15.0), _i64(SAT_MODE_DOREFA), _i64(72)], 1)
    np.testing.assert_array_equal(dw, ref.sat_weight_backward(dy, w, 15.0, SAT_MODE_DOREFA, 72))
    with pytest.raises(Exception, match=r"SatActQuant node .*alpha must be finite and > 0, got 0"):
        run("SatActQuant", [x, np.array([0.0], dtype=F32), _f32(15.0)], 1)
