"""Activation pass: find the activations (Relu, Clip(0, max) / ReLU6) whose
outputs feed weighted layers.

From the data input of every weighted layer, walk back through the ops that
only move, select, pool or combine values (pooling, Flatten/Reshape, Pad,
Resize, Transpose, Concat, residual Add/Sum, Dropout ...) until an activation is
found. Where a walk ends on anything else (BatchNormalization, LRN, another
weighted layer, a Sigmoid ...) the input stays float, and that is reported in
a warning. Network inputs are left alone (the input image enters as 8-bit codes).

The Add/Sum/Concat outputs a walk goes through are reported too (`combined`):
a sum or concatenation of quantized tensors is on no single grid, so LSQ with
`activations.linear` quantizes them as well (the walk still goes on to their
inputs, which keep their own quantizers); otherwise they stay as they are,
without a warning.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import onnx

from onnxqat.graph import GraphIndex

# value-preserving (or quantization-grid preserving) ops the walk goes through; all non-constant inputs are followed
# (Add/Sum only when they add activations: a residual, not a constant shift)
TRANSPARENT_OPS = frozenset({
    "MaxPool", "AveragePool", "GlobalAveragePool", "GlobalMaxPool", "ReduceMean",
    "Flatten", "Reshape", "Squeeze", "Unsqueeze", "Pad", "Resize", "Upsample", "Transpose",
    "Concat", "Add", "Sum", "Dropout", "Identity", "Split", "Slice", "DepthToSpace", "SpaceToDepth",
})
ACTIVATION_OPS = ("Relu", "Clip")


@dataclass(frozen=True)
class Activation:
    node: onnx.NodeProto  # the activation (Relu/Clip), or for a linear source the node that produced the tensor
    tensor: str  # its output that is quantized
    max_value: float  # upper clip of the activation (inf for Relu and linear sources)
    feeds: tuple[str, ...]  # weighted layers it reaches
    linear: bool = False  # a linear source: not a ReLU-like activation (BatchNorm output, residual sum, LRN ...)
    signed: bool = False  # values of both signs (a linear source not provably >= 0)
    reasons: tuple[str, ...] = ()  # linear source: the warnings to give when it is not quantized
    output_index: int = 0
    combined: bool = False  # an Add/Sum/Concat output the walk went through (linear too; no warning when left)

    @property
    def quantizer_name(self) -> str:
        suffix = "" if self.output_index == 0 else str(self.output_index)
        return f"{self.node.name}_aquant{suffix}"


def clip_bounds(index: GraphIndex, node: onnx.NodeProto) -> tuple[float, float] | None:
    """(min, max) of a Clip, None when they are not constants."""
    lo, hi = -math.inf, math.inf
    for a in node.attribute:  # opset < 11
        if a.name == "min":
            lo = a.f
        elif a.name == "max":
            hi = a.f
    for k, name in ((1, "min"), (2, "max")):
        if len(node.input) > k and node.input[k]:
            if not index.is_constant(node.input[k]):
                return None
            v = float(np.asarray(index.constant_value(node.input[k]).array()).reshape(-1)[0])
            lo, hi = (v, hi) if name == "min" else (lo, v)
    return lo, hi


def activation_max(index: GraphIndex, node: onnx.NodeProto) -> float | None:
    """The activation's upper bound if `node` is a ReLU-like activation a SAT/LSQ quantizer can take, else None."""
    if node.domain not in ("", "ai.onnx"):
        return None
    if node.op_type == "Relu":
        return math.inf
    if node.op_type == "Clip":
        bounds = clip_bounds(index, node)
        if bounds is not None and bounds[0] == 0.0 and bounds[1] > 0:
            return bounds[1]
    return None


# ops whose output is >= 0 whatever the input; and ops whose output is >= 0 when every data input is
_NON_NEGATIVE_OPS = frozenset({"Relu", "Sigmoid", "HardSigmoid", "Softmax", "Abs", "Exp", "Softplus"})
_KEEPS_SIGN_OPS = frozenset({"LRN", "MaxPool", "AveragePool", "GlobalAveragePool", "GlobalMaxPool", "Concat",
                             "Flatten", "Reshape", "Squeeze", "Unsqueeze", "Transpose", "Dropout", "Identity",
                             "Resize", "Upsample", "Slice", "Split", "DepthToSpace", "SpaceToDepth", "Add", "Sum",
                             "Mul"})


def non_negative(index: GraphIndex, tensor: str, depth: int = 24) -> bool:
    """True when `tensor` provably holds no negative value (then a linear source gets an unsigned quantizer):
    the output of a Relu, Clip(>=0, ..), Sigmoid ..., or of LRN/pooling/Concat/Add/Mul of such tensors."""
    if depth == 0 or tensor in index.graph_inputs:
        return False
    if index.is_constant(tensor):
        value = index.constant_value(tensor)
        return bool(value.fill >= 0) if value.fill is not None else bool((np.asarray(value.array()) >= 0).all())
    node = index.producer.get(tensor)
    if node is None or node.domain not in ("", "ai.onnx"):
        return False
    if node.op_type in _NON_NEGATIVE_OPS:
        return True
    if node.op_type == "Clip":
        bounds = clip_bounds(index, node)
        return bounds is not None and bounds[0] >= 0
    if node.op_type in _KEEPS_SIGN_OPS:
        data = node.input if node.op_type in ("Concat", "Add", "Sum", "Mul") else node.input[:1]
        return all(non_negative(index, i, depth - 1) for i in data if i)
    return False


COMBINING_OPS = ("Add", "Sum", "Concat")


def find_activations(index: GraphIndex, layers: list, weighted_names: set[str]) -> list[Activation]:
    """Activations (Relu/Clip) feeding the weighted layers, then the linear sources (where a walk ended on another
    op: BatchNormalization, LRN, a weighted layer, an Add of a constant ...) and the Add/Sum/Concat outputs the walks
    went through (`combined`), in graph order."""
    found: dict[str, tuple[onnx.NodeProto, float, list[str]]] = {}
    linear: dict[str, tuple[onnx.NodeProto, list[str], list[str]]] = {}
    combined: set[str] = set()
    order = {n.name: k for k, n in enumerate(index.graph.node)}
    for layer in layers:
        start = layer.node.input[layer.data_port]
        stack, seen = [start], set()
        while stack:
            t = stack.pop()
            if t in seen or not t:
                continue
            seen.add(t)
            if t in index.graph_inputs or index.is_constant(t):
                continue  # network input: stays as it is
            node = index.producer.get(t)
            if node is None:
                continue
            amax = activation_max(index, node)
            if amax is not None:
                entry = found.setdefault(node.name, (node, amax, []))
                if layer.node.name not in entry[2]:
                    entry[2].append(layer.node.name)
                continue
            shifted = node.op_type in ("Add", "Sum") and any(index.is_constant(i) for i in node.input if i)
            if node.op_type in TRANSPARENT_OPS and node.domain in ("", "ai.onnx") and not shifted:
                if node.op_type in COMBINING_OPS and sum(1 for i in node.input if i) >= 2:
                    entry = linear.setdefault(t, (node, [], []))
                    combined.add(t)
                    if layer.node.name not in entry[1]:
                        entry[1].append(layer.node.name)
                inputs = node.input[:1] if node.op_type in ("Reshape", "Pad", "Resize", "Upsample", "Slice", "Split",
                                                             "Squeeze", "Unsqueeze", "Dropout") else node.input
                stack.extend(i for i in inputs if i and not index.is_constant(i))
                continue
            if node.name in weighted_names:
                why = f"comes straight from weighted layer {node.name} (no activation)"
            elif shifted:
                why = f"comes from {node.op_type} node {node.name}, which adds a constant"
            else:
                why = f"comes from {node.op_type} node {node.name} (no ReLU-like activation)"
            entry = linear.setdefault(t, (node, [], []))
            if layer.node.name not in entry[1]:
                entry[1].append(layer.node.name)
                entry[2].append(f"input of {layer.node.op_type} node {layer.node.name} {why}")
    acts = [Activation(n, n.output[0], amax, tuple(feeds)) for n, amax, feeds in found.values()]
    acts.sort(key=lambda a: order[a.node.name])
    lin = [
        Activation(n, t, math.inf, tuple(feeds), linear=True, signed=not non_negative(index, t),
                   reasons=tuple(reasons), output_index=list(n.output).index(t), combined=t in combined)
        for t, (n, feeds, reasons) in linear.items()
    ]
    lin.sort(key=lambda a: (order[a.node.name], a.output_index))
    return acts + lin


def features_per_sample(shape: tuple | None) -> int | None:
    """Elements of one sample (all dims but the first) when known."""
    if not shape or any(d is None or d <= 0 for d in shape[1:]):
        return None
    return int(np.prod(shape[1:])) if len(shape) > 1 else 1


# elementwise functions fuse writes as lookup tables of their input codes (onnxqat/fusion/ops/unary.py)
TABLE_OPS = frozenset({"Sigmoid", "HardSigmoid", "HardSwish", "Tanh", "Erf", "Exp", "Log", "Sqrt", "Reciprocal", "Abs",
                       "Neg", "LeakyRelu", "Softplus", "Softsign", "Elu", "Selu", "Celu", "Gelu", "Mish",
                       "ThresholdedRelu", "PRelu", "Sin", "Cos"})
BINARY_OPS = frozenset({"Add", "Mul", "Sum", "Concat", "MatMul"})  # MatMul: of two activations (attention)
_MOVING = frozenset({"Reshape", "Flatten", "Transpose", "Squeeze", "Unsqueeze", "Identity"})


def export_sources(index: GraphIndex, quantized: set[str]) -> list[Activation]:
    """activations.integer_export: the tensors fuse needs as codes beyond the weighted layers' inputs, in graph order:
    the input of every elementwise function (a table of its codes), and each activation input of an Add/Mul/Sum/
    Concat of activations (a residual branch, a gate), unless it is f(x) beside x itself (x * Sigmoid(x): a table of
    x's codes). `quantized`: tensors that get a quantizer anyway (their producer's output)."""
    out: dict[str, Activation] = {}
    types = _elem_types(index.model)

    def want(t: str, reason: str) -> None:
        # a quantizer commutes with ops that only move values: put it where they start (a detector head's conv
        # output before its Reshape/Transpose), so the moving runs on codes
        while t in index.producer and index.producer[t].op_type in _MOVING and t not in quantized:
            t = index.producer[t].input[0]
        if not t or t in quantized or t in out or t in index.graph_inputs or index.is_constant(t):
            return
        if types.get(t, onnx.TensorProto.FLOAT) != onnx.TensorProto.FLOAT:
            return  # shape arithmetic (a Concat of int64 dims), masks
        node = index.producer.get(t)
        if node is None or node.domain not in ("", "ai.onnx"):
            return
        amax = activation_max(index, node)
        if amax is not None:  # a Relu/Clip(0, m): quantized as an activation
            out[t] = Activation(node, t, amax, ())
        else:
            out[t] = Activation(node, t, math.inf, (), linear=True, signed=not non_negative(index, t),
                                reasons=(reason,), output_index=list(node.output).index(t))

    for node in index.graph.node:
        if node.domain not in ("", "ai.onnx"):
            continue
        if node.op_type in TABLE_OPS:
            want(node.input[0], f"input of {node.op_type} node {node.name} (a lookup table of its codes)")
        elif node.op_type in BINARY_OPS:
            data = [i for i in node.input if i and not index.is_constant(i)]
            if len(data) < 2:
                continue
            for t in data:
                others = [o for o in data if o != t]
                p = index.producer.get(t)
                if p is not None and p.op_type in TABLE_OPS and p.input[0] in others:
                    continue  # f(x) beside x: the product is a table of x's codes
                want(t, f"input of {node.op_type} node {node.name}")
    order = {n.name: k for k, n in enumerate(index.graph.node)}
    return sorted(out.values(), key=lambda a: (order.get(a.node.name, 0), a.output_index))


def _elem_types(model: onnx.ModelProto) -> dict[str, int]:
    try:
        inferred = onnx.shape_inference.infer_shapes(model)
    except Exception:  # best effort: an unknown type counts as float
        return {}
    g = inferred.graph
    return {vi.name: vi.type.tensor_type.elem_type for vi in list(g.value_info) + list(g.input) + list(g.output)}
