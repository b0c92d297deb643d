"""The quantizer ops train through onnxruntime-training artifacts (generate_artifacts + Module/Optimizer).

A small Conv -> SatActQuant -> Gemm -> SatActQuant -> MatMul model with SatWeightQuant on the Conv weight and
LsqQuant (per channel and per tensor) on the other weights; two SatActQuant and two LsqQuant nodes with different
ranges check that per-node values survive gradient registration. ORT's gradients are compared with a numpy
backward pass built from the reference gradients, and, for a model that is differentiable (SatWeightQuant in clamp
mode), with finite differences of a float64 numpy forward.
"""

from __future__ import annotations

import sys
import types

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from onnxqat.ops import reference as ref
from onnxqat.ops.schema import DOMAIN

F32 = np.float32


def _training_api():
    # onnxruntime.training.artifacts imports torch through .optim (ORT issue 22070); neither needs it
    sys.modules.setdefault("onnxruntime.training.optim", types.ModuleType("onnxruntime.training.optim"))
    import onnxruntime as ort
    from onnxruntime.training import artifacts
    from onnxruntime.training.api import CheckpointState, Module, Optimizer

    ort.set_default_logger_severity(3)
    return artifacts, CheckpointState, Module, Optimizer


def build(params: dict, consts: dict, nodes, n_in: int, c_in: int, hw: int, n_out: int):
    inits = [numpy_helper.from_array(np.asarray(v), k) for k, v in {**params, **consts}.items()]
    graph = helper.make_graph(
        nodes, "qat", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [n_in, c_in, hw, hw])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [n_in, n_out])], inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid(DOMAIN, 1)],
                             ir_version=9)


def q(op, inputs, out, name):
    return helper.make_node(op, inputs, [out], domain=DOMAIN, name=name)


def make_artifacts(model, requires_grad, tmp_path, lr):
    import onnxqat
    from onnxqat.ops.gradients import add_gradient_outputs, register_gradients

    artifacts, CheckpointState, Module, Optimizer = _training_api()
    register_gradients()
    register_gradients()  # idempotent
    model = add_gradient_outputs(onnx.ModelProto.FromString(model.SerializeToString()))  # SatWeightQuant: O(1)
    artifacts.generate_artifacts(model, requires_grad=requires_grad, loss=artifacts.LossType.MSELoss,
                                 optimizer=artifacts.OptimType.SGD, artifact_directory=str(tmp_path),
                                 custom_op_library=onnxqat.library_path())
    state = CheckpointState.load_checkpoint(str(tmp_path / "checkpoint"))
    module = Module(str(tmp_path / "training_model.onnx"), state, str(tmp_path / "eval_model.onnx"),
                    session_options=onnxqat.session_options())
    opt = Optimizer(str(tmp_path / "optimizer_model.onnx"), module)
    opt.set_learning_rate(lr)
    return state, module, opt


# ------------------------------------------------------------------ numpy model (float32, reference ops)

def im2col(x, k):
    n, c, h, w = x.shape
    oh, ow = h - k + 1, w - k + 1
    cols = np.empty((n, oh * ow, c * k * k), x.dtype)
    for i in range(oh):
        for j in range(ow):
            cols[:, i * ow + j, :] = x[:, :, i:i + k, j:j + k].reshape(n, -1)
    return cols


C_IN, HW, K, C1, H2, OUT, N = 2, 6, 3, 4, 10, 4, 8


def qat_model(rng):
    params = {
        "W1": (rng.normal(size=(C1, C_IN, K, K)) * 0.4).astype(F32),
        "B1": (rng.normal(size=C1) * 0.1).astype(F32),
        "a1.alpha": np.array([2.0], F32),
        "W2": (rng.normal(size=(C1 * 16, H2)) * 0.2).astype(F32),
        "l2.step": np.full(H2, 0.05, F32),
        "B2": (rng.normal(size=H2) * 0.1).astype(F32),
        "a2.alpha": np.array([1.5], F32),
        "W3": (rng.normal(size=(H2, OUT)) * 0.3).astype(F32),
        "l3.step": np.array(0.01, F32),
    }
    consts = {
        "q1.range": np.array(15, F32), "q1.mode": np.array(1, np.int64), "q1.fan_out": np.array(C1 * K * K, np.int64),
        "a1.range": np.array(15, F32),
        "l2.range": np.array(15, F32), "l2.signed": np.array(1, np.int64),
        "l2.grad_scale": np.array(1 / np.sqrt(C1 * 16 * H2 * 7), F32), "l2.axis": np.array(1, np.int64),
        "a2.range": np.array(3, F32),
        "l3.range": np.array(255, F32), "l3.signed": np.array(1, np.int64),
        "l3.grad_scale": np.array(1 / np.sqrt(H2 * OUT * 127), F32), "l3.axis": np.array(0, np.int64),
        "shape2": np.array([N, C1 * 16], np.int64),
    }
    nodes = [
        q("SatWeightQuant", ["W1", "q1.range", "q1.mode", "q1.fan_out"], "W1_q", "conv_wquant"),
        helper.make_node("Conv", ["x", "W1_q", "B1"], ["h1"], name="conv"),
        q("SatActQuant", ["h1", "a1.alpha", "a1.range"], "h1q", "a1"),
        helper.make_node("Reshape", ["h1q", "shape2"], ["h1f"], name="flat"),
        q("LsqQuant", ["W2", "l2.step", "l2.range", "l2.signed", "l2.grad_scale", "l2.axis"], "W2_q", "gemm_wquant"),
        helper.make_node("Gemm", ["h1f", "W2_q", "B2"], ["h2"], name="gemm"),
        q("SatActQuant", ["h2", "a2.alpha", "a2.range"], "h2q", "a2"),
        q("LsqQuant", ["W3", "l3.step", "l3.range", "l3.signed", "l3.grad_scale", "l3.axis"], "W3_q", "mm_wquant"),
        helper.make_node("MatMul", ["h2q", "W3_q"], ["y"], name="mm"),
    ]
    return params, consts, nodes


def numpy_grads(p, c, x, t):
    """Loss and gradients of every parameter: forward with the reference ops, backward by hand."""
    w1q = ref.sat_weight_forward(p["W1"], c["q1.range"], c["q1.mode"], c["q1.fan_out"])
    cols = im2col(x, K)  # [N, 16, C_IN*K*K]
    h1 = (cols @ w1q.reshape(C1, -1).T).transpose(0, 2, 1) + p["B1"][None, :, None]  # [N, C1, 16]
    h1q = ref.sat_act_forward(h1, p["a1.alpha"], c["a1.range"])
    h1f = h1q.reshape(N, -1)
    lsq2 = (p["l2.step"], c["l2.range"], c["l2.signed"], c["l2.grad_scale"], c["l2.axis"])
    w2q = ref.lsq_forward(p["W2"], *lsq2)
    h2 = h1f @ w2q + p["B2"]
    h2q = ref.sat_act_forward(h2, p["a2.alpha"], c["a2.range"])
    lsq3 = (p["l3.step"], c["l3.range"], c["l3.signed"], c["l3.grad_scale"], c["l3.axis"])
    w3q = ref.lsq_forward(p["W3"], *lsq3)
    y = h2q @ w3q
    loss = np.mean((y - t) ** 2)
    dy = (2 * (y - t) / y.size).astype(F32)
    g = {}
    dw3q = h2q.T @ dy
    dh2q = dy @ w3q.T
    g["W3"], g["l3.step"] = ref.lsq_backward(dw3q, p["W3"], *lsq3)
    dh2, g["a2.alpha"] = ref.sat_act_backward(dh2q, h2, p["a2.alpha"], c["a2.range"])
    g["B2"] = dh2.sum(0)
    dw2q = h1f.T @ dh2
    dh1 = (dh2 @ w2q.T).reshape(N, C1, 16)
    g["W2"], g["l2.step"] = ref.lsq_backward(dw2q, p["W2"], *lsq2)
    dh1_, g["a1.alpha"] = ref.sat_act_backward(dh1, h1, p["a1.alpha"], c["a1.range"])
    g["B1"] = dh1_.sum((0, 2))
    dw1q = np.einsum("nop,npk->ok", dh1_, cols).reshape(p["W1"].shape).astype(F32)
    g["W1"] = ref.sat_weight_backward(dw1q, p["W1"], c["q1.range"], c["q1.mode"], c["q1.fan_out"])
    return loss, g


def test_training_quantized_model(tmp_path):
    rng = np.random.default_rng(0)
    params, consts, nodes = qat_model(rng)
    model = build(params, consts, nodes, N, C_IN, HW, OUT)
    onnx.checker.check_model(model)
    state, module, opt = make_artifacts(model, list(params), tmp_path, lr=0.02)
    # the backward multiplies by the forward's derivative factor (SatWeightQuant output 1): no tanh recomputed
    tg = onnx.load(str(tmp_path / "training_model.onnx")).graph
    (fw,) = [n for n in tg.node if n.op_type == "SatWeightQuant"]
    (bw,) = [n for n in tg.node if n.op_type == "SatWeightQuantGrad"]
    assert len(fw.output) == 2 and fw.output[1] and list(bw.input)[5:] == [fw.output[1]]
    x = rng.uniform(0, 1, size=(N, C_IN, HW, HW)).astype(F32)
    t = (rng.normal(size=(N, OUT)) * 0.5).astype(F32)

    module.train()
    loss0 = float(module(x, t))
    ref_loss, ref_g = numpy_grads(params, consts, x, t)
    assert loss0 == pytest.approx(ref_loss, rel=1e-5)
    for name, want in ref_g.items():
        got = state.parameters[name].grad
        assert got.shape == np.shape(want), name
        scale = float(np.abs(want).max())
        assert scale > 0, f"{name}: no gradient in the reference"  # every parameter really gets a gradient
        np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5 * scale, err_msg=name)

    # train: the loss falls and the learnable alpha/step move
    before = {k: state.parameters[k].data.copy() for k in ("a1.alpha", "a2.alpha", "l2.step", "l3.step")}
    opt.step()
    module.lazy_reset_grad()
    losses = [loss0]
    for _ in range(60):
        losses.append(float(module(x, t)))
        opt.step()
        module.lazy_reset_grad()
    assert np.mean(losses[-5:]) < 0.7 * np.mean(losses[:3]), losses
    for k, v in before.items():
        after = state.parameters[k].data
        assert np.all(after > 0), k
        assert not np.array_equal(after, v), f"{k} did not change"
    # after training, ORT's gradient still follows the reference (parameters read back from the state)
    trained = {k: state.parameters[k].data.copy() for k in params}
    module(x, t)
    _, ref_g = numpy_grads(trained, consts, x, t)
    for name in ("a1.alpha", "a2.alpha", "l2.step", "l3.step", "W1"):
        want = ref_g[name]
        np.testing.assert_allclose(state.parameters[name].grad, want, rtol=1e-4,
                                   atol=1e-5 * float(np.abs(want).max()), err_msg=name)


def test_gradient_matches_finite_differences(tmp_path):
    # differentiable model: SatWeightQuant in clamp mode (Wq = tanh(W)/max|tanh(W)|) -> Conv -> Gemm -> MSE.
    # ORT holds M constant: exact except for the element that attains the max (left out).
    rng = np.random.default_rng(1)
    params = {"W1": (rng.normal(size=(C1, C_IN, K, K)) * 0.4).astype(F32),
              "W2": (rng.normal(size=(C1 * 16, OUT)) * 0.2).astype(F32)}
    consts = {"q1.range": np.array(15, F32), "q1.mode": np.array(0, np.int64), "q1.fan_out": np.array(0, np.int64),
              "shape2": np.array([N, C1 * 16], np.int64)}
    nodes = [q("SatWeightQuant", ["W1", "q1.range", "q1.mode", "q1.fan_out"], "W1_q", "conv_wquant"),
             helper.make_node("Conv", ["x", "W1_q"], ["h1"], name="conv"),
             helper.make_node("Reshape", ["h1", "shape2"], ["h1f"], name="flat"),
             helper.make_node("Gemm", ["h1f", "W2"], ["y"], name="gemm")]
    model = build(params, consts, nodes, N, C_IN, HW, OUT)
    state, module, _ = make_artifacts(model, list(params), tmp_path, lr=0.0)
    x = rng.uniform(0, 1, size=(N, C_IN, HW, HW)).astype(F32)
    t = rng.normal(size=(N, OUT)).astype(F32)
    module.train()
    module(x, t)
    got = state.parameters["W1"].grad
    cols = im2col(x.astype(np.float64), K)

    def loss(w1):
        # float64 forward of the same graph
        th = np.tanh(w1)
        wq = th / np.abs(th).max()
        h1 = (cols @ wq.reshape(C1, -1).T).transpose(0, 2, 1).reshape(N, -1)
        y = h1 @ params["W2"].astype(np.float64)
        return np.mean((y - t) ** 2)

    w1 = params["W1"].astype(np.float64)
    argmax = np.unravel_index(np.argmax(np.abs(w1)), w1.shape)
    eps = 1e-6
    fd = np.zeros_like(w1)
    for idx in np.ndindex(w1.shape):
        if idx == argmax:
            continue
        wp, wm = w1.copy(), w1.copy()
        wp[idx] += eps
        wm[idx] -= eps
        fd[idx] = (loss(wp) - loss(wm)) / (2 * eps)
    mask = np.ones(w1.shape, bool)
    mask[argmax] = False
    np.testing.assert_allclose(got[mask], fd[mask], rtol=2e-3, atol=1e-5 * np.abs(fd).max())
