"""Training-copy pass: ops with no gradient (or no CPU gradient kernel) in onnxruntime-training 1.19.2, rewritten
into standard ops that have one.

`REWRITES` (op type -> Rewrite) is the list that docs/training-ops.md documents (a test checks the two agree). Each
rewrite computes the same function with ops whose gradient ORT has (HardSigmoid = Clip(alpha*x + beta, 0, 1), ...);
`ZERO_GRADIENT_OPS` (Round, Floor, Ceil, Sign: derivative 0 wherever it exists) get a registered gradient definition
instead; `NO_GRADIENT_OPS` are known to have neither: training stops with one line naming op type and node.

Only nodes that a gradient must pass through are touched: a node some of whose float inputs depend on a trainable
parameter and some of whose outputs reach the loss (`gradient_nodes`). A HardSigmoid on the network input, before the
first weighted layer, is left alone (ORT builds no gradient for it).

    steps = plan_rewrites(model, trainable, loss_outputs)    # [(node name, op type)], nothing edited
    model = apply_rewrites(model, steps)                     # a new ModelProto, same output names

The original model is never edited: trained values map back by name (rewrites add initializers, rename nothing).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from onnxqat.errors import TrainingError
from onnxqat.graph import default_opset, infer_shapes, quantizers_as_identity


@dataclass
class Context:
    """What a rewrite needs: shapes, the opset, unique names, and a place for its constants."""

    model: onnx.ModelProto
    shapes: dict[str, tuple]
    opset: int
    taken: set[str]
    initializers: list[TensorProto]

    def name(self, node: onnx.NodeProto, what: str) -> str:
        base = f"{node.name or node.output[0]}/{what}"
        n, k = base, 1
        while n in self.taken:
            n, k = f"{base}_{k}", k + 1
        self.taken.add(n)
        return n

    def const(self, node: onnx.NodeProto, what: str, value, dtype=np.float32) -> str:
        n = self.name(node, what)
        self.initializers.append(numpy_helper.from_array(np.asarray(value, dtype=dtype), n))
        return n

    def static_shape(self, node: onnx.NodeProto, tensor: str, dims: slice = slice(1, None)) -> tuple[int, ...]:
        shape = self.shapes.get(tensor)
        if shape is None or any(d is None for d in shape[dims]):
            raise TrainingError(f"{node.op_type} node {node.name}: the shape of {tensor} is not known "
                                f"({list(shape) if shape else 'unknown'}); its training rewrite needs it")
        return shape

    def reduce_mean(self, node, x: str, axes: list[int], out: str) -> onnx.NodeProto:
        if self.opset >= 18:
            return helper.make_node("ReduceMean", [x, self.const(node, "axes", axes, np.int64)], [out], keepdims=1)
        return helper.make_node("ReduceMean", [x], [out], axes=axes, keepdims=1)


def _attr(node: onnx.NodeProto, name: str, default):
    for a in node.attribute:
        if a.name == name:
            return helper.get_attribute_value(a)
    return default


def _hard_sigmoid(ctx, node, x, out, alpha, beta):
    t1, t2 = ctx.name(node, "mul"), ctx.name(node, "add")
    return [helper.make_node("Mul", [x, ctx.const(node, "alpha", alpha)], [t1]),
            helper.make_node("Add", [t1, ctx.const(node, "beta", beta)], [t2]),
            helper.make_node("Clip", [t2, ctx.const(node, "zero", 0.0), ctx.const(node, "one", 1.0)], [out])]


def rw_hard_sigmoid(ctx, node):
    return _hard_sigmoid(ctx, node, node.input[0], node.output[0], _attr(node, "alpha", 0.2), _attr(node, "beta", 0.5))


def rw_hard_swish(ctx, node):
    hs = ctx.name(node, "hardsigmoid")
    return _hard_sigmoid(ctx, node, node.input[0], hs, 1.0 / 6.0, 0.5) + [
        helper.make_node("Mul", [node.input[0], hs], [node.output[0]])]


def rw_softplus(ctx, node):
    x = node.input[0]
    a, na, e, e1, lg, r = (ctx.name(node, k) for k in ("abs", "neg", "exp", "exp1", "log", "relu"))
    return [helper.make_node("Abs", [x], [a]), helper.make_node("Neg", [a], [na]), helper.make_node("Exp", [na], [e]),
            helper.make_node("Add", [e, ctx.const(node, "one", 1.0)], [e1]), helper.make_node("Log", [e1], [lg]),
            helper.make_node("Relu", [x], [r]), helper.make_node("Add", [r, lg], [node.output[0]])]


def rw_softsign(ctx, node):
    x = node.input[0]
    a, d = ctx.name(node, "abs"), ctx.name(node, "den")
    return [helper.make_node("Abs", [x], [a]), helper.make_node("Add", [a, ctx.const(node, "one", 1.0)], [d]),
            helper.make_node("Div", [x, d], [node.output[0]])]


def _exp_linear(ctx, node, alpha: float, gamma: float, inner_scale: float):
    """gamma * (Relu(x) + alpha * (Exp(Min(x, 0) * inner_scale) - 1)): Elu, Selu, Celu."""
    x = node.input[0]
    m, s, e, em1, am, r, sm = (ctx.name(node, k) for k in ("min", "scaled", "exp", "expm1", "neg_part", "relu", "sum"))
    nodes = [helper.make_node("Min", [x, ctx.const(node, "zero", 0.0)], [m]),
             helper.make_node("Mul", [m, ctx.const(node, "inner", inner_scale)], [s]),
             helper.make_node("Exp", [s], [e]),
             helper.make_node("Sub", [e, ctx.const(node, "one", 1.0)], [em1]),
             helper.make_node("Mul", [em1, ctx.const(node, "alpha", alpha)], [am]),
             helper.make_node("Relu", [x], [r])]
    if gamma == 1.0:
        return nodes + [helper.make_node("Add", [r, am], [node.output[0]])]
    return nodes + [helper.make_node("Add", [r, am], [sm]),
                    helper.make_node("Mul", [sm, ctx.const(node, "gamma", gamma)], [node.output[0]])]


def rw_elu(ctx, node):
    return _exp_linear(ctx, node, _attr(node, "alpha", 1.0), 1.0, 1.0)


def rw_selu(ctx, node):
    return _exp_linear(ctx, node, _attr(node, "alpha", 1.67326319217681884765625),
                       _attr(node, "gamma", 1.05070102214813232421875), 1.0)


def rw_celu(ctx, node):
    alpha = _attr(node, "alpha", 1.0)
    return _exp_linear(ctx, node, alpha, 1.0, 1.0 / alpha)


def rw_thresholded_relu(ctx, node):
    x = node.input[0]
    g = ctx.name(node, "greater")
    return [helper.make_node("Greater", [x, ctx.const(node, "alpha", _attr(node, "alpha", 1.0))], [g]),
            helper.make_node("Where", [g, x, ctx.const(node, "zero", 0.0)], [node.output[0]])]


def rw_prelu(ctx, node):
    x, slope = node.input[0], node.input[1]
    r, m, sm = ctx.name(node, "relu"), ctx.name(node, "min"), ctx.name(node, "neg_part")
    return [helper.make_node("Relu", [x], [r]), helper.make_node("Min", [x, ctx.const(node, "zero", 0.0)], [m]),
            helper.make_node("Mul", [m, slope], [sm]), helper.make_node("Add", [r, sm], [node.output[0]])]


def rw_global_max_pool(ctx, node):
    shape = ctx.static_shape(node, node.input[0], slice(2, None))
    return [helper.make_node("MaxPool", [node.input[0]], [node.output[0]], kernel_shape=list(shape[2:]))]


def rw_depth_to_space(ctx, node):
    n, c, h, w = ctx.static_shape(node, node.input[0])
    b = int(_attr(node, "blocksize", 1))
    mode = _attr(node, "mode", b"DCR")
    mode = mode.decode() if isinstance(mode, bytes) else mode
    c2 = c // (b * b)
    if mode == "CRD":
        first, perm = [0, c2, b, b, h, w], [0, 1, 4, 2, 5, 3]
    else:
        first, perm = [0, b, b, c2, h, w], [0, 3, 4, 1, 5, 2]
    r1, t = ctx.name(node, "split_channels"), ctx.name(node, "transposed")
    return [helper.make_node("Reshape", [node.input[0], ctx.const(node, "shape1", first, np.int64)], [r1]),
            helper.make_node("Transpose", [r1], [t], perm=perm),
            helper.make_node("Reshape", [t, ctx.const(node, "shape2", [0, c2, h * b, w * b], np.int64)],
                             [node.output[0]])]


def rw_space_to_depth(ctx, node):
    n, c, h, w = ctx.static_shape(node, node.input[0])
    b = int(_attr(node, "blocksize", 1))
    r1, t = ctx.name(node, "split_space"), ctx.name(node, "transposed")
    return [helper.make_node("Reshape", [node.input[0], ctx.const(node, "shape1", [0, c, h // b, b, w // b, b],
                                                                  np.int64)], [r1]),
            helper.make_node("Transpose", [r1], [t], perm=[0, 3, 5, 1, 2, 4]),
            helper.make_node("Reshape", [t, ctx.const(node, "shape2", [0, c * b * b, h // b, w // b], np.int64)],
                             [node.output[0]])]


def rw_lrn(ctx, node):
    shape = ctx.static_shape(node, node.input[0], slice(1, 2))
    c = shape[1]
    size = int(_attr(node, "size", 1))
    alpha, beta, bias = _attr(node, "alpha", 1e-4), _attr(node, "beta", 0.75), _attr(node, "bias", 1.0)
    lo, hi = (size - 1) // 2, size - 1 - (size - 1) // 2  # ONNX: [c - floor((size-1)/2), c + ceil((size-1)/2)]
    band = np.zeros((c, c) + (1,) * (len(shape) - 2), np.float32)
    for co in range(c):
        band[co, max(0, co - lo):min(c - 1, co + hi) + 1] = 1.0
    x = node.input[0]
    sq, s, sc, sb, p = (ctx.name(node, k) for k in ("square", "window_sum", "scaled", "biased", "pow"))
    return [helper.make_node("Mul", [x, x], [sq]),
            helper.make_node("Conv", [sq, ctx.const(node, "band", band)], [s]),
            helper.make_node("Mul", [s, ctx.const(node, "alpha_over_size", alpha / size)], [sc]),
            helper.make_node("Add", [sc, ctx.const(node, "bias", bias)], [sb]),
            helper.make_node("Pow", [sb, ctx.const(node, "beta", beta)], [p]),
            helper.make_node("Div", [x, p], [node.output[0]])]


def rw_instance_norm(ctx, node):
    shape = ctx.static_shape(node, node.input[0], slice(0, 0))
    rank = len(shape)
    axes = list(range(2, rank))
    x, scale, bias = node.input[0], node.input[1], node.input[2]
    eps = _attr(node, "epsilon", 1e-5)
    m, d, d2, v, ve, sd, nrm, sr, br, ss = (ctx.name(node, k) for k in (
        "mean", "centered", "squared", "var", "var_eps", "std", "normalized", "scale_r", "bias_r", "scaled"))
    per_channel = ctx.const(node, "channel_shape", [-1] + [1] * (rank - 2), np.int64)
    return [ctx.reduce_mean(node, x, axes, m), helper.make_node("Sub", [x, m], [d]),
            helper.make_node("Mul", [d, d], [d2]), ctx.reduce_mean(node, d2, axes, v),
            helper.make_node("Add", [v, ctx.const(node, "epsilon", eps)], [ve]), helper.make_node("Sqrt", [ve], [sd]),
            helper.make_node("Div", [d, sd], [nrm]),
            helper.make_node("Reshape", [scale, per_channel], [sr]),
            helper.make_node("Reshape", [bias, per_channel], [br]),
            helper.make_node("Mul", [nrm, sr], [ss]), helper.make_node("Add", [ss, br], [node.output[0]])]


def rw_sum(ctx, node):
    ins = [i for i in node.input if i]
    if len(ins) == 1:
        return [helper.make_node("Identity", ins, [node.output[0]])]
    nodes, acc = [], ins[0]
    for k, i in enumerate(ins[1:], start=1):
        out = node.output[0] if k == len(ins) - 1 else ctx.name(node, f"partial{k}")
        nodes.append(helper.make_node("Add", [acc, i], [out]))
        acc = out
    return nodes


def rw_conv_transpose(ctx, node):
    from onnxqat.training.conv_transpose_rewrite import rewrite_conv_transpose

    return rewrite_conv_transpose(ctx, node)


def rw_resize(ctx, node):
    from onnxqat.training.resize_rewrite import rewrite_resize

    return rewrite_resize(ctx, node)


@dataclass(frozen=True)
class Rewrite:
    op_type: str
    becomes: str  # the equivalent, as docs/training-ops.md writes it
    build: Callable[[Context, onnx.NodeProto], list[onnx.NodeProto]]


REWRITES: dict[str, Rewrite] = {r.op_type: r for r in (
    Rewrite("HardSigmoid", "Clip(alpha*x + beta, 0, 1)", rw_hard_sigmoid),
    Rewrite("HardSwish", "x * Clip(x/6 + 1/2, 0, 1)", rw_hard_swish),
    Rewrite("Softplus", "Relu(x) + Log(1 + Exp(-Abs(x)))", rw_softplus),
    Rewrite("Softsign", "x / (1 + Abs(x))", rw_softsign),
    Rewrite("Elu", "Relu(x) + alpha*(Exp(Min(x, 0)) - 1)", rw_elu),
    Rewrite("Selu", "gamma*(Relu(x) + alpha*(Exp(Min(x, 0)) - 1))", rw_selu),
    Rewrite("Celu", "Relu(x) + alpha*(Exp(Min(x, 0)/alpha) - 1)", rw_celu),
    Rewrite("ThresholdedRelu", "Where(x > alpha, x, 0)", rw_thresholded_relu),
    Rewrite("PRelu", "Relu(x) + slope*Min(x, 0)", rw_prelu),
    Rewrite("GlobalMaxPool", "MaxPool with the whole spatial extent as kernel (static shape)", rw_global_max_pool),
    Rewrite("DepthToSpace", "Reshape - Transpose - Reshape (static shape)", rw_depth_to_space),
    Rewrite("SpaceToDepth", "Reshape - Transpose - Reshape (static shape)", rw_space_to_depth),
    Rewrite("LRN", "x / (bias + alpha/size * Conv(x^2, constant channel band))^beta (static channels)", rw_lrn),
    Rewrite("InstanceNormalization", "(x - ReduceMean) / Sqrt(ReduceMean of squares + epsilon) * scale + B",
            rw_instance_norm),
    Rewrite("Sum", "a chain of Add", rw_sum),
    Rewrite("ConvTranspose", "Conv of the input spread by the stride, with the kernel flipped and its channel axes "
            "swapped in the graph (so the weight trains)", rw_conv_transpose),
    Rewrite("Resize", "Gather (nearest) or MatMul (linear, cubic) with constant per-axis matrices (static shapes)",
            rw_resize),
)}

# d/dx = 0 wherever the derivative exists: a registered gradient gives zeros (GI = GO - GO)
ZERO_GRADIENT_OPS = ("Round", "Floor", "Ceil", "Sign")

# neither a gradient in ORT 1.19.2 nor a rewrite here (checked by tests/training/test_differentiable.py)
NO_GRADIENT_OPS = ("ReduceMax", "ReduceMin", "CumSum", "Einsum")

# ops ORT differentiates once they have outputs the gradient reads (LayerNormalization: Mean, InvStdDev)
OUTPUTS_ADDED = {"LayerNormalization": ("mean", "inv_std_dev")}


def register_zero_gradients() -> None:
    """Gradient definitions GI(0) = GO(0) - GO(0) for ZERO_GRADIENT_OPS (once per process; ORT keeps them)."""
    global _zero_registered
    if _zero_registered:
        return
    from onnxruntime.capi import _pybind_state as C

    for op in ZERO_GRADIENT_OPS:
        d = C.GradientNodeDefinition()
        d.op_type, d.domain, d.inputs, d.outputs, d.attributes = "Sub", "", ["GO(0)", "GO(0)"], ["GI(0)"], []
        C.register_gradient_definition(f"::{op}", [d])
    _zero_registered = True


_zero_registered = False

_FLOAT_TYPES = {TensorProto.FLOAT, TensorProto.FLOAT16, TensorProto.DOUBLE, TensorProto.BFLOAT16}


def _elem_types(model: onnx.ModelProto) -> dict[str, int]:
    try:
        inferred = onnx.shape_inference.infer_shapes(quantizers_as_identity(model), strict_mode=False)
    except Exception:
        inferred = model
    g = inferred.graph
    types = {vi.name: vi.type.tensor_type.elem_type for vi in list(g.input) + list(g.value_info) + list(g.output)}
    types.update({t.name: t.data_type for t in g.initializer})
    return types


def gradient_nodes(model: onnx.ModelProto, trainable: list[str], loss_outputs: list[str]) -> list[onnx.NodeProto]:
    """Nodes a gradient passes through: a float input depends on a trainable parameter, an output reaches the loss."""
    g = model.graph
    types = _elem_types(model)
    depends = set(trainable)
    for n in g.node:  # nodes are in topological order
        if any(i in depends and types.get(i, TensorProto.FLOAT) in _FLOAT_TYPES for i in n.input if i):
            depends.update(o for o in n.output if o)
    reaches = set(loss_outputs)
    for n in reversed(g.node):
        if any(o in reaches for o in n.output if o):
            reaches.update(i for i in n.input if i)
    return [n for n in g.node
            if any(i in depends and types.get(i, TensorProto.FLOAT) in _FLOAT_TYPES for i in n.input if i)
            and any(o in reaches for o in n.output if o)]


def plan_rewrites(model: onnx.ModelProto, trainable: list[str], loss_outputs: list[str]) -> list[tuple[str, str]]:
    """(node name, op type) of every default-domain node on a gradient path that REWRITES or OUTPUTS_ADDED handle;
    TrainingError for one of NO_GRADIENT_OPS."""
    steps = []
    for n in gradient_nodes(model, trainable, loss_outputs):
        if n.domain not in ("", "ai.onnx"):
            continue
        if n.op_type in NO_GRADIENT_OPS:
            raise TrainingError(f"{n.op_type} node {n.name} has no gradient in onnxruntime-training 1.19.2 and "
                                "onnxqat has no rewrite for it (see docs/training-ops.md)")
        if n.op_type in REWRITES or (n.op_type in OUTPUTS_ADDED and len([o for o in n.output if o]) == 1):
            steps.append((n.name, n.op_type))
    return steps


def apply_rewrites(model: onnx.ModelProto, steps: list[tuple[str, str]]) -> onnx.ModelProto:
    """A copy of `model` with the planned nodes replaced by their rewrites (same output names)."""
    m = onnx.ModelProto()
    m.CopyFrom(model)
    if not steps:
        return m
    g = m.graph
    todo = {name for name, _ in steps}
    taken = {t for n in g.node for t in list(n.input) + list(n.output)} | {t.name for t in g.initializer}
    taken |= {n.name for n in g.node}
    ctx = Context(m, infer_shapes(quantizers_as_identity(m)), default_opset(m), taken, [])
    nodes = []
    for n in g.node:
        if n.name not in todo:
            nodes.append(n)
            continue
        if n.op_type in OUTPUTS_ADDED:
            while len(n.output) < 1 + len(OUTPUTS_ADDED[n.op_type]):
                n.output.append("")
            for k, what in enumerate(OUTPUTS_ADDED[n.op_type], start=1):
                if not n.output[k]:
                    n.output[k] = ctx.name(n, what)
            nodes.append(n)
            continue
        new = REWRITES[n.op_type].build(ctx, n)
        for k, nn in enumerate(new):
            nn.name = ctx.name(n, f"{nn.op_type.lower()}{k}")
        nodes.extend(new)
    del g.node[:]
    g.node.extend(nodes)
    g.initializer.extend(ctx.initializers)
    return m
