"""Biases on the accumulator grid (what TFLite's int32 bias quantization does), in the QAT model itself.

Kernels that add an int32 bias to the integer accumulator (QLinearConv, QGemm, and onnxruntime's QDQ fusion of a float
bias at x_scale * w_scale) round the folded bias b_o to a whole number of accumulator steps u_o = s_in s_w,o f_o;
the float fake-quantized model does not, so a value within that error of a rounding tie lands on the other side
(measured: 0.4 % of one layer's 8-bit codes, 18 % of a random-weight network's output codes). Moving each folded bias
to the nearest multiple of its step *in the QAT model* (BatchNormalization's B, else the layer's bias) makes the two
compute the same thing: a change of at most half an accumulator step, reported, and the model fuse verifies against.
Only layers read by an activation quantizer move (the ones whose bias such a kernel adds); the logits and residual
branches keep their float bias.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import onnx
from onnx import numpy_helper

from onnxqat.fusion.graph import QatGraph
from onnxqat.fusion.values import WeightedLayer
from onnxqat.ops.schema import is_quantizer


@dataclass
class SnapReport:
    layers: int = 0  # layers whose bias moved
    max_shift: float = 0.0  # largest move, in bias steps (<= 0.5)
    skipped: list = field(default_factory=list)  # layers without a bias to move (a MatMul with no Add)

    def summary(self) -> str:
        s = f"bias: {self.layers} layer(s) moved to the int32 bias grid (at most {self.max_shift:.3f} of a step)"
        return s + (f"; not moved: {', '.join(self.skipped)}" if self.skipped else "")


def snap_biases(model: onnx.ModelProto, layers: list[tuple[WeightedLayer, np.ndarray | None]]
                ) -> tuple[onnx.ModelProto, SnapReport]:
    """A copy of `model` whose layers' folded biases are whole numbers of their bias steps (layers of a lowering of
    the same model, each with the step its format's kernel rounds the bias to; None: not rounded, left as it is)."""
    m = onnx.ModelProto()
    m.CopyFrom(model)
    inits = {t.name: t for t in m.graph.initializer}
    users: dict[str, int] = {}
    for n in m.graph.node:
        for i in n.input:
            users[i] = users.get(i, 0) + 1
    by_name = {(n.name or n.output[0]): n for n in m.graph.node}
    constants = QatGraph(m).consts  # initializers and what constant nodes compute (an exporter's Identity on B)
    consumers: dict[str, list] = {}
    for n in model.graph.node:
        for i in n.input:
            consumers.setdefault(i, []).append(n)
    report = SnapReport()
    for layer, step in layers:
        if step is None or not _quantized(layer.out, consumers):
            continue  # no kernel rounds its bias (a residual branch, the logits): left as trained
        step = np.abs(step)
        if not np.all(step > 0):
            continue
        shift = np.round(layer.bias / step) * step - layer.bias
        if not np.any(shift):
            continue
        target = _bias_target(layer)
        if target is None:
            report.skipped.append(layer.base)
            continue
        qat_node, index, factor = target
        node = by_name[qat_node.name or qat_node.output[0]]  # the same node in the copy
        name = node.input[index]
        if name not in inits and name not in constants:
            report.skipped.append(layer.base)  # a computed bias: nothing to move
            continue
        if name not in inits or users.get(name, 0) > 1:  # a constant node's output, or shared: this node's own copy
            new = f"{layer.base}.snapped_bias"
            value = numpy_helper.to_array(inits[name]) if name in inits else constants[name]
            m.graph.initializer.append(numpy_helper.from_array(np.asarray(value, np.float32).copy(), new))
            inits[new] = m.graph.initializer[-1]  # append copied the message: edit the graph's own
            node.input[index] = name = new
        old = numpy_helper.to_array(inits[name]).astype(np.float64)
        new_value = (np.broadcast_to(old, (layer.n_out,)) + shift * factor).astype(np.float32)
        inits[name].CopyFrom(numpy_helper.from_array(new_value, name))
        report.layers += 1
        report.max_shift = max(report.max_shift, float(np.max(np.abs(shift) / step)))
    return m, report


def _quantized(tensor: str, consumers: dict) -> bool:
    """Whether an activation quantizer reads `tensor` (through a Relu/Clip): the layers whose int32 bias a kernel
    adds (QLinearConv, QGemm, onnxruntime's QDQ fusion)."""
    for _ in range(4):
        nxt = consumers.get(tensor, [])
        if len(nxt) != 1:
            return False
        if is_quantizer(nxt[0]):
            return True
        if nxt[0].op_type not in ("Relu", "Clip"):
            return False
        tensor = nxt[0].output[0]
    return False


def _bias_target(layer: WeightedLayer) -> tuple[onnx.NodeProto, int, float] | None:
    """(node, input index, factor): the folded BatchNormalization's B, the bias Add's constant of a MatMul, or the
    layer's own bias input (Gemm: shift / beta). A layer with none of them has bias 0, on every grid."""
    for f in reversed(layer.folded):
        if f.op_type == "BatchNormalization":
            return f, 2, 1.0
    for f in layer.folded:
        if f.op_type == "Add":
            return f, [k for k, i in enumerate(f.input) if i != layer.node.output[0]][0], 1.0
    node = layer.node
    if node.op_type == "MatMul":
        return None
    beta = next((a.f for a in node.attribute if a.name == "beta"), 1.0)
    return (node, 2, 1.0 / beta) if beta != 0 and len(node.input) > 2 and node.input[2] else None
