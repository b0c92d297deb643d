"""Training-copy pass: the loss, written as ONNX nodes into the training graph (generate_artifacts(loss=None) then
takes the graph's first output as the loss).

Kinds (each term reads one tensor of the model and one target graph input):
- `ce`:  cross-entropy with integer labels, SoftmaxCrossEntropyLoss(logits, labels), mean over the batch;
- `mse`: mean((y - t)^2), `l1`: mean(|y - t|), against a float target of y's shape (a teacher's output);
- `kl`:  distillation on logits with temperature T: T^2 * mean over samples of
         sum_k softmax(t/T)_k * (log_softmax(t/T)_k - log_softmax(y/T)_k)   (Hinton et al.; classes on the last axis).
The loss is sum_i weight_i * scale_i * term_i (scale: e.g. 1/mean(t^2) for a relative MSE, set by the objective).
Graph outputs of the training copy: LOSS, then every term's tensor (returned by each step for accuracy and metrics).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from onnxqat.errors import TrainingError

LOSS = "onnxqat_loss"
KINDS = ("ce", "mse", "l1", "kl")


@dataclass(frozen=True)
class LossTerm:
    tensor: str  # the tensor the loss reads: a model output, or the logits before a trailing (Log)Softmax
    output: str  # the model output it stands for (what the user named)
    kind: str  # one of KINDS
    target: str  # the graph input holding the labels (ce) or the teacher's values
    weight: float = 1.0
    scale: float = 1.0  # a fixed normalisation multiplying the term (relative MSE)
    temperature: float = 1.0  # kl

    def describe(self) -> str:
        what = {"ce": "cross-entropy with labels", "mse": "MSE to the teacher", "l1": "L1 to the teacher",
                "kl": f"KL to the teacher (temperature {self.temperature:g})"}[self.kind]
        via = f" (on its logits {self.tensor})" if self.tensor != self.output else ""
        w = f" x {self.weight:g}" if self.weight != 1.0 else ""
        return f"{self.output}{via}: {what}{w}"


def _value_info(model: onnx.ModelProto, tensor: str):
    from onnxqat.graph import quantizers_as_identity

    g = model.graph
    for vi in list(g.output) + list(g.value_info) + list(g.input):
        if vi.name == tensor and vi.type.tensor_type.HasField("shape"):
            return vi
    try:
        inferred = onnx.shape_inference.infer_shapes(quantizers_as_identity(model), strict_mode=False)
    except Exception:
        return None
    for vi in list(inferred.graph.output) + list(inferred.graph.value_info):
        if vi.name == tensor:
            return vi
    return None


def target_input(model: onnx.ModelProto, term: LossTerm) -> onnx.ValueInfoProto:
    """The graph input holding the term's target: int64 [N] labels, or a float tensor shaped like term.tensor."""
    if term.kind == "ce":
        return helper.make_tensor_value_info(term.target, TensorProto.INT64, ["batch"])
    vi = _value_info(model, term.tensor)
    if vi is None or not vi.type.tensor_type.HasField("shape"):
        return helper.make_tensor_value_info(term.target, TensorProto.FLOAT, None)
    dims = [d.dim_value if d.HasField("dim_value") else (d.dim_param or f"{term.target}_d{k}")
            for k, d in enumerate(vi.type.tensor_type.shape.dim)]
    if dims:
        dims[0] = "batch"
    return helper.make_tensor_value_info(term.target, TensorProto.FLOAT, dims)


def add_loss(model: onnx.ModelProto, terms: list[LossTerm]) -> onnx.ModelProto:
    """A copy of `model` whose outputs are LOSS (a scalar) then each term's tensor, with target inputs added."""
    if not terms:
        raise TrainingError("no loss term: nothing to train against")
    m = onnx.ModelProto()
    m.CopyFrom(model)
    g = m.graph
    nodes, inits = [], []
    count = [0]

    def t(what: str) -> str:
        count[0] += 1
        return f"{LOSS}/{what}{count[0]}"

    def const(value, dtype=np.float32) -> str:
        name = t("c")
        inits.append(numpy_helper.from_array(np.asarray(value, dtype=dtype), name))
        return name

    def node(op, inputs, **attrs) -> str:
        out = t(op.lower())
        nodes.append(helper.make_node(op, inputs, [out], name=out, **attrs))
        return out

    def mean_all(x) -> str:
        return node("ReduceMean", [x], keepdims=0)  # no axes: every axis (all opsets)

    def sum_last(x) -> str:
        return node("ReduceSum", [x, const([-1], np.int64)], keepdims=0)

    term_losses = []
    for term in terms:
        if term.kind not in KINDS:
            raise TrainingError(f"unknown loss kind {term.kind!r} (known: {', '.join(KINDS)})")
        y, tgt = term.tensor, term.target
        if term.kind == "ce":
            loss = t("ce")  # the gradient reads output 1 (log_prob): ORT needs the node to have it
            nodes.append(helper.make_node("SoftmaxCrossEntropyLoss", [y, tgt], [loss, t("log_prob")], name=loss,
                                          reduction="mean"))
        elif term.kind in ("mse", "l1"):
            d = node("Sub", [y, tgt])
            loss = mean_all(node("Mul", [d, d]) if term.kind == "mse" else node("Abs", [d]))
        else:
            temp = const(term.temperature)
            log_t = node("LogSoftmax", [node("Div", [tgt, temp])], axis=-1)
            log_s = node("LogSoftmax", [node("Div", [y, temp])], axis=-1)
            kl = sum_last(node("Mul", [node("Exp", [log_t]), node("Sub", [log_t, log_s])]))
            loss = node("Mul", [mean_all(kl), const(term.temperature ** 2)])
        factor = term.weight * term.scale
        term_losses.append(loss if factor == 1.0 else node("Mul", [loss, const(factor)]))
    total = term_losses[0]
    for other in term_losses[1:]:  # Add, not Sum: ORT 1.19.2 has no gradient for Sum
        total = node("Add", [total, other])
    nodes.append(helper.make_node("Identity", [total], [LOSS], name=LOSS))
    g.node.extend(nodes)
    g.initializer.extend(inits)
    known_inputs = {i.name for i in g.input}
    for term in terms:
        if term.target not in known_inputs:
            g.input.append(target_input(m, term))
            known_inputs.add(term.target)
    outs = [helper.make_tensor_value_info(LOSS, TensorProto.FLOAT, [])]
    seen = set()
    for term in terms:
        if term.tensor in seen:
            continue
        seen.add(term.tensor)
        vi = _value_info(model, term.tensor)
        outs.append(vi if vi is not None else helper.make_tensor_value_info(term.tensor, TensorProto.FLOAT, None))
    del g.output[:]
    g.output.extend(outs)
    return m
