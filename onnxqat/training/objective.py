"""What training feeds and what the loss reads, for models with any number of inputs and outputs.

`resolve(model, Objective(...), has_labels)` -> IOPlan:
- the data input: the one input, else the one 4-D (image) input, else the one the user names; the other inputs are
  fed by the loop (from the data's per-input arrays or constants);
- the loss terms (losses.LossTerm): cross-entropy with labels on a classifier output, or distillation (MSE, L1 or KL
  with temperature) against the float model's outputs on the same batch. With labels and no choice, the one output
  (or the one 2-D output) is the classifier; distillation matches every float output unless told which;
- a trailing Softmax/LogSoftmax: cross-entropy and KL take their input (the logits), and a message says so.
Where the choice is ambiguous the error lists the choices in one line.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import onnx
from onnx import TensorProto

from onnxqat.errors import ModelError, TrainingError
from onnxqat.graph import default_opset
from onnxqat.training.losses import KINDS, LossTerm

LABELS = "labels"
DISTILL_KINDS = ("mse", "l1", "kl")


@dataclass(frozen=True)
class Objective:
    """The user's choices; None/empty = decide from the model and the data."""

    loss: str | None = None  # ce | mse | l1 | kl
    outputs: tuple[str, ...] = ()  # "name" or "name:weight"
    distill: bool = False  # targets from the float model (teacher) instead of labels
    temperature: float = 1.0  # kl
    data_input: str | None = None


@dataclass
class IOPlan:
    data_input: str
    extra_inputs: list[str]
    terms: list[LossTerm]
    messages: list[str] = field(default_factory=list)

    @property
    def needs_teacher(self) -> bool:
        return any(t.kind != "ce" for t in self.terms)

    @property
    def uses_labels(self) -> bool:
        return any(t.kind == "ce" for t in self.terms)

    @property
    def classifier(self) -> LossTerm | None:
        """The term whose tensor gives top-1 (the cross-entropy one, else a KL one)."""
        for kind in ("ce", "kl"):
            for t in self.terms:
                if t.kind == kind:
                    return t
        return None


def _dims(vi) -> tuple:
    if not vi.type.tensor_type.HasField("shape"):
        return ()
    return tuple(d.dim_value if d.HasField("dim_value") else None for d in vi.type.tensor_type.shape.dim)


def _fmt(vi) -> str:
    d = _dims(vi)
    return f"{vi.name} [{', '.join('?' if x is None else str(x) for x in d)}]" if d else vi.name


def graph_inputs(model: onnx.ModelProto) -> list:
    inits = {i.name for i in model.graph.initializer}
    return [i for i in model.graph.input if i.name not in inits]


def choose_data_input(model: onnx.ModelProto, wanted: str | None) -> str:
    ins = graph_inputs(model)
    if not ins:
        raise ModelError("the model has no input")
    names = [i.name for i in ins]
    if wanted:
        if wanted not in names:
            raise ModelError(f"data input {wanted!r} is not a model input (inputs: {', '.join(map(_fmt, ins))})")
        return wanted
    if len(ins) == 1:
        return ins[0].name
    images = [i for i in ins if len(_dims(i)) == 4]
    if len(images) == 1:
        return images[0].name
    raise ModelError(f"the model has {len(ins)} inputs ({', '.join(map(_fmt, ins))}): say which one takes the data "
                     "(--data-input NAME)")


def _parse_outputs(specs, outs: dict) -> list[tuple[str, float]]:
    chosen = []
    for s in specs:
        name, _, w = str(s).partition(":")
        if name not in outs:
            raise ModelError(f"loss output {name!r} is not a model output (outputs: "
                             f"{', '.join(_fmt(v) for v in outs.values())})")
        try:
            weight = float(w) if w else 1.0
        except ValueError:
            raise ModelError(f"loss output {s!r}: the weight after ':' must be a number") from None
        chosen.append((name, weight))
    return chosen


def _logits_of(model: onnx.ModelProto, output: str) -> str | None:
    """The input of a trailing Softmax/LogSoftmax over the last axis producing `output`, else None."""
    producer = {o: n for n in model.graph.node for o in n.output}
    n = producer.get(output)
    if n is None or n.domain not in ("", "ai.onnx") or n.op_type not in ("Softmax", "LogSoftmax"):
        return None
    axis = next((a.i for a in n.attribute if a.name == "axis"), -1 if default_opset(model) >= 13 else 1)
    out_vi = next((o for o in model.graph.output if o.name == output), None)
    rank = len(_dims(out_vi)) if out_vi is not None else 0
    if axis == -1 or (rank and axis == rank - 1):
        return n.input[0]
    return None


def resolve(model: onnx.ModelProto, objective: Objective | None = None, has_labels: bool = True) -> IOPlan:
    obj = objective or Objective()
    data_input = choose_data_input(model, obj.data_input)
    extra = [i.name for i in graph_inputs(model) if i.name != data_input]
    outs = {o.name: o for o in model.graph.output if o.type.tensor_type.elem_type == TensorProto.FLOAT}
    if not outs:
        raise ModelError("the model has no float output for a loss to read")
    kind = obj.loss.lower() if obj.loss else None
    if kind is not None and kind not in KINDS:
        raise TrainingError(f"unknown loss {obj.loss!r} (ce, mse, l1, kl)")
    if kind is None:
        kind = "mse" if (obj.distill or not has_labels) else "ce"
    if kind == "ce" and obj.distill:
        raise TrainingError("loss ce reads labels; distillation takes mse, l1 or kl")
    if kind == "ce" and not has_labels:
        raise TrainingError("loss ce needs labels and the data has none: distil from the float model instead "
                            "(--distill)")
    chosen = _parse_outputs(obj.outputs, outs)
    listing = ", ".join(_fmt(v) for v in outs.values())
    if not chosen:
        if kind == "ce":
            cands = list(outs) if len(outs) == 1 else [n for n, v in outs.items() if len(_dims(v)) == 2]
            if len(cands) != 1:
                raise ModelError(f"the model has {len(outs)} outputs ({listing}): say which one the cross-entropy "
                                 "reads (--loss-output NAME[:WEIGHT], repeatable)")
            chosen = [(cands[0], 1.0)]
        else:
            chosen = [(n, 1.0) for n in outs]
    messages, terms = [], []
    for name, weight in chosen:
        tensor = name
        if kind in ("ce", "kl"):
            logits = _logits_of(model, name)
            if logits is not None:
                tensor = logits
                messages.append(f"output {name} is a Softmax: the loss takes its input {logits} (the logits)")
            elif kind == "kl" and len(_dims(outs[name])) < 2:
                raise ModelError(f"loss kl needs logits with classes on the last axis; output {_fmt(outs[name])} "
                                 "has none")
        target = LABELS if kind == "ce" else f"{tensor}.target"
        terms.append(LossTerm(tensor, name, kind, target, weight, 1.0, obj.temperature))
    return IOPlan(data_input, extra, terms, messages)
