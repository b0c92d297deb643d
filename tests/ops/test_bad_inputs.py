"""Bad inputs: onnxruntime raises an error naming the op, the node and the problem; no crash, no NaN."""

from __future__ import annotations

import numpy as np
import pytest
from conftest import F32, I64, run_op

W = np.ones((4, 3), F32)
X = np.linspace(-1, 2, 12, dtype=F32).reshape(4, 3)


def sat_w(r=15.0, mode=1, fan=0, w=W):
    return [w, np.array(r, F32), np.array(mode, I64), np.array(fan, I64)]


def sat_a(alpha=(1.0,), r=15.0, x=X):
    return [x, np.array(alpha, F32), np.array(r, F32)]


def lsq(step=0.1, r=15.0, signed=1, g=1.0, axis=0, v=X):
    return [v, np.array(step, F32), np.array(r, F32), np.array(signed, I64), np.array(g, F32), np.array(axis, I64)]


def expect_error(op, inputs, *words, n_out=1, node="bad_node"):
    with pytest.raises(Exception) as info:
        run_op(op, inputs, n_out=n_out, node_name=node)
    msg = str(info.value)
    for w in (op, node) + words:
        assert w in msg, f"{w!r} not in error message: {msg}"
    return msg


CASES = [
    # (op, inputs, words the message must hold)
    ("SatWeightQuant", sat_w(r=0.5), ["range R", "0.5"]),
    ("SatWeightQuant", sat_w(r=float("nan")), ["range R", "nan"]),
    ("SatWeightQuant", sat_w(r=float("inf")), ["range R"]),
    ("SatWeightQuant", sat_w(mode=7), ["unknown mode 7"]),
    ("SatWeightQuant", sat_w(mode=-1), ["unknown mode -1"]),
    ("SatWeightQuant", sat_w(r=1.0, mode=2), ["symmetric", "R >= 2"]),
    ("SatWeightQuant", sat_w(fan=-3), ["scale_fan_out", "-3"]),
    ("SatWeightQuant", [W, np.array([15, 3], F32), np.array(1, I64), np.array(0, I64)], ["range", "scalar"]),
    ("SatActQuant", sat_a(alpha=(0.0,)), ["alpha", "> 0"]),
    ("SatActQuant", sat_a(alpha=(-2.0,)), ["alpha", "> 0", "-2"]),
    ("SatActQuant", sat_a(alpha=(np.inf,)), ["alpha", "finite"]),
    ("SatActQuant", sat_a(alpha=(np.nan,)), ["alpha", "finite"]),
    ("SatActQuant", sat_a(alpha=(1.0, 2.0)), ["alpha", "scalar", "[2]"]),
    ("SatActQuant", sat_a(alpha=[[1.0]]), ["alpha", "scalar", "[1, 1]"]),
    ("SatActQuant", sat_a(r=0.0), ["range R"]),
    ("LsqQuant", lsq(step=0.0), ["step", "> 0"]),
    ("LsqQuant", lsq(step=-0.1), ["step", "> 0"]),
    ("LsqQuant", lsq(step=np.nan), ["step", "finite"]),
    ("LsqQuant", lsq(step=[0.1, 0.2, -0.3, 0.1], axis=0), ["step", "channel 2"]),
    ("LsqQuant", lsq(step=[0.1, 0.2]), ["per-channel step has 2 elements", "v.shape[0] = 4"]),
    ("LsqQuant", lsq(step=[0.1, 0.2, 0.3], axis=0), ["per-channel step has 3 elements"]),
    ("LsqQuant", lsq(step=[[0.1, 0.2, 0.3]], axis=1), ["step must have shape", "[1, 3]"]),
    ("LsqQuant", lsq(step=np.zeros((0,), F32)), ["step must have shape", "[0]"]),
    ("LsqQuant", lsq(step=[0.1, 0.2, 0.3], axis=2), ["axis 2 is out of range"]),
    ("LsqQuant", lsq(r=0.9), ["range R"]),
    ("LsqQuant", lsq(signed=2), ["signed must be 0 or 1"]),
    ("LsqQuant", lsq(g=np.inf), ["grad_scale", "finite"]),
]


@pytest.mark.parametrize("op,inputs,words", CASES, ids=[f"{c[0]}-{i}" for i, c in enumerate(CASES)])
def test_forward_bad_input(op, inputs, words):
    expect_error(op, inputs, *words)


@pytest.mark.parametrize("op,inputs,words", CASES, ids=[f"{c[0]}Grad-{i}" for i, c in enumerate(CASES)])
def test_gradient_bad_input(op, inputs, words):
    dy = np.ones_like(inputs[0])
    n_out = 1 if op == "SatWeightQuant" else 2
    expect_error(op + "Grad", [dy] + inputs, *words, n_out=n_out)


@pytest.mark.parametrize("op,inputs,n_out", [
    ("SatWeightQuantGrad", sat_w(), 1), ("SatActQuantGrad", sat_a(), 2), ("LsqQuantGrad", lsq(), 2)])
def test_gradient_shape_mismatch(op, inputs, n_out):
    dy = np.ones((3, 4), F32)  # forward input is (4, 3)
    expect_error(op, [dy] + inputs, "has shape [3, 4]", "[4, 3]", n_out=n_out)


@pytest.mark.parametrize("op,inputs,bad,type_name", [
    ("SatWeightQuant", sat_w(), 0, "double"),
    ("SatWeightQuant", sat_w(), 2, "int32"),
    ("SatActQuant", sat_a(), 0, "double"),
    ("SatActQuant", sat_a(), 1, "float16"),
    ("LsqQuant", lsq(), 0, "double"),
    ("LsqQuant", lsq(), 3, "float"),
])
def test_wrong_dtype(op, inputs, bad, type_name):
    # declared input types: onnxruntime refuses the model and names op, node and the offending type
    conv = {"double": np.float64, "int32": np.int32, "float16": np.float16, "float": np.float32}[type_name]
    inputs = list(inputs)
    inputs[bad] = inputs[bad].astype(conv)
    expect_error(op, inputs, "Type Error", f"tensor({type_name})")


def test_error_does_not_poison_session():
    # after an error the same session runs good inputs again (no crash, no state kept)
    expect_error("LsqQuant", lsq(step=-1.0), "step")
    (y,) = run_op("LsqQuant", lsq(step=0.5), node_name="bad_node")
    assert np.isfinite(y).all()
