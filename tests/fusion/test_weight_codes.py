"""Integer form of the weight quantizers, low-bit packing, fixed-point rescaling: checked against the numpy reference."""

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper
from onnx.reference import ReferenceEvaluator

from onnxqat.fusion.builder import GraphBuilder
from onnxqat.fusion.graph import QatGraph
from onnxqat.fusion.formats.integer import requantize_integer
from onnxqat.fusion.storage import emit_codes, pack, unpack_reference
from onnxqat.fusion.values import Acc
from onnxqat.fusion.weights import weight_codes
from onnxqat.ops import reference as ref
from onnxqat.ops.schema import SAT_MODE_DOREFA, SAT_MODE_SYMMETRIC

from qat_models import QatBuilder


def _graph_with(fn):
    b = QatBuilder(0)
    fn(b)
    b.nodes.append(helper.make_node("Identity", ["input"], ["out"]))
    return QatGraph(b.model([1], "out", [1])), b


@pytest.mark.parametrize("r", [1, 3, 15, 255])
@pytest.mark.parametrize("fan_out", [0, 10])
def test_sat_dorefa_codes_are_2k_minus_r(r, fan_out):
    w = np.random.default_rng(r).standard_normal((10, 6)).astype(np.float32)
    g, b = _graph_with(lambda b: (b.init("w", w), b.sat_weight("fc", "w", r, SAT_MODE_DOREFA, fan_out)))
    c = weight_codes(g, g.producer["w_q"], 0, 10)
    wq = ref.sat_weight_forward(w, r, SAT_MODE_DOREFA, fan_out)
    assert np.all(c.w_int % 2 == r % 2)  # odd multiples of 1/R for odd R: no zero level
    assert c.w_int.min() >= -r and c.w_int.max() <= r
    # float32 evaluation of 2*k/R - 1 in the reference: a few ulps of 1 around the exact grid value
    np.testing.assert_allclose(c.w_int * c.scale[:, None], wq, rtol=0, atol=3e-7 * np.max(np.abs(wq)))
    assert np.all(c.w_int == 2 * c.u.astype(np.int64) - r)  # stored code u = k in [0, R]
    assert c.bits == max(1, int(np.ceil(np.log2(r + 1))))


def test_sat_symmetric_codes():
    w = np.random.default_rng(3).standard_normal((8, 5)).astype(np.float32)
    g, b = _graph_with(lambda b: (b.init("w", w), b.sat_weight("fc", "w", 15, SAT_MODE_SYMMETRIC)))
    c = weight_codes(g, g.producer["w_q"], 0, 8)
    assert c.w_int.min() >= -7 and c.w_int.max() <= 7 and np.any(c.w_int == 0)
    wq = ref.sat_weight_forward(w, 15, SAT_MODE_SYMMETRIC, 0)
    np.testing.assert_allclose(c.w_int * c.scale[:, None], wq, rtol=0, atol=3e-7 * np.max(np.abs(wq)))


@pytest.mark.parametrize("per_channel", [False, True])
def test_lsq_codes(per_channel):
    w = np.random.default_rng(4).standard_normal((6, 3, 3, 3)).astype(np.float32)
    holder = {}

    def build(b):
        b.init("w", w)
        holder["q"] = b.lsq_weight("conv", "w", w, 15, per_channel, 0)

    g, b = _graph_with(build)
    c = weight_codes(g, g.producer["w_q"], 0, 6)
    q = g.producer["w_q"]
    expect = ref.lsq_forward(w, g.consts[q.input[1]], 15, 1, 1.0, 0)
    assert c.w_int.min() >= -8 and c.w_int.max() <= 7
    np.testing.assert_array_equal((c.w_int * c.scale[:, None, None, None]).astype(np.float32), expect)


@pytest.mark.parametrize("sb", [1, 2, 4])
def test_pack_unpack_in_graph(sb):
    rng = np.random.default_rng(sb)
    u = rng.integers(0, 1 << sb, size=(5, 3, 3)).astype(np.uint8)  # 45 codes: not a multiple of 8/sb
    assert np.array_equal(unpack_reference(pack(u, sb), sb, u.size).reshape(u.shape), u)
    assert pack(u, sb).size == -(-u.size * sb // 8)
    b = GraphBuilder(set())
    out = emit_codes(b, "w", u, sb)
    g = helper.make_graph(b.nodes, "g", [], [helper.make_tensor_value_info(out, TensorProto.UINT8, None)], b.initializers)
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 21)], ir_version=10)
    assert np.array_equal(ReferenceEvaluator(m).run(None, {})[0], u)
    import onnxruntime as ort

    assert np.array_equal(ort.InferenceSession(m.SerializeToString()).run(None, {})[0], u)


def test_fixed_point_requant_matches_exact_rounding():
    """code = clip(round(sum s_i t_i + b) / s_out), 0, R) computed by the emitted int64 graph vs float64 numpy."""
    rng = np.random.default_rng(7)
    c = 6
    t1 = rng.integers(-40000, 40000, size=(50, c)).astype(np.int32)
    t2 = rng.integers(0, 16, size=(50, c)).astype(np.uint8)
    s1 = rng.uniform(1e-5, 1e-3, c) * np.where(rng.uniform(size=c) < 0.3, -1, 1)
    bias = rng.standard_normal(c)
    s_out = 0.173
    b = GraphBuilder({"t1", "t2"})
    acc = Acc([("t1", s1, 40000.0), ("t2", np.array([0.05]), 15.0)], bias, (c,), -1)
    codes = requantize_integer(b, acc, s_out, 15, "y")
    g = helper.make_graph(b.nodes, "g", [helper.make_tensor_value_info("t1", TensorProto.INT32, None),
                                         helper.make_tensor_value_info("t2", TensorProto.UINT8, None)],
                          [helper.make_tensor_value_info(codes.name, TensorProto.UINT8, None)], b.initializers)
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 21)], ir_version=10)
    got = ReferenceEvaluator(m).run(None, {"t1": t1, "t2": t2})[0]
    exact = (t1 * s1 + t2 * 0.05 + bias) / s_out
    want = np.clip(np.round(exact), 0, 15)
    near_tie = np.abs(exact - np.round(exact) - 0.5) < 1e-6
    assert np.array_equal(got[~near_tie], want[~near_tie])
    assert near_tie.mean() < 0.01 and got.dtype == np.uint8


@pytest.mark.parametrize("seed", range(6))
def test_requant_property_random_scales(seed):
    """Random multipliers over 18 decades (negative and zero included), zero points, code bounds: the int64 graph equals
    clip(np.round(exact)) wherever `exact` is not within 1e-6 of a rounding tie (exact ties: test_fuse_ties.py)."""
    rng = np.random.default_rng(100 + seed)
    c = 5
    r = int(rng.choice([1, 3, 15, 127, 255]))
    zp = int(rng.integers(0, r + 1)) if seed % 2 else 0
    mag = 10.0 ** rng.uniform(-9, 3, c)
    s1 = mag * rng.choice([-1, 1], c) * (rng.uniform(size=c) > 0.15)
    t1 = rng.integers(-(2**20), 2**20, size=(400, c)).astype(np.int32)
    bias = rng.standard_normal(c) * 10.0 ** rng.uniform(-3, 2, c)
    s_out = float(10.0 ** rng.uniform(-3, 0))
    clip = (float(rng.uniform(-1, 0.2)), float(rng.uniform(0.3, 3))) if seed >= 3 else (-np.inf, np.inf)
    b = GraphBuilder({"t1"})
    acc = Acc([("t1", s1, 2.0**20)], bias, (c,), -1, clip)
    codes = requantize_integer(b, acc, s_out, r, "y", zp)
    g = helper.make_graph(b.nodes, "g", [helper.make_tensor_value_info("t1", TensorProto.INT32, None)],
                          [helper.make_tensor_value_info(codes.name, TensorProto.UINT8, None)], b.initializers)
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 21)], ir_version=10)
    got = ReferenceEvaluator(m).run(None, {"t1": t1})[0].astype(np.int64)
    v = np.clip(t1 * s1 + bias, clip[0], clip[1])
    exact = v / s_out + zp
    want = np.clip(np.round(exact), 0, r)
    ok = np.abs(exact - np.floor(exact) - 0.5) > 1e-6
    assert np.array_equal(got[ok], want[ok]), (r, zp, clip)
    import onnxruntime as ort

    assert np.array_equal(ort.InferenceSession(m.SerializeToString()).run(None, {"t1": t1})[0], got.astype(np.uint8))
