"""Resize linear (2x, half-pixel centres) on codes: an exact int32 sum of codes with weights 9/3/3/1 over 16,
requantized by the next quantizer (ops/resize.py); checked against a numpy bilinear upsampling of the same codes."""

import numpy as np
import onnx
import pytest

import qat_models as qm
from onnxqat.fusion.api import fuse
from onnxqat.fusion.lowering import Lowerer
from onnxqat.fusion.verify import _ort_session, _with_outputs

S_IN, S_OUT = 0.13, 0.0517  # unrelated steps: exact ties of the upsampled value are rare


def _upsample_model(mode="half_pixel", scales=(1, 1, 2, 2), signed=1):
    b = qm.QatBuilder(7)
    x = b.bn("bn1", b.conv("conv1", "input", 3, 4), 4)
    b._lsq("bn1_aquant", x, "q", np.array([S_IN], np.float32), 15, signed)
    up = b.op("Resize", ["q", "", b.init("scales", np.array(scales, np.float32))], "up", mode="linear",
              coordinate_transformation_mode=mode)
    b._lsq("up_aquant", up, "uq", np.array([S_OUT], np.float32), 15, 1)
    h = 5 * scales[2]
    return b.model(["N", 3, 5, 5], b.gemm("fc", b.op("Flatten", ["uq"], "flat", axis=1), 4 * h * h, 3), ["N", 3])


def _bilinear_2x(u: np.ndarray) -> np.ndarray:
    """16 x the half-pixel bilinear 2x upsampling of integer codes (float64, exact), border clamped."""
    out = u.astype(np.float64)
    for axis in (2, 3):
        n = out.shape[axis]
        p = np.pad(out, [(1, 1) if a == axis else (0, 0) for a in range(4)], mode="edge")
        take = lambda lo: np.take(p, np.arange(lo, lo + n), axis=axis)  # noqa: E731
        even, odd = 3 * take(1) + take(0), 3 * take(1) + take(2)
        out = np.stack([even, odd], axis=axis + 1).reshape(*out.shape[:axis], 2 * n, *out.shape[axis + 1:])
    return out


@pytest.mark.parametrize("fmt", ["int", "ort"])
@pytest.mark.parametrize("signed", [0, 1])
def test_linear_upsampling_is_an_exact_integer_sum(fmt, signed):
    qat = _upsample_model(signed=signed)
    low = Lowerer(qat, format=fmt, integer_only=fmt == "int").run()
    assert low.islands == [] and "Resize" not in {n.op_type for n in low.model.graph.node}
    (cin, s_in, t_in, zp_in), (cout, s_out, t_out, zp_out) = low.activation_codes["q"], low.activation_codes["uq"]
    sess = _ort_session(_with_outputs(low.model, [(cin, t_in), (cout, t_out)]))
    x = np.random.default_rng(0).integers(0, 256, (32, 3, 5, 5)).astype(np.uint8)
    inp = sess.get_inputs()[0]
    feed = x if inp.type == "tensor(uint8)" else (x / 255).astype(np.float32)
    u_in, u_out = (np.asarray(t).astype(np.int64) for t in sess.run([cin, cout], {inp.name: feed}))
    want = np.clip(np.round(_bilinear_2x(u_in - zp_in) / 16 * (s_in / s_out)), -8, 7)  # signed 4-bit LSQ codes
    np.testing.assert_array_equal(u_out - zp_out, want)


@pytest.mark.parametrize("fmt", ["int", "ort"])
def test_linear_upsampling_agrees_with_the_fake_quantized_model(fmt):
    res = fuse(_upsample_model(), format=fmt, verify_samples=64)
    a = res.agreement
    assert res.islands == [] and a.local_activations["uq"] >= 0.999 and a.top1_agreement == 1.0, a.summary()


@pytest.mark.parametrize("mode,scales", [("align_corners", (1, 1, 2, 2)), ("half_pixel", (1, 1, 3, 3))])
def test_other_linear_resizes_stay_float(mode, scales):
    res = fuse(_upsample_model(mode, scales), format="int", verify_samples=16)
    assert [(i.op_type, i.cause) for i in res.islands] == [("Resize", "Resize linear (not 2x half-pixel)")]
