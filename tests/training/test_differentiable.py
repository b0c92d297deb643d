"""differentiable.py: each rewrite computes what the op computes (onnxruntime inference of the original op is the
reference), gradients through the rewrites match finite differences of the original model, and docs/training-ops.md
lists exactly the rewrites, zero-gradient and no-gradient ops of the code (and the ops it calls native do train)."""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from onnxqat.errors import TrainingError
from onnxqat.training import differentiable as D

DOC = Path(__file__).resolve().parents[2] / "docs" / "training-ops.md"
X_SHAPE = [2, 8, 6, 6]


def f32(name, v):
    return numpy_helper.from_array(np.asarray(v, np.float32), name)


def i64(name, v):
    return numpy_helper.from_array(np.asarray(v, np.int64), name)


# op type -> (attributes, extra inputs, extra initializers, output shape or None for the input's)
CASES = {
    "HardSigmoid": ({"alpha": 0.3, "beta": 0.4}, [], [], None),
    "HardSwish": ({}, [], [], None),
    "Softplus": ({}, [], [], None),
    "Softsign": ({}, [], [], None),
    "Elu": ({"alpha": 0.7}, [], [], None),
    "Selu": ({}, [], [], None),
    "Celu": ({"alpha": 1.5}, [], [], None),
    "ThresholdedRelu": ({"alpha": 0.2}, [], [], None),
    "PRelu": ({}, ["slope"], [f32("slope", np.linspace(0.05, 0.4, 8).reshape(8, 1, 1))], None),
    "GlobalMaxPool": ({}, [], [], [2, 8, 1, 1]),
    "DepthToSpace": ({"blocksize": 2, "mode": "CRD"}, [], [], [2, 2, 12, 12]),
    "SpaceToDepth": ({"blocksize": 2}, [], [], [2, 32, 3, 3]),
    "LRN": ({"size": 3, "alpha": 0.3, "beta": 0.7, "bias": 1.5}, [], [], None),
    "InstanceNormalization": ({"epsilon": 1e-3}, ["s", "b"], [f32("s", np.linspace(0.5, 2, 8)),
                                                               f32("b", np.linspace(-1, 1, 8))], None),
    "Sum": ({}, ["c2", "c2"], [], None),
    "ConvTranspose": ({"strides": [2, 2], "pads": [1, 0, 1, 2], "output_padding": [1, 0], "group": 2,
                       "dilations": [1, 2]}, ["wt"], [f32("wt", np.linspace(-1, 1, 8 * 3 * 3 * 2).reshape(8, 3, 3, 2))],
                      [2, 6, 12, 12]),
}
CONV_TRANSPOSES = {
    "same_upper": {"strides": [2, 2], "auto_pad": "SAME_UPPER", "kernel_shape": [3, 3]},
    "big_pads": {"strides": [1, 1], "pads": [2, 2, 2, 2], "kernel_shape": [2, 2]},
    "output_shape": {"strides": [2, 2], "output_shape": [13, 13], "kernel_shape": [3, 3]},
}
RESIZES = {
    "nearest_asymmetric": ({"mode": "nearest", "coordinate_transformation_mode": "asymmetric"}, [1, 1, 2, 2]),
    "nearest_half_pixel_x3": ({"mode": "nearest", "nearest_mode": "round_prefer_ceil"}, [1, 1, 3, 3]),
    "linear_half_pixel": ({"mode": "linear"}, [1, 1, 2, 2]),
    "linear_align_corners_down": ({"mode": "linear", "coordinate_transformation_mode": "align_corners"},
                                  [1, 1, 0.5, 0.5]),
    "cubic": ({"mode": "cubic", "cubic_coeff_a": -0.5}, [1, 1, 2, 1.5]),
}


def _model(op, attrs, extra_inputs, extra_inits, out_shape, opset=17):
    rng = np.random.default_rng(1)
    w = f32("w", rng.standard_normal((8, 8, 1, 1)) * 0.4)
    nodes = [helper.make_node("Conv", ["x", "w"], ["c"], name="conv"),
             helper.make_node("Relu", ["c"], ["c2"], name="relu")]
    nodes.append(helper.make_node(op, ["c", *extra_inputs], ["y"], name="op", **attrs))
    g = helper.make_graph(nodes, "t", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", *X_SHAPE[1:]])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", *(out_shape or X_SHAPE)[1:]])],
                          [w, *extra_inits])
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", opset)])
    m.ir_version = 8
    return m


def _resize_model(attrs, scales):
    x = np.array(X_SHAPE)
    out = [int(np.floor(d * s)) for d, s in zip(x, scales)]
    return _model("Resize", attrs, ["roi", "scales"], [f32("roi", []), f32("scales", scales)], out)


def _run(m, x):
    so = ort.SessionOptions()
    so.intra_op_num_threads = 1
    return ort.InferenceSession(m.SerializeToString(), so, providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]


def _all_cases():
    for op, (attrs, ins, inits, out) in CASES.items():
        yield op, _model(op, attrs, ins, inits, out)
    for name, (attrs, scales) in RESIZES.items():
        yield f"Resize-{name}", _resize_model(attrs, scales)
    for name, attrs in CONV_TRANSPOSES.items():
        k = attrs["kernel_shape"]
        wt = f32("wt", np.random.default_rng(5).standard_normal((8, 4, *k)))
        out = {"same_upper": [2, 4, 12, 12], "big_pads": [2, 4, 3, 3], "output_shape": [2, 4, 13, 13]}[name]
        yield f"ConvTranspose-{name}", _model("ConvTranspose", attrs, ["wt"], [wt], out)


@pytest.mark.parametrize("name,model", list(_all_cases()), ids=[n for n, _ in _all_cases()])
def test_rewrite_computes_the_op(name, model):
    steps = D.plan_rewrites(model, ["w"], ["y"])
    assert [op for _, op in steps] == [model.graph.node[-1].op_type]
    rewritten = D.apply_rewrites(model, steps)
    assert all(n.op_type != model.graph.node[-1].op_type for n in rewritten.graph.node)
    x = np.random.default_rng(2).standard_normal(X_SHAPE).astype(np.float32)
    want, got = _run(model, x), _run(rewritten, x)
    assert got.shape == want.shape
    np.testing.assert_allclose(got, want, rtol=2e-5, atol=2e-6)


def test_gradients_through_every_rewrite_match_finite_differences(tmp_path):
    """One ORT training graph with every case as a branch; d(sum of branch means)/dw against central differences
    of the original (un-rewritten) model run in onnxruntime inference."""
    from onnxqat.training import artifacts as art
    from onnxqat.training.loop import Engine
    from onnxqat.training.objective import IOPlan
    from onnxqat.training.losses import LossTerm

    cases = list(_all_cases())
    rng = np.random.default_rng(3)
    w0 = (rng.standard_normal((8, 8, 1, 1)) * 0.4).astype(np.float32)
    nodes = [helper.make_node("Conv", ["x", "w"], ["c"], name="conv"), helper.make_node("Relu", ["c"], ["c2"],
                                                                                        name="relu")]
    inits, means = [f32("w", w0)], []
    for k, (name, m) in enumerate(cases):
        op = onnx.NodeProto()
        op.CopyFrom(m.graph.node[-1])
        ren = {i.name: f"b{k}.{i.name}" for i in m.graph.initializer if i.name != "w"}
        for j, i in enumerate(op.input):
            op.input[j] = ren.get(i, i)
        op.output[0], op.name = f"y{k}", f"op{k}"
        inits += [numpy_helper.from_array(numpy_helper.to_array(i), ren[i.name]) for i in m.graph.initializer
                  if i.name in ren]
        nodes += [op, helper.make_node("ReduceMean", [f"y{k}"], [f"m{k}"], keepdims=0, name=f"mean{k}")]
        means.append(f"m{k}")
    acc = means[0]
    for k, mname in enumerate(means[1:]):
        nodes.append(helper.make_node("Add", [acc, mname], [f"acc{k}"], name=f"acc{k}"))
        acc = f"acc{k}"
    nodes.append(helper.make_node("Unsqueeze", [acc, "ax"], ["out"], name="unsq"))
    inits.append(i64("ax", [0]))
    g = helper.make_graph(nodes, "all", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", *X_SHAPE[1:]])],
                          [helper.make_tensor_value_info("out", TensorProto.FLOAT, [1])], inits)
    model = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    x = rng.standard_normal(X_SHAPE).astype(np.float32)
    # loss = (out - target)^2 / 1 with target = out(w0) - 1: dloss/dw = 2 * dout/dw
    target = float(_run(model, x)[0]) - 1.0
    io = IOPlan("x", [], [LossTerm("out", "out", "mse", "out.target")])
    plan = art.plan_training(model, io)
    plan.trainable = ["w"]
    eng = Engine(model, tmp_path, 1, plan)
    assert {op for _, op in plan.rewrites} == {m.graph.node[-1].op_type for _, m in cases}
    eng.module.lazy_reset_grad()
    eng.train_step({"x": x, "out.target": np.array([target], np.float32)}, None)
    grad = eng.state.parameters["w"].grad.reshape(-1) / 2.0
    eps = 1e-2
    for idx in (0, 9, 27, 63):
        def out_at(delta):
            w = w0.copy().reshape(-1)
            w[idx] += delta
            m = onnx.ModelProto()
            m.CopyFrom(model)
            for i in m.graph.initializer:
                if i.name == "w":
                    i.CopyFrom(f32("w", w.reshape(w0.shape)))
            return float(_run(m, x).astype(np.float64)[0])

        fd = (out_at(eps) - out_at(-eps)) / (2 * eps)
        assert grad[idx] == pytest.approx(fd, rel=2e-2, abs=2e-3), idx


def test_only_nodes_on_a_gradient_path_are_rewritten():
    # HardSigmoid on the input (before every parameter) and on a branch the loss does not read: left alone
    nodes = [helper.make_node("HardSigmoid", ["x"], ["h"], name="pre"),
             helper.make_node("Conv", ["h", "w"], ["c"], name="conv"),
             helper.make_node("HardSigmoid", ["c"], ["side"], name="side"),
             helper.make_node("HardSwish", ["c"], ["y"], name="used")]
    g = helper.make_graph(nodes, "p", [helper.make_tensor_value_info("x", TensorProto.FLOAT, X_SHAPE)],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, X_SHAPE),
                           helper.make_tensor_value_info("side", TensorProto.FLOAT, X_SHAPE)],
                          [f32("w", np.ones((8, 8, 1, 1)))])
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])
    assert D.plan_rewrites(m, ["w"], ["y"]) == [("used", "HardSwish")]
    assert D.plan_rewrites(m, ["w"], ["y", "side"]) == [("side", "HardSigmoid"), ("used", "HardSwish")]


def test_op_without_gradient_is_one_line_naming_node():
    m = _model("ReduceMax", {"axes": [1]}, [], [], [2, 1, 6, 6])
    with pytest.raises(TrainingError, match=r"^ReduceMax node op has no gradient in onnxruntime-training 1\.19\.2 "
                                            r"and onnxqat has no rewrite for it \(see docs/training-ops\.md\)$"):
        D.plan_rewrites(m, ["w"], ["y"])


def _doc_table() -> dict[str, str]:
    rows = {}
    for line in DOC.read_text().splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) >= 2 and re.fullmatch(r"`?[A-Z][A-Za-z]+`?", cells[0]):
            rows[cells[0].strip("`")] = cells[1]
    return rows


def test_docs_table_matches_the_code():
    rows = _doc_table()
    for op, rw in D.REWRITES.items():
        assert rows.get(op, "").startswith("rewritten"), op
        assert rw.becomes in DOC.read_text(), op
    for op in D.ZERO_GRADIENT_OPS:
        assert rows.get(op, "").startswith("zero gradient"), op
    for op in D.NO_GRADIENT_OPS:
        assert rows.get(op, "").startswith("no gradient"), op
    for op in D.OUTPUTS_ADDED:
        assert rows.get(op, "").startswith("outputs added"), op
    documented = {op for op, status in rows.items() if not status.startswith("native")}
    assert documented == set(D.REWRITES) | set(D.ZERO_GRADIENT_OPS) | set(D.NO_GRADIENT_OPS) | set(D.OUTPUTS_ADDED)


UNARY_NATIVE = ("Relu", "LeakyRelu", "Sigmoid", "Tanh", "Erf", "Exp", "Abs", "Neg", "Sin", "Cos", "Identity",
                "GlobalAveragePool", "Flatten", "Softmax", "LogSoftmax")


def test_ops_the_docs_call_native_train_in_ort(tmp_path):
    """Every op the table calls native, in one graph: ORT builds its gradient and runs a step (no rewrite)."""
    from onnxqat.training import artifacts as art
    from onnxqat.training.loop import Engine
    from onnxqat.training.losses import LossTerm
    from onnxqat.training.objective import IOPlan

    native = {op for op, status in _doc_table().items() if status.startswith("native")}
    specs = {op: ({}, [], []) for op in UNARY_NATIVE}
    specs.update({
        "Clip": ({}, ["lo", "hi"], [f32("lo", 0.0), f32("hi", 6.0)]),
        "Pow": ({}, ["two"], [f32("two", 2.0)]), "Max": ({}, ["zero"], [f32("zero", 0.0)]),
        "Min": ({}, ["zero"], [f32("zero", 0.0)]), "Div": ({}, ["two"], [f32("two", 2.0)]),
        "MaxPool": ({"kernel_shape": [2, 2]}, [], []), "AveragePool": ({"kernel_shape": [2, 2]}, [], []),
        "Pad": ({}, ["pads"], [i64("pads", [0, 0, 1, 1, 0, 0, 1, 1])]),
        "Transpose": ({"perm": [0, 2, 3, 1]}, [], []), "Tile": ({}, ["reps"], [i64("reps", [1, 1, 2, 1])]),
        "Slice": ({}, ["st", "en", "ax"], [i64("st", [1]), i64("en", [3]), i64("ax", [1])]),
        "Gather": ({"axis": 1}, ["gi"], [i64("gi", [0, 2])]),
        "ReduceSum": ({}, ["rax"], [i64("rax", [1])]), "ReduceMean": ({"axes": [1]}, [], []),
        "Concat": ({"axis": 1}, ["c"], []), "Mul": ({}, ["c"], []), "Add": ({}, ["c"], []), "Sub": ({}, ["c"], []),
        "MatMul": ({}, ["mm"], [f32("mm", np.eye(6))]),
        "Reshape": ({}, ["shp"], [i64("shp", [0, -1])]),
        "BatchNormalization": ({}, ["bs", "bb", "bm", "bv"], [f32("bs", np.ones(8)), f32("bb", np.zeros(8)),
                                                               f32("bm", np.zeros(8)), f32("bv", np.ones(8))]),
        "Sqrt": ({}, [], []), "Where": ({}, [], []),
    })
    assert native <= set(specs), sorted(native - set(specs))
    rng = np.random.default_rng(0)
    nodes = [helper.make_node("Conv", ["x", "w"], ["c"], name="conv")]
    inits = [f32("w", rng.standard_normal((8, 8, 1, 1)) * 0.3)]
    means = []
    for k, op in enumerate(sorted(native)):
        attrs, ins, its = specs[op]
        src = "c"
        if op in ("Sqrt",):
            nodes.append(helper.make_node("Abs", ["c"], [f"abs{k}"], name=f"abs{k}"))
            src = f"abs{k}"
        if op == "Where":
            nodes.append(helper.make_node("Greater", ["c", f"wz{k}"], [f"gt{k}"], name=f"gt{k}"))
            inits.append(f32(f"wz{k}", 0.0))
            ins, src = [], f"gt{k}"
            nodes.append(helper.make_node("Where", [src, "c", f"wz{k}"], [f"y{k}"], name=f"op{k}"))
        else:
            ren = {t.name: f"{t.name}{k}" for t in its}
            inits += [numpy_helper.from_array(numpy_helper.to_array(t), ren[t.name]) for t in its]
            nodes.append(helper.make_node(op, [src, *[ren.get(i, i) for i in ins]], [f"y{k}"], name=f"op{k}",
                                          **attrs))
        nodes.append(helper.make_node("ReduceMean", [f"y{k}"], [f"m{k}"], keepdims=1, name=f"mean{k}"))
        nodes.append(helper.make_node("Reshape", [f"m{k}", "flat1"], [f"r{k}"], name=f"r{k}"))
        means.append(f"r{k}")
    inits.append(i64("flat1", [1]))
    nodes.append(helper.make_node("Concat", means, ["out"], axis=0, name="all"))
    g = helper.make_graph(nodes, "native", [helper.make_tensor_value_info("x", TensorProto.FLOAT, X_SHAPE)],
                          [helper.make_tensor_value_info("out", TensorProto.FLOAT, [len(means)])], inits)
    model = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    io = IOPlan("x", [], [LossTerm("out", "out", "mse", "out.target")])
    plan = art.plan_training(model, io)
    plan.trainable = ["w"]
    eng = Engine(model, tmp_path, 1, plan)
    assert plan.rewrites == []
    eng.module.lazy_reset_grad()
    x = rng.standard_normal(X_SHAPE).astype(np.float32)
    loss, _ = eng.train_step({"x": x, "out.target": np.zeros(len(means), np.float32)}, None)
    assert np.isfinite(loss) and np.abs(eng.state.parameters["w"].grad).sum() > 0
