"""Elementwise functions of codes as lookup tables (ops/unary.py) and products of codes (ops/arithmetic.py):
integer-only (a Gather of the next quantizer's codes), bit-exact against the fake-quantized model."""

import numpy as np
import pytest
from onnx import TensorProto, helper

import qat_models as qm
from onnxqat.fusion.api import fuse


def _between_quantizers(op_nodes, r: int = 15, signed: bool = True, seed: int = 0):
    """conv -> BN -> LSQ (signed or not) -> <op_nodes on 'q'> -> LSQ -> Flatten -> Gemm."""
    b = qm.QatBuilder(seed)
    x = b.bn("bn1", b.conv("conv1", "input", 3, 6), 6)
    b._lsq("bn1_aquant", x, "q", np.array([0.19], np.float32), r, int(signed))
    y = op_nodes(b, "q")
    b._lsq("f_aquant", y, "fq", np.array([0.07], np.float32), r, 1)
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
    assert "Gather" in ops and not ops & {"Sigmoid", "HardSwish", "HardSigmoid", "Tanh", "Erf", "LeakyRelu"}
    assert res.islands == [] and res.agreement.activations["fq"] == 1.0


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
