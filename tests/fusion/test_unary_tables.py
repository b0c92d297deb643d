"""Elementwise functions of codes as lookup tables (ops/unary.py) and products of codes (ops/arithmetic.py):
integer-only (a Gather of the next quantizer's codes) in the int format, the model's float ops replayed between a
DequantizeLinear and a QuantizeLinear in the ort format; bit-exact against the fake-quantized model in both."""

import numpy as np
import pytest
from onnx import TensorProto, helper

import qat_models as qm
from onnxqat.fusion.api import fuse


def _between_quantizers(op_nodes, r: int = 15, signed: bool = True, seed: int = 0, out_step: float = 0.07,
                        out_signed: bool = True):
    """conv -> BN -> LSQ (signed or not) -> <op_nodes on 'q'> -> LSQ -> Flatten -> Gemm."""
    b = qm.QatBuilder(seed)
    x = b.bn("bn1", b.conv("conv1", "input", 3, 6), 6)
    b._lsq("bn1_aquant", x, "q", np.array([0.19], np.float32), r, int(signed))
    y = op_nodes(b, "q")
    b._lsq("f_aquant", y, "fq", np.array([out_step], np.float32), r, int(out_signed))
    return b.model(["N", 3, 6, 6], b.gemm("fc", b.op("Flatten", ["fq"], "flat", axis=1), 6 * 36, 4), ["N", 4])


CASES = {
    "Sigmoid": lambda b, x: b.op("Sigmoid", [x], "f"),
    "SiLU": lambda b, x: b.op("Mul", [x, b.op("Sigmoid", [x], "sig")], "f"),
    "HardSwish": lambda b, x: b.op("HardSwish", [x], "f"),
    "x*HardSigmoid(x)": lambda b, x: b.op("Mul", [x, b.op("HardSigmoid", [x], "hs", alpha=1 / 6, beta=0.5)], "f"),
    "Tanh": lambda b, x: b.op("Tanh", [x], "f"),
    "Erf": lambda b, x: b.op("Erf", [x], "f"),
    "LeakyRelu": lambda b, x: b.op("LeakyRelu", [x], "f", alpha=0.1),
    "Clip off grid": lambda b, x: b.op("Clip", [x, b.init("lo", np.array(0, np.float32)),
                                              b.init("hi", np.array(0.5, np.float32))], "f"),
    "Sub then Sigmoid": lambda b, x: b.op("Sigmoid", [b.op("Sub", [x, b.init("c", np.array(0.3, np.float32))],
                                                            "shift")], "f"),
}


@pytest.mark.parametrize("fmt", ["int", "ort"])
@pytest.mark.parametrize("case", sorted(CASES))
def test_table_is_integer_and_exact(case, fmt):
    qat = _between_quantizers(CASES[case])
    res = fuse(qat, format=fmt, verify_samples=64, strict=True, integer_only=fmt == "int")
    ops = {n.op_type for n in res.model.graph.node}
    if fmt == "int":
        assert "Gather" in ops and not ops & {"Sigmoid", "HardSwish", "HardSigmoid", "Tanh", "Erf", "LeakyRelu"}
    else:  # the model's own float ops from a DequantizeLinear to a QuantizeLinear: onnxruntime's Gather is slow
        assert "Gather" not in ops and {"DequantizeLinear", "QuantizeLinear"} <= ops
    assert res.islands == [] and res.agreement.activations["fq"] == 1.0


@pytest.mark.parametrize("out_step, clipped", [(1 / 14, False), (0.04, True)])
def test_replayed_function_is_clipped_only_where_it_can_leave_the_code_range(out_step, clipped):
    """ort format: Sigmoid of codes in [-1.52, 1.33] (0.19 x [-8, 7]) lies in (0.18, 0.79): a 4-bit quantizer with
    step 1/14 maps every one of the 16 input codes into [0, 15] (no Clip after its QuantizeLinear: one node less per
    activation at batch 1), with step 0.04 up to code 20 (the Clip stays). Codes identical either way."""
    qat = _between_quantizers(CASES["Sigmoid"], out_step=out_step, out_signed=False)
    res = fuse(qat, format="ort", verify_samples=64, strict=True)
    q = next(n for n in res.model.graph.node if n.op_type == "QuantizeLinear" and n.output[0].startswith("fq"))
    readers = [n.op_type for n in res.model.graph.node if q.output[0] in n.input]
    assert ("Clip" in readers) == clipped, readers
    assert res.agreement.activations["fq"] == 1.0 and res.agreement.max_code_diff == 0


def test_table_read_as_float_is_the_fake_quant_value():
    """A table with no quantizer after it (the graph output): its float values, bit for bit."""
    b = qm.QatBuilder(3)
    x = b.bn("bn1", b.conv("conv1", "input", 3, 4), 4)
    b._lsq("bn1_aquant", x, "q", np.array([0.23], np.float32), 255, 1)
    y = b.op("Sigmoid", ["q"], "prob")
    res = fuse(b.model(["N", 3, 5, 5], y, ["N", 4, 5, 5]), verify_samples=64)
    assert res.agreement.max_code_diff == 0 and "Sigmoid" not in {n.op_type for n in res.model.graph.node}


def test_product_of_two_quantized_tensors():
    """Squeeze-excitation gating with a quantized gate: features x gate as an int32 product of codes, requantized."""
    b = qm.QatBuilder(4)
    f = b.sat_act("relu1", b.bn("bn1", b.conv("conv1", "input", 3, 6), 6), "feat", 2.2)
    b._lsq("gap_aquant", b.op("GlobalAveragePool", [f], "gap"), "gap_q", np.array([0.02], np.float32), 255, 0)
    g = b.op("Sigmoid", ["gap_q"], "gate")
    b._lsq("gate_aquant", g, "gate_q", np.array([1 / 255], np.float32), 255, 0)
    y = b.op("Mul", [f, "gate_q"], "scaled")
    b._lsq("scaled_aquant", y, "scaled_q", np.array([0.05], np.float32), 15, 0)
    qat = b.model(["N", 3, 6, 6], b.gemm("fc", b.op("Flatten", ["scaled_q"], "flat", axis=1), 6 * 36, 4), ["N", 4])
    for fmt in ("int", "ort"):
        res = fuse(qat, format=fmt, verify_samples=64, strict=True, integer_only=fmt == "int")
        assert res.agreement.activations["scaled_q"] == 1.0


def _attention_scores(signed_k: bool = True, r: int = 15):
    """conv -> BN -> two LSQ quantized branches q (signed) and k; scores = MatMul(q as [N, 36, 6], k^T as [N, 6, 36])
    -> LSQ -> Flatten -> Gemm: attention's Q K^T on codes."""
    b = qm.QatBuilder(5)
    x = b.bn("bn1", b.conv("conv1", "input", 3, 6), 6)
    y = b.bn("bn2", b.conv("conv2", "input", 3, 6), 6)
    b._lsq("q_aquant", x, "q", np.array([0.17], np.float32), r, 1)
    b._lsq("k_aquant", y, "k", np.array([0.21], np.float32), r, int(signed_k))
    shape = b.init("tokens", np.array([0, 6, 36], np.int64))
    qt = b.op("Transpose", [b.op("Reshape", ["q", shape], "q3")], "qt", perm=[0, 2, 1])  # [N, 36, 6]
    k3 = b.op("Reshape", ["k", shape], "k3")  # [N, 6, 36]
    s = b.op("MatMul", [qt, k3], "scores")  # [N, 36, 36]
    b._lsq("s_aquant", s, "sq", np.array([0.9], np.float32), r, 1)
    return b.model(["N", 3, 6, 6], b.gemm("fc", b.op("Flatten", ["sq"], "flat", axis=1), 36 * 36, 4), ["N", 4])


@pytest.mark.parametrize("fmt", ["int", "ort"])
@pytest.mark.parametrize("signed_k", [False, True])
def test_matmul_of_two_activations_is_integer_and_exact(fmt, signed_k):
    """MatMul of two quantized activations: MatMulInteger of the codes with their zero points (int32, exact),
    requantized by the quantizer after it; every score code equals the fake-quantized model's."""
    qat = _attention_scores(signed_k)
    res = fuse(qat, format=fmt, verify_samples=64, strict=True, integer_only=fmt == "int")
    assert res.islands == []
    mm = [n for n in res.model.graph.node if n.op_type == "MatMulInteger"]
    assert any(n.input[0] != n.input[1] and "scores" in n.output[0] for n in mm), [n.output for n in mm]
    assert res.agreement.activations["sq"] == 1.0 and res.agreement.local_activations["sq"] == 1.0


def test_matmul_of_an_unquantized_activation_is_a_float_island():
    b = qm.QatBuilder(6)
    x = b.bn("bn1", b.conv("conv1", "input", 3, 6), 6)
    b._lsq("q_aquant", x, "q", np.array([0.17], np.float32), 15, 1)
    y = b.bn("bn2", b.conv("conv2", "input", 3, 6), 6)  # no quantizer on this side
    shape = b.init("tokens", np.array([0, 6, 36], np.int64))
    qt = b.op("Transpose", [b.op("Reshape", ["q", shape], "q3")], "qt", perm=[0, 2, 1])
    s = b.op("MatMul", [qt, b.op("Reshape", [y, shape], "k3")], "scores")
    b._lsq("s_aquant", s, "sq", np.array([0.9], np.float32), 15, 1)
    qat = b.model(["N", 3, 6, 6], b.gemm("fc", b.op("Flatten", ["sq"], "flat", axis=1), 36 * 36, 4), ["N", 4])
    res = fuse(qat, format="int", verify_samples=16)
    assert [(i.op_type, i.cause) for i in res.islands if i.op_type == "MatMul"] == [
        ("MatMul", "MatMul of unquantized activations")]


def test_concat_of_two_grids_as_a_graph_output():
    """A detector head's Concat of branches with their own quantizers, read by nothing but the graph output: the
    dequantized parts concatenated (float output), equal to the fake-quantized values."""
    b = qm.QatBuilder(8)
    b._lsq("a_aquant", b.bn("bn1", b.conv("conv1", "input", 3, 4), 4), "qa", np.array([0.11], np.float32), 15, 1)
    b._lsq("b_aquant", b.bn("bn2", b.conv("conv2", "input", 3, 2), 2), "qb", np.array([0.37], np.float32), 15, 1)
    y = b.op("Concat", ["qa", "qb"], "heads", axis=1)
    res = fuse(b.model(["N", 3, 5, 5], y, ["N", 6, 5, 5]), format="int", verify_samples=32, integer_only=True)
    assert res.agreement.max_code_diff == 0 and res.islands == []
