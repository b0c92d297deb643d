"""Exact rounding ties: the fused model rounds half to even, as the quantizers (np.round / nearbyint) do.

Dyadic steps and weights make the fake-quantized model's float32 values exact, so many quantizer inputs land exactly on
k + 1/2 (examples/02's input normalisation (p - 127)/128, here with the exact LSQ step 1/64, is a tie for every even
pixel p). A rounding shift that rounds ties up (the former x + 2^(sh-1) >> sh) differs there on every tie whose floor
is even: the fixed-point tests here (and the float ones with an odd zero point) fail on it.
"""

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper
from onnx.reference import ReferenceEvaluator

from onnxqat.fusion import stock
from onnxqat.fusion.api import fuse
from onnxqat.fusion.builder import GraphBuilder
from onnxqat.fusion.formats.integer import requantize_integer
from onnxqat.fusion.values import Acc
from onnxqat.ops.reference import reference_ops
from qat_models import QatBuilder

IN_SCALE = 1 / 256  # input x = p/256: exact in float32, so the normalisation below is exact as well
STEPS = {"norm_q": 1 / 64, "relu1_q": 1 / 512, "relu2_q": 1 / 1024}  # activation quantizer output -> step
ZP = {"norm_q": 128, "relu1_q": 0, "relu2_q": 0}  # signed 8-bit LSQ codes are stored as c + 128


def ties_model(seed: int = 0) -> onnx.ModelProto:
    """x*2 - 127/128 -> signed LSQ (step 1/64) -> Conv (LSQ weights, step 1/64, dyadic bias) -> Relu -> LSQ (1/512)
    -> depthwise Conv (step 1/8) -> Relu -> LSQ (1/1024) -> Flatten -> Gemm (step 1/16). Every float32 value of the
    fake-quantized model is an exact dyadic rational (sums stay below 2^24 units of their grid)."""
    b = QatBuilder(seed)
    rng = b.rng
    x = b.op("Mul", ["input", b.init("norm.mul", np.array(2, np.float32))], "norm_mul")
    x = b.op("Sub", [x, b.init("norm.sub", np.array(127 / 128, np.float32))], "norm")
    b._lsq("norm_aquant", x, "norm_q", np.array([STEPS["norm_q"]], np.float32), 255, 1)

    def conv(name, x, cin, cout, group, w_step, w_range, bias_unit):
        w = (rng.integers(-w_range, w_range + 1, (cout, cin // group, 3, 3)) * w_step).astype(np.float32)
        b.init(f"{name}.weight", w)
        b._lsq(f"{name}_wquant", f"{name}.weight", f"{name}.weight_q", np.array([w_step], np.float32), 15, 1)
        bias = b.init(f"{name}.bias", (rng.integers(-8, 9, cout) * bias_unit).astype(np.float32))
        b.nodes.append(helper.make_node("Conv", [x, f"{name}.weight_q", bias], [f"{name}_out"], name=name,
                                        kernel_shape=[3, 3], pads=[1] * 4, group=group))
        return f"{name}_out"

    # |acc| <= 27 * 64 * 8 codes: float32 sums of the products (multiples of 2^-12) are exact
    h = b.op("Relu", [conv("conv1", "norm_q", 3, 4, 1, 1 / 64, 7, 1 / 512)], "relu1")
    b._lsq("relu1_aquant", h, "relu1_q", np.array([STEPS["relu1_q"]], np.float32), 255, 0)
    h = b.op("Relu", [conv("dw", "relu1_q", 4, 4, 4, 1 / 8, 3, 1 / 1024)], "relu2")
    b._lsq("relu2_aquant", h, "relu2_q", np.array([STEPS["relu2_q"]], np.float32), 255, 0)
    f = b.op("Flatten", ["relu2_q"], "flat", axis=1)
    w = (rng.integers(-127, 128, (5, 4 * 6 * 6)) / 16).astype(np.float32)  # step 1/16: logits are multiples of 2^-14
    b.init("fc.weight", w)
    b._lsq("fc_wquant", "fc.weight", "fc.weight_q", np.array([1 / 16], np.float32), 255, 1)
    fb = b.init("fc.bias", (rng.integers(-2**12, 2**12, 5) / 2**14).astype(np.float32))
    b.nodes.append(helper.make_node("Gemm", [f, "fc.weight_q", fb], ["fc_out"], name="fc", transB=1))
    return b.model(["N", 3, 6, 6], "fc_out", ["N", 5])


def _probe(model: onnx.ModelProto, outs: list[tuple[str, int]]) -> onnx.ModelProto:
    m = onnx.ModelProto()
    m.CopyFrom(model)
    for name, dtype in outs:
        m.graph.output.append(helper.make_tensor_value_info(name, dtype, None))
    return m


@pytest.fixture(scope="module")
def tie_case():
    qat = ties_model()
    p = np.random.default_rng(5).integers(0, 256, size=(48, 3, 6, 6), dtype=np.uint8)
    xf = (p.astype(np.float32) * np.float32(IN_SCALE)).astype(np.float32)
    fq = ReferenceEvaluator(_probe(qat, [(n, TensorProto.FLOAT) for n in STEPS]), new_ops=reference_ops()).run(
        None, {"input": xf})
    # the fake-quant model's quantizer inputs: exact ties, counted in float64 (every value is exact)
    pre = ReferenceEvaluator(_probe(qat, [("norm", TensorProto.FLOAT), ("relu1", TensorProto.FLOAT),
                                          ("relu2", TensorProto.FLOAT)]), new_ops=reference_ops()).run(None, {"input": xf})
    ties = {}  # quantizer output -> (mask of exact ties inside the code range, floor of the tie value)
    for (n, s), v in zip(STEPS.items(), pre[1:]):
        q = v.astype(np.float64) / s
        lo = -ZP[n] if n == "norm_q" else 0  # the signed quantizer's codes start at -128, the Relu's at 0
        ties[n] = ((q - np.floor(q) == 0.5) & (q > lo) & (q < 255 - ZP[n]), np.floor(q))
    codes = {n: np.round(v.astype(np.float64) / STEPS[n]) + ZP[n] for n, v in zip(STEPS, fq[1:])}
    return qat, p, xf, fq[0], codes, {n: t[0] for n, t in ties.items()}, {n: t[1] for n, t in ties.items()}


def test_model_has_exact_ties_with_even_and_odd_floor(tie_case):
    """The test can fail: each quantizer sees many exact ties, both k even (half up != half even) and k odd."""
    qat, p, xf, out, codes, ties, floor = tie_case
    for n, t in ties.items():
        k = codes[n][t] - ZP[n]
        assert t.sum() >= 100, (n, int(t.sum()))
        assert np.all(k % 2 == 0), n  # the quantizer (numpy reference) rounds each tie to its even neighbour
        # ties with an even floor: half to even rounds down, half up would give floor + 1
        assert np.sum(floor[n][t] % 2 == 0) >= 50 and np.sum(floor[n][t] % 2 == 1) >= 50, n


@pytest.mark.parametrize("rescale", ["fixed-point", "float"])
def test_fused_codes_equal_fake_quant_on_ties(tie_case, rescale):
    """Every activation code and every output code of the fused model equals the fake-quantized model's, on
    onnx.reference and onnxruntime, ties included (the fake-quant model on onnx.reference + reference_ops())."""
    import onnxruntime as ort

    qat, p, xf, out, codes, ties, _ = tie_case
    res = fuse(qat, rescale=rescale, input_scale=IN_SCALE, input_type="uint8", dequantize_output=False, check=False)
    fused = _probe(res.model, [(f"{n}_codes", TensorProto.UINT8) for n in STEPS])
    got_ref = ReferenceEvaluator(fused).run(None, {"input": p})
    got_ort = ort.InferenceSession(fused.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, {"input": p})
    for a, b in zip(got_ref, got_ort):
        assert a.dtype == b.dtype and np.array_equal(a, b)
    for i, n in enumerate(STEPS):
        g = got_ref[1 + i].astype(np.float64)
        assert got_ref[1 + i].dtype == np.uint8
        assert np.array_equal(g[ties[n]], codes[n][ties[n]]), (rescale, n, int(np.sum(g[ties[n]] != codes[n][ties[n]])))
        assert np.array_equal(g, codes[n]), (rescale, n)
    unit = res.outputs[0].scale.reshape(1, -1)
    assert np.array_equal(got_ref[0], np.round(out.astype(np.float64) / unit))


def test_builtin_self_check_all_quantizers_identical(tie_case):
    """fuse's own self-check (onnx.reference + the numpy quantizers vs the fused model) on the tie inputs: strict,
    100 % at every activation quantizer."""
    qat, p, xf, out, codes, ties, _ = tie_case
    res = fuse(qat, input_scale=IN_SCALE, input_type="uint8", verify_data=p, strict=True)
    a = res.agreement
    assert a.max_code_diff == 0 and a.top1_agreement == 1.0 and a.code_agreement == 1.0
    assert set(a.activations) == set(STEPS) and min(a.activations.values()) == 1.0, a.activations


def test_tie_model_on_stock_onnxruntime(tie_case, tmp_path):
    """The rounding ops (BitwiseAnd, Min, Add on int64, BitShift on uint64) on the latest stock onnxruntime."""
    py = stock.stock_python(create=False)
    if py is None:
        pytest.skip("no .venv-stock (scripts/make_stock_env.sh; tests/fusion/test_fuse_stock.py creates it)")
    qat, p, xf, out, codes, ties, _ = tie_case
    res = fuse(qat, tmp_path / "t.onnx", input_scale=IN_SCALE, input_type="uint8", dequantize_output=False, check=False)
    fused = _probe(res.model, [(f"{n}_codes", TensorProto.UINT8) for n in STEPS])
    onnx.save(fused, tmp_path / "t.onnx")
    got, version = stock.run_stock(tmp_path / "t.onnx", {"input": p})
    want = ReferenceEvaluator(fused).run(None, {"input": p})
    assert not version.startswith("1.19")
    for a, b in zip(got, want):
        assert a.dtype == b.dtype and np.array_equal(a, b)
    for i, n in enumerate(STEPS):
        assert np.array_equal(got[1 + i].astype(np.float64), codes[n])


@pytest.mark.parametrize("rescale", ["fixed-point", "float"])
@pytest.mark.parametrize("seed", range(6))
def test_requant_rounds_ties_to_even(seed, rescale):
    """The requantization alone, on exact ties: dyadic multipliers over 30 octaves (one shift per channel where they
    span more than 2^7), signed ones, zero points (odd ones too), folded clip bounds that are ties themselves;
    codes = clip(np.round(exact) + zp) exactly, on onnx.reference and onnxruntime."""
    import onnxruntime as ort

    rng = np.random.default_rng(300 + seed)
    c = 6
    r = int(rng.choice([3, 15, 255]))
    zp = int(rng.integers(0, r + 1)) if seed % 2 else 0
    zp = zp | 1 if seed == 5 else zp  # an odd zero point (1-bit signed LSQ has zp = 1)
    s_out = 2.0 ** -int(rng.integers(2, 6))
    # scale / s_out = +-2^e (e from -20 to log2 R: per-channel shifts; -3 to 1: one shift), t1 = k 2^max(-e-1, 0) so
    # that t1 2^e runs over the halves and integers of [-(R+8), R+8]; products and sums exact in float64 and float32
    e = rng.integers(-20, int(np.log2(r)) + 1, c) if seed < 2 else rng.integers(-3, 2, c)
    s1 = np.ldexp(1.0, e) * rng.choice([-1, 1], c) * s_out
    bias = rng.integers(-8, 9, c) * s_out / 2  # half-integer and integer biases (in output steps)
    clip = (-np.inf, np.inf) if seed % 2 == 0 else (-(zp + 0.5) * s_out, (r - zp - 1.5) * s_out)
    unit = np.ldexp(1.0, np.maximum(-e - 1, 0))
    span = np.ceil((r + 8) / (unit * np.ldexp(1.0, e)))
    t1 = (np.round(rng.uniform(-1, 1, size=(512, c)) * span) * unit).astype(np.int32)  # |t1| < 2^29
    b = GraphBuilder({"t1"})
    acc = Acc([("t1", s1, 2.0**30)], bias, (c,), -1, clip)
    codes = requantize_integer(b, acc, s_out, r, "y", zp, rescale)
    g = helper.make_graph(b.nodes, "g", [helper.make_tensor_value_info("t1", TensorProto.INT32, None)],
                          [helper.make_tensor_value_info(codes.name, TensorProto.UINT8, None)], b.initializers)
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 21)], ir_version=10)
    got = ReferenceEvaluator(m).run(None, {"t1": t1})[0]
    exact = np.clip(t1 * s1 + bias, clip[0], clip[1]) / s_out  # exact in float64; the code is round(exact) + zp
    want = np.clip(np.round(exact) + zp, 0, r)
    tie = (exact - np.floor(exact) == 0.5) & (exact + zp > 0) & (exact + zp < r)
    assert np.sum(tie & (np.floor(exact) % 2 == 0)) > 20 and np.sum(tie & (np.floor(exact) % 2 == 1)) > 20
    assert got.dtype == np.uint8 and np.array_equal(got.astype(np.float64), want), int(np.sum(got != want))
    assert np.array_equal(ort.InferenceSession(m.SerializeToString()).run(None, {"t1": t1})[0], got)
