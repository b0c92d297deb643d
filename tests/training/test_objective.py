"""objective.py and losses.py: which input takes the data, which outputs the loss reads (errors list the choices),
trailing Softmax -> logits, and the loss subgraph's value against numpy formulas (onnxruntime runs the graph)."""

from __future__ import annotations

import numpy as np
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper

from any_models import keras_nhwc, two_in_three_out
from onnxqat.errors import ModelError, TrainingError
from onnxqat.training.losses import LOSS, LossTerm, add_loss
from onnxqat.training.objective import Objective, resolve


def test_data_input_and_outputs_by_default():
    io = resolve(two_in_three_out(), Objective(outputs=("logits",)), has_labels=True)
    assert io.data_input == "image" and io.extra_inputs == ["state"]  # the one 4-D input
    assert [(t.output, t.kind, t.target) for t in io.terms] == [("logits", "ce", "labels")]
    io = resolve(keras_nhwc(), Objective(), has_labels=True)  # one output: the classifier
    assert [(t.output, t.kind) for t in io.terms] == [("probs", "ce")]
    io = resolve(two_in_three_out(), Objective(), has_labels=False)  # no labels: distil every output
    assert [(t.output, t.kind) for t in io.terms] == [("logits", "mse"), ("map", "mse"), ("state_out", "mse")]
    io = resolve(two_in_three_out(), Objective(outputs=("map:2", "logits")), has_labels=False)
    assert [(t.output, t.weight) for t in io.terms] == [("map", 2.0), ("logits", 1.0)]


def test_ambiguous_choices_are_one_line_listing_them():
    m = two_in_three_out()
    m.graph.input[0].type.tensor_type.shape.dim[2].dim_param = "H"  # still 4-D
    extra = helper.make_tensor_value_info("image2", TensorProto.FLOAT, ["N", 3, 8, 8])
    m.graph.input.append(extra)
    with pytest.raises(ModelError, match=r"^the model has 3 inputs \(image \[\?, 3, \?, 8\], state \[\?, 4\], "
                                         r"image2 \[\?, 3, 8, 8\]\): say which one takes the data \(--data-input "
                                         r"NAME\)$"):
        resolve(m, Objective())
    with pytest.raises(ModelError, match=r"^the model has 3 outputs \(logits \[\?, 5\], map \[\?, 1, 8, 8\], "
                                         r"state_out \[\?, 4\]\): say which one the cross-entropy reads "
                                         r"\(--loss-output NAME\[:WEIGHT\], repeatable\)$"):
        resolve(two_in_three_out(), Objective())  # two 2-D outputs
    with pytest.raises(ModelError, match=r"loss output 'boxes' is not a model output \(outputs: logits"):
        resolve(two_in_three_out(), Objective(outputs=("boxes",)))
    with pytest.raises(TrainingError, match="loss ce needs labels and the data has none"):
        resolve(two_in_three_out(), Objective(loss="ce"), has_labels=False)


def test_trailing_softmax_takes_the_logits():
    io = resolve(keras_nhwc(), Objective(), has_labels=True)
    assert io.terms[0].tensor == "logits" and io.terms[0].output == "probs"
    assert io.messages == ["output probs is a Softmax: the loss takes its input logits (the logits)"]
    io = resolve(keras_nhwc(), Objective(distill=True), has_labels=True)
    assert io.terms[0].tensor == "probs"  # MSE matches the probabilities as they are


def _run_loss(terms, feeds, y_shape):
    g = helper.make_graph([helper.make_node("Identity", ["x"], ["y"])], "id",
                          [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", *y_shape])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", *y_shape])])
    m = add_loss(helper.make_model(g, opset_imports=[helper.make_opsetid("", 13)]), terms)
    assert [o.name for o in m.graph.output] == [LOSS, "y"]
    sess = ort.InferenceSession(m.SerializeToString(), providers=["CPUExecutionProvider"])
    return float(sess.run([LOSS], feeds)[0])


def _log_softmax(z):
    z = z - z.max(axis=-1, keepdims=True)
    return z - np.log(np.exp(z).sum(axis=-1, keepdims=True))


def test_loss_values_match_numpy():
    rng = np.random.default_rng(0)
    y = rng.standard_normal((6, 5)).astype(np.float32)
    t = rng.standard_normal((6, 5)).astype(np.float32)
    lab = rng.integers(0, 5, 6)
    ce = _run_loss([LossTerm("y", "y", "ce", "labels")], {"x": y, "labels": lab}, [5])
    assert ce == pytest.approx(-np.mean(_log_softmax(y.astype(np.float64))[np.arange(6), lab]), rel=1e-5)
    mse = _run_loss([LossTerm("y", "y", "mse", "y.target", weight=2.0, scale=0.5)], {"x": y, "y.target": t}, [5])
    assert mse == pytest.approx(np.mean((y - t).astype(np.float64) ** 2), rel=1e-5)
    l1 = _run_loss([LossTerm("y", "y", "l1", "y.target", weight=3.0)], {"x": y, "y.target": t}, [5])
    assert l1 == pytest.approx(3.0 * np.mean(np.abs(y - t).astype(np.float64)), rel=1e-5)
    T = 2.5
    kl = _run_loss([LossTerm("y", "y", "kl", "y.target", temperature=T)], {"x": y, "y.target": t}, [5])
    lt, ls = _log_softmax(t.astype(np.float64) / T), _log_softmax(y.astype(np.float64) / T)
    assert kl == pytest.approx(T * T * np.mean(np.sum(np.exp(lt) * (lt - ls), axis=-1)), rel=1e-5)
    both = _run_loss([LossTerm("y", "y", "mse", "y.target"), LossTerm("y", "y", "l1", "y.target", weight=0.5)],
                     {"x": y, "y.target": t}, [5])
    assert both == pytest.approx(mse + l1 / 6.0, rel=1e-5)
