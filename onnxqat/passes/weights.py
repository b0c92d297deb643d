"""Weight pass: find the weighted layers (Conv, ConvTranspose, Gemm, MatMul with a
constant weight) and plan one weight quantizer for each.

Per layer: the weight's input port, its output-channel axis (per-channel LSQ)
and the SAT fan-out for ApplyScaling:
    Conv            W [C_out, C_in/g, kH, kW]   axis 0   fan-out kH*kW*C_out
    ConvTranspose   W [C_in, C_out/g, kH, kW]   axis 1   fan-out kH*kW*C_out
    Gemm            B [K, N] (transB=0) axis 1, [N, K] (transB=1) axis 0;  fan-out N
    MatMul          X @ W: W [.., K, N] axis -1;  W @ X: W [.., N, K] axis -2;  fan-out N
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import onnx

from onnxqat.graph import GraphIndex
from onnxqat.recipes import WEIGHTED_OP_TYPES, WeightSettings

# ops that carry weights but get no quantizer: listed in a warning
UNSUPPORTED_WEIGHTED_OPS = (
    "LSTM", "GRU", "RNN", "Einsum", "ConvInteger", "MatMulInteger", "QLinearConv", "QLinearMatMul",
    "DeformConv", "Attention",
)
SAT_MODE_VALUES = {"clamp": 0, "quantize": 1, "symmetric": 2, "fullrange": 3, "asymmetric": 4,
                   "asymmetric-clamp": 5}


@dataclass(frozen=True)
class WeightedLayer:
    node: onnx.NodeProto
    port: int  # weight input index
    data_port: int  # the activation input index
    axis: int  # output-channel axis of the weight
    fan_out: int
    shape: tuple[int, ...]


def _attr(node: onnx.NodeProto, name: str, default):
    for a in node.attribute:
        if a.name == name:
            return onnx.helper.get_attribute_value(a)
    return default


def find_weighted_layers(index: GraphIndex, warnings: list[str]) -> list[WeightedLayer]:
    layers = []
    for node in index.graph.node:
        if node.domain not in ("", "ai.onnx"):
            continue
        if any(a.type in (onnx.AttributeProto.GRAPH, onnx.AttributeProto.GRAPHS) for a in node.attribute):
            warnings.append(f"{node.op_type} node {node.name}: its subgraphs are not quantized")
            continue
        if node.op_type in UNSUPPORTED_WEIGHTED_OPS:
            warnings.append(f"{node.op_type} node {node.name}: weights of this op type are not quantized")
            continue
        if node.op_type not in WEIGHTED_OP_TYPES:
            continue
        layer = _weighted_layer(index, node, warnings)
        if layer is not None:
            layers.append(layer)
    return layers


def _weighted_layer(index: GraphIndex, node: onnx.NodeProto, warnings: list[str]) -> WeightedLayer | None:
    op = node.op_type
    if op == "MatMul":
        c0, c1 = index.is_constant(node.input[0]), index.is_constant(node.input[1])
        if c1 and not c0:
            port, data_port = 1, 0
        elif c0 and not c1:
            port, data_port = 0, 1
        else:
            if c0:
                warnings.append(f"MatMul node {node.name}: both inputs are constant, not quantized")
            else:  # attention's Q K^T: quantizers on its inputs are activation quantizers (integer_export)
                warnings.append(f"MatMul node {node.name}: of two activations, no weight to quantize (recipe key "
                                "activations.integer_export quantizes its inputs)")
            return None
    else:
        port, data_port = 1, 0
        if len(node.input) < 2 or not index.is_constant(node.input[1]):
            warnings.append(f"{op} node {node.name}: weight is not a constant tensor, not quantized")
            return None
        if index.is_constant(node.input[0]):
            warnings.append(f"{op} node {node.name}: its data input is constant too, not quantized")
            return None
    shape = index.constant_value(node.input[port]).shape
    nd = len(shape)
    if op == "Conv":
        if nd < 3:
            warnings.append(f"Conv node {node.name}: weight of rank {nd}, not quantized")
            return None
        axis, fan_out = 0, int(np.prod(shape[2:])) * shape[0]
    elif op == "ConvTranspose":
        if nd < 3:
            warnings.append(f"ConvTranspose node {node.name}: weight of rank {nd}, not quantized")
            return None
        group = int(_attr(node, "group", 1))
        axis, fan_out = 1, int(np.prod(shape[2:])) * shape[1] * group
    elif op == "Gemm":
        if nd != 2:
            warnings.append(f"Gemm node {node.name}: weight of rank {nd}, not quantized")
            return None
        axis = 0 if int(_attr(node, "transB", 0)) else 1
        fan_out = shape[axis]
    else:  # MatMul
        if nd < 2:
            warnings.append(f"MatMul node {node.name}: weight of rank {nd}, not quantized")
            return None
        axis = nd - 1 if port == 1 else nd - 2
        fan_out = shape[axis]
    return WeightedLayer(node, port, data_port, axis, int(fan_out), tuple(shape))


def lsq_qp(r: int, signed: bool) -> float:
    """Qp of the LSQ integer range (at least 1 so that inits stay finite at R=1)."""
    qp = (r - 1) // 2 if signed else r
    return float(max(qp, 1))


def weight_step_init(index: GraphIndex, layer: WeightedLayer, ws: WeightSettings) -> tuple[float, ...]:
    """LSQ weight step per tensor or per output channel: the recipe's `step`, else from the weights as
    `step_init` says (paper: 2*mean|W|/sqrt(Qp), max, mse: calibration.lsq_weight_steps); a zero mean gives 1e-3."""
    qp = lsq_qp(ws.range, True)
    if ws.step is not None:
        n = layer.shape[layer.axis] if ws.per_channel else 1
        return (float(ws.step),) * n
    value = index.constant_value(layer.node.input[layer.port])
    if ws.step_init != "paper":
        from onnxqat.passes.calibration import lsq_weight_steps

        qn = float((ws.range + 1) // 2)
        steps = lsq_weight_steps(value.array(), qn, qp, layer.axis if ws.per_channel else None, ws.step_init)
        return tuple(float(s) for s in steps)
    mean_abs = value.mean_abs(layer.axis if ws.per_channel else None)
    steps = 2.0 * mean_abs / math.sqrt(qp)
    steps = np.where(steps > 0, steps, 1e-3).astype(np.float32)
    return tuple(float(s) for s in steps)


def weight_grad_scale(layer: WeightedLayer, ws: WeightSettings) -> float:
    """g = 1/sqrt(N*Qp); N = weights in the tensor (per tensor) or in one channel (per channel)."""
    n = int(np.prod(layer.shape))
    if ws.per_channel:
        n //= max(layer.shape[layer.axis], 1)
    return float(np.float32(1.0 / math.sqrt(max(n, 1) * lsq_qp(ws.range, True))))


def sat_integer_factor(ws: WeightSettings) -> int:
    """The factor that makes SAT's quantized levels integers (N2D2's QWeight.Mode=Integer): levels 2j/R - 1 (DoReFa,
    full range, clamp) times R are the odd integers 2j - R; levels j/h ((a)symmetric, h = floor(R/2)) times h are j."""
    return ws.range // 2 if ws.mode in ("symmetric", "asymmetric", "asymmetric-clamp") else ws.range


def sat_restore_scale(index: GraphIndex, layer: WeightedLayer, ws: WeightSettings) -> tuple[float, ...]:
    """Per output channel o, the constant c_o that brings SAT's quantized weights Q (levels in [-1, 1], whatever
    the layer's own scale) back to the float weights W: the least-squares c_o = <W_o, Q_o> / <Q_o, Q_o>. Without a
    BatchNormalization after the layer to renormalise, an exporter's folded BN scale (weights of magnitude 10 in
    one channel, 0.01 in the next) would otherwise be lost and the error compound layer after layer (measured: a
    BN-folded MobileNetV3, loss 3e19 before training). A channel where that is not positive (all-zero weights)
    gets the whole tensor's c, so that its weights still train. One value for grouped ConvTranspose (its axis 1
    holds C_out/group channels of every group)."""
    from onnxqat.ops.reference import sat_weight_forward

    w = index.constant_value(layer.node.input[layer.port]).array().astype(np.float32)
    q = sat_weight_forward(w, ws.range, SAT_MODE_VALUES[ws.mode], 0).astype(np.float64)
    w = w.astype(np.float64)
    qq, wq = float(np.sum(q * q)), float(np.sum(w * q))
    whole = wq / qq if qq > 0 and wq > 0 else 1.0
    grouped = layer.node.op_type == "ConvTranspose" and int(_attr(layer.node, "group", 1)) > 1
    if grouped or w.ndim == 0:
        return (float(np.float32(whole)),)
    axes = tuple(a for a in range(w.ndim) if a != layer.axis % w.ndim)
    qq_o, wq_o = np.sum(q * q, axis=axes), np.sum(w * q, axis=axes)
    with np.errstate(divide="ignore", invalid="ignore"):
        c = np.where((qq_o > 0) & (wq_o > 0), wq_o / np.where(qq_o > 0, qq_o, 1.0), whole)
    return tuple(float(v) for v in c.astype(np.float32))
