"""ONNX Runtime training artifacts for a (float or QAT) model with any inputs and outputs.

`plan_training(model, io)` finds what trains and how the graph is fed:
- trainable (requires_grad): weights and biases of Conv/ConvTranspose/Gemm/MatMul (traced back through a weight
  quantizer node, and its restore_scale Mul, to the initializer; that constant stays constant), BatchNormalization
  scale and B, LayerNorm scale and shift (also as exported below opset 17), and input 1 (alpha/step) of SatActQuant/LsqQuant;
- frozen_params: BatchNormalization running mean and var (listed so that ORT's train step updates them);
- Dropout: ORT's Dropout draws from a process-wide generator that a resumed run cannot restore, so in the training copy
  each Dropout becomes `Mul(x, <node>.mask)` with the mask a graph input that the loop draws from the run's seed
  (keep with probability 1-ratio, scaled by 1/(1-ratio): ORT's Dropout semantics). The eval step gets masks of ones;
- io (objective.IOPlan): the data input, the other inputs, the loss terms (default: cross-entropy on the one output).

`training_copy(model, plan)` is the graph ORT trains; the user's model is never edited. Its passes, in order:
opset.upgrade_opset (below opset 13), Dropout masks, differentiable.apply_rewrites (ops without a gradient in ORT, on
gradient paths only), losses.add_loss (outputs: the loss, then each loss tensor), quantizer output annotations.
`generate(model, directory)` writes training_model.onnx, eval_model.onnx and checkpoint with
generate_artifacts(loss=None) (the graph's first output is the loss). With quantizer ops in the graph, the op
library's gradients are registered first and the library is passed to ORT (notes: both needed).
"""

from __future__ import annotations

import contextlib
import os
import re
import sys
import tempfile
import types
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from onnxqat.errors import ModelError, TrainingError
from onnxqat.graph import name_unnamed_nodes, quantizers_as_identity
from onnxqat.ops.schema import DOMAIN, is_quantizer, is_scale_restore
from onnxqat.training.differentiable import apply_rewrites, plan_rewrites, register_zero_gradients
from onnxqat.training.losses import add_loss
from onnxqat.training.objective import IOPlan, Objective, graph_inputs, resolve
from onnxqat.training.opset import upgrade_opset

_WEIGHT_OPS = {"Conv": (1, 2), "ConvTranspose": (1, 2), "Gemm": (1, 2), "MatMul": (0, 1)}
_PASS_THROUGH = {"Identity"}


def import_ort_training():
    """Imports onnxruntime.training.{artifacts, api} without torch (ORT issue 22070: optim imports torch)."""
    if "onnxruntime.training.optim" not in sys.modules:
        sys.modules["onnxruntime.training.optim"] = types.ModuleType("onnxruntime.training.optim")
    import onnxruntime as ort

    ort.set_default_logger_severity(3)
    from onnxruntime.training import artifacts
    from onnxruntime.training.api import CheckpointState, Module

    return ort, artifacts, Module, CheckpointState


@dataclass
class DropoutSite:
    name: str  # the Dropout node's name; the mask input is f"{name}.mask"
    ratio: float
    shape: tuple  # mask shape without the batch dimension
    mask_input: str


@dataclass
class TrainingPlan:
    input_name: str  # the input that takes the data
    output_name: str  # the tensor of the first loss term
    input_shape: tuple  # dims of the data input; None where symbolic
    num_classes: int | None  # classes of the classifier term (last dim of its tensor), when there is one
    trainable: list[str]
    quantizer_params: list[str]
    frozen: list[str]
    norm_params: list[str] = field(default_factory=list)  # BatchNorm/LayerNorm scale and shift (norm_decay)
    dropouts: list[DropoutSite] = field(default_factory=list)
    uses_custom_ops: bool = False
    io: IOPlan | None = None
    input_shapes: dict = field(default_factory=dict)  # every graph input's dims
    input_types: dict = field(default_factory=dict)  # every graph input's numpy dtype
    rewrites: list = field(default_factory=list)  # (node, op type) that differentiable rewrites (filled by the copy)
    messages: list[str] = field(default_factory=list)  # what the training copy changed, one line each

    @property
    def returned(self) -> list[str]:
        """The tensors every step returns after the loss (one per distinct loss tensor)."""
        return list(dict.fromkeys(t.tensor for t in self.io.terms))


def _dims(vi) -> tuple:
    return tuple(d.dim_value if d.HasField("dim_value") else None for d in vi.type.tensor_type.shape.dim)


def _annotate_quantizer_outputs(m: onnx.ModelProto) -> None:
    """Adds value_info (type and shape) for the outputs of quantizer nodes, which onnx cannot infer. ORT needs it:
    MaxPoolGrad reads its output shape from the graph and crashes (segfault) when a custom op's unknown-shape output
    feeds the MaxPool (e.g. SatActQuant replacing the Relu before a pool)."""
    outs = [o for n in m.graph.node if is_quantizer(n) for o in n.output if o]
    known = {vi.name for vi in list(m.graph.value_info) + list(m.graph.output)}
    todo = [o for o in outs if o not in known]
    if not todo:
        return
    try:
        inferred = onnx.shape_inference.infer_shapes(quantizers_as_identity(m), strict_mode=False)
    except Exception:
        return
    vis = {vi.name: vi for vi in inferred.graph.value_info}
    for o in todo:
        if o in vis and vis[o].type.tensor_type.HasField("shape"):
            m.graph.value_info.append(vis[o])


def _tensor_shapes(model: onnx.ModelProto) -> dict[str, tuple]:
    try:
        inferred = onnx.shape_inference.infer_shapes(quantizers_as_identity(model), strict_mode=False)
    except Exception:
        inferred = model
    g = inferred.graph
    return {vi.name: _dims(vi) for vi in list(g.input) + list(g.value_info) + list(g.output)
            if vi.type.tensor_type.HasField("shape")}


def _decomposed_layer_norm_params(g, inits, producers) -> list[str]:
    """Scale and shift of a LayerNorm exported below opset 17 as ops: Mul(Div(x - mean, Sqrt(var + eps)), scale)
    then Add(.., shift), scale and shift 1-D initializers. They train like LayerNormalization's (and must: ORT fuses
    the pattern back into LayerNormalization, whose gradient graph then defines scale_grad twice when the scale is a
    constant: "Duplicate definition of name (<scale>_grad)")."""
    consumers = {}
    for n in g.node:
        for i in n.input:
            consumers.setdefault(i, []).append(n)
    out = []
    for n in g.node:
        if n.op_type != "Mul" or len(n.input) != 2:
            continue
        a, w = (n.input[0], n.input[1]) if n.input[1] in inits else (n.input[1], n.input[0])
        div = producers.get(a)
        if w not in inits or len(inits[w].dims) != 1 or div is None or div.op_type != "Div":
            continue
        sq = producers.get(div.input[1])
        if sq is None or sq.op_type != "Sqrt":
            continue
        out.append(w)
        for c in consumers.get(n.output[0], []):
            if c.op_type == "Add":
                b = next((i for i in c.input if i in inits and len(inits[i].dims) == 1), None)
                if b:
                    out.append(b)
    return out


def plan_training(model: onnx.ModelProto, io: IOPlan | None = None) -> TrainingPlan:
    """What trains and how the graph is fed; `io` defaults to cross-entropy with labels on the one output."""
    g = model.graph
    inits = {i.name: i for i in g.initializer}
    producers = {o: n for n in g.node for o in n.output}
    if not g.output:
        raise ModelError("the model has no output")
    io = io or resolve(model, Objective(), has_labels=True)
    inputs = {i.name: i for i in graph_inputs(model)}

    def trace(name):
        seen = 0
        while name not in inits and name in producers and seen < 8:
            p = producers[name]
            if not (is_quantizer(p) or is_scale_restore(p) or p.op_type in _PASS_THROUGH) or not p.input:
                return None
            name = p.input[0]
            seen += 1
        return name if name in inits else None

    trainable, quant, frozen, norm = [], [], [], []

    def add(lst, name):
        if name and name in inits and name not in lst and inits[name].data_type == TensorProto.FLOAT:
            lst.append(name)

    for n in g.node:
        if is_quantizer(n):
            if n.op_type in ("SatActQuant", "LsqQuant") and len(n.input) > 1:
                add(quant, n.input[1])
        elif n.op_type in _WEIGHT_OPS:
            for i in _WEIGHT_OPS[n.op_type]:
                if i < len(n.input) and n.input[i]:
                    add(trainable, trace(n.input[i]))
        elif n.op_type == "BatchNormalization":
            for i in (1, 2):
                add(trainable, n.input[i])
                add(norm, n.input[i])
            for i in (3, 4):
                add(frozen, n.input[i])
        elif n.op_type == "LayerNormalization":
            for i in (1, 2):
                if i < len(n.input):
                    add(trainable, n.input[i])
                    add(norm, n.input[i])
    for name in _decomposed_layer_norm_params(g, inits, producers):
        add(trainable, name)
        add(norm, name)
    trainable = [t for t in trainable if t not in quant]
    # only parameters the loss depends on (ORT refuses a parameter it cannot reach: a head the loss does not read)
    reach = {t.tensor for t in io.terms}
    for n in reversed(list(g.node)):
        if any(o in reach for o in n.output if o):
            reach.update(i for i in n.input if i)
    trainable, quant, frozen = ([t for t in lst if t in reach] for lst in (trainable, quant, frozen))
    norm = [t for t in norm if t in trainable]
    dropouts = []
    shapes = _tensor_shapes(model) if any(n.op_type in ("Dropout",) for n in g.node) or io.terms else {}
    for n in g.node:
        if n.op_type != "Dropout":
            continue
        ratio = 0.5
        for a in n.attribute:
            if a.name == "ratio":
                ratio = a.f
        if len(n.input) > 1 and n.input[1]:
            if n.input[1] not in inits:
                raise ModelError(f"Dropout {n.name}: ratio must be a constant initializer")
            ratio = float(numpy_helper.to_array(inits[n.input[1]]).reshape(-1)[0])
        dims = shapes.get(n.input[0])
        if not dims or any(d is None for d in dims[1:]):
            raise ModelError(f"Dropout {n.name}: input shape unknown (shape inference failed); cannot build its mask")
        dropouts.append(DropoutSite(n.name or n.output[0], ratio, tuple(dims[1:]), f"{n.name or n.output[0]}.mask"))
    cls = io.classifier
    cls_dims = shapes.get(cls.tensor) if cls is not None else None
    num_classes = cls_dims[-1] if cls_dims and cls_dims[-1] else None
    return TrainingPlan(
        input_name=io.data_input, output_name=io.terms[0].tensor, input_shape=_dims(inputs[io.data_input]),
        num_classes=num_classes, trainable=trainable, quantizer_params=quant, frozen=frozen, norm_params=norm,
        dropouts=dropouts,
        uses_custom_ops=any(n.domain == DOMAIN for n in g.node), io=io,
        input_shapes={k: _dims(v) for k, v in inputs.items()},
        input_types={k: helper.tensor_dtype_to_np_dtype(v.type.tensor_type.elem_type) for k, v in inputs.items()},
    )


def training_copy(model: onnx.ModelProto, plan: TrainingPlan) -> onnx.ModelProto:
    """The graph ORT trains (see the module doc for its passes); records what changed in plan.messages/rewrites."""
    m = onnx.ModelProto()
    m.CopyFrom(model)
    g = m.graph
    sites = {d.name: d for d in plan.dropouts}
    nodes = []
    for n in g.node:
        key = n.name or (n.output[0] if n.output else "")
        if n.op_type == "Dropout" and key in sites:
            nodes.append(helper.make_node("Mul", [n.input[0], sites[key].mask_input], [n.output[0]], name=key))
        else:
            nodes.append(n)
    del g.node[:]
    g.node.extend(nodes)
    for d in plan.dropouts:
        g.input.append(helper.make_tensor_value_info(d.mask_input, TensorProto.FLOAT, ["mask_batch", *d.shape]))
    name_unnamed_nodes(g)
    m, msg = upgrade_opset(m)
    plan.messages = [msg] if msg else []
    params = plan.trainable + plan.quantizer_params
    plan.rewrites = plan_rewrites(m, params, plan.returned)
    m = apply_rewrites(m, plan.rewrites)
    if plan.rewrites:
        ops = sorted({op for _, op in plan.rewrites})
        plan.messages.append(f"training graph: {len(plan.rewrites)} node(s) changed so that ORT can differentiate "
                             f"them ({', '.join(ops)}; see docs/training-ops.md)")
    m = add_loss(m, plan.io.terms)
    _annotate_quantizer_outputs(m)
    from onnxqat.ops.gradients import add_gradient_outputs

    add_gradient_outputs(m)  # SatWeightQuant's derivative factor, which its gradient node reads (ORT O(1))
    g = m.graph
    used = {i for n in g.node for i in n.input}
    keep = [i for i in g.initializer if i.name in used]
    del g.initializer[:]
    g.initializer.extend(keep)
    return m


_ORT_INFO_LINE = re.compile(r"^\S+ \S+ \[I:onnxruntime")


@contextlib.contextmanager
def _without_ort_info_lines():
    """Drops ONNX Runtime's INFO lines from the process's stderr (fd 2) and passes every other line on.

    generate_artifacts builds the gradient graph through a logger that ignores set_default_logger_severity and
    prints each graph transformer it runs; users should see warnings and errors, not 40 lines of INFO.
    """
    sys.stderr.flush()
    saved = os.dup(2)
    with tempfile.TemporaryFile(mode="w+b") as capture:
        os.dup2(capture.fileno(), 2)
        try:
            yield
        finally:
            sys.stderr.flush()
            os.dup2(saved, 2)
            os.close(saved)
            capture.seek(0)
            kept = [ln for ln in capture.read().decode(errors="replace").splitlines() if not _ORT_INFO_LINE.match(ln)]
            if kept:
                sys.stderr.write("\n".join(kept) + "\n")


_NO_BUILDER = re.compile(r"gradient builder has not been registered: (\S+) for node (\S+)")
_NO_KERNEL = re.compile(r"Could not find an implementation for (\S+?)\((\d+)\) node with name '([^']*)'")


def ort_error_line(exc: BaseException) -> str:
    """One line for an ORT training failure: the op type and node when ORT names them, not a C++ signature."""
    text = str(exc)
    m = _NO_BUILDER.search(text)
    if m:
        return (f"{m.group(1)} node {m.group(2)} has no gradient in onnxruntime-training 1.19.2 and onnxqat has no "
                "rewrite for it (see docs/training-ops.md)")
    m = _NO_KERNEL.search(text)
    if m:
        return f"onnxruntime-training 1.19.2 has no CPU kernel for {m.group(1)} (node {m.group(3) or '?'})"
    lines = [ln.strip() for ln in text.strip().splitlines() if ln.strip()]
    line = lines[0] if lines else type(exc).__name__
    if "[ONNXRuntimeError]" in line:  # '<C++ location> [ONNXRuntimeError] : 2 : INVALID_ARGUMENT : <message>'
        line = line.split("[ONNXRuntimeError]", 1)[1].split(" : ", 3)[-1]
    # drop the '/onnxruntime_src/...cc:123 onnxruntime::...(...) ' prefix of ORT's C++ messages
    line = re.sub(r"^\S*onnxruntime_src\S*:\d+ .*?\) (?=\S)", "", line)
    return line[:300]


def generate(model: onnx.ModelProto, directory: str | os.PathLike, plan: TrainingPlan | None = None) -> dict:
    """Writes the artifacts; returns their paths and the plan."""
    plan = plan or plan_training(model)
    if not plan.trainable and not plan.quantizer_params:
        raise TrainingError("the model has no trainable parameter (no Conv/Gemm/MatMul weight, BN scale/shift or "
                            "quantizer alpha/step initializer)")
    ort, artifacts, _, _ = import_ort_training()
    d = Path(directory)
    d.mkdir(parents=True, exist_ok=True)
    kwargs = {}
    if plan.uses_custom_ops:
        from onnxqat.ops.gradients import register_gradients
        from onnxqat.ops.library import library_path

        register_gradients()
        kwargs["custom_op_library"] = str(library_path())
    register_zero_gradients()
    tm = training_copy(model, plan)
    try:
        with _without_ort_info_lines():
            artifacts.generate_artifacts(
                tm, requires_grad=plan.trainable + plan.quantizer_params, frozen_params=plan.frozen,
                loss=None, artifact_directory=str(d), **kwargs)
    except Exception as exc:
        raise TrainingError(f"ONNX Runtime could not build the training graph: {ort_error_line(exc)}") from exc
    return {"train": d / "training_model.onnx", "eval": d / "eval_model.onnx", "checkpoint": d / "checkpoint",
            "plan": plan}


def write_back(model: onnx.ModelProto, params: dict[str, np.ndarray]) -> onnx.ModelProto:
    """A copy of the forward model with initializers replaced by the trained values (by name), BN statistics included."""
    m = onnx.ModelProto()
    m.CopyFrom(model)
    for init in m.graph.initializer:
        if init.name in params:
            arr = np.asarray(params[init.name], dtype=helper.tensor_dtype_to_np_dtype(init.data_type))
            old = tuple(init.dims)
            if arr.size != int(np.prod(old)):
                raise ModelError(f"initializer {init.name}: trained value has {arr.size} elements, model has shape {old}")
            init.CopyFrom(numpy_helper.from_array(arr.reshape(old), init.name))
    return m


def copy_initializers(model: onnx.ModelProto, source: onnx.ModelProto,
                      only: set[str] | None = None) -> tuple[onnx.ModelProto, list[str]]:
    """`--init-from`: copies every initializer of `source` whose name and element count match into `model`
    (restricted to the names in `only` when given)."""
    src = {i.name: numpy_helper.to_array(i) for i in source.graph.initializer}
    dst = {i.name: i for i in model.graph.initializer}
    copied = [n for n in src if n in dst and (only is None or n in only) and src[n].size == int(np.prod(tuple(dst[n].dims)))
              and src[n].dtype == helper.tensor_dtype_to_np_dtype(dst[n].data_type)]
    return write_back(model, {n: src[n] for n in copied}), copied
