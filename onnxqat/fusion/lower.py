"""Lowering of a QAT graph (float ops + com.onnxqat quantizers) to standard ONNX ops: the walk over the QAT graph.

The walk keeps, for each tensor of the QAT graph, how its value is represented in the new graph (values.py: Codes,
Acc, Float, Pooled) and hands each node to the module of its concern:
- lower_weighted.py: Conv/Gemm/MatMul with BatchNormalization folded in (fold_batchnorm.py), written as an integer
  accumulator (lower_integer.py) or a float op on dequantized weights (lower_qdq.py);
- requantize.py: an activation quantizer turns an Acc into Codes: code = clip(round(value / s_out), 0, R_out); in the
  integer format a fixed-point multiplier per channel and a rounding right shift (rescale="fixed-point"), or a float
  multiply (rescale="float", N2D2's default); in the QDQ format a float Clip + QuantizeLinear;
- lower_codes.py (Relu/Clip, input normalisation, shape ops, Concat), lower_pooling.py (GlobalAveragePool),
  lower_residual.py (Add), float_islands.py (nodes kept in float), outputs.py (graph outputs, the fused model).
"""

from __future__ import annotations

import numpy as np
import onnx
from onnx import TensorProto

from onnxqat.errors import FuseError
from onnxqat.fusion.builder import GraphBuilder
from onnxqat.fusion.float_islands import keep_float
from onnxqat.fusion.fold_batchnorm import batchnorm_on_acc
from onnxqat.fusion.graph import QatGraph, node_label
from onnxqat.fusion.lower_codes import lower_affine, lower_clip, lower_concat, lower_shape_op
from onnxqat.fusion.lower_pooling import lower_float_pool, lower_global_pool
from onnxqat.fusion.lower_residual import lower_add
from onnxqat.fusion.lower_weighted import lower_weighted
from onnxqat.fusion.outputs import assemble_model, lower_output
from onnxqat.fusion.requantize import lower_activation_quantizer
from onnxqat.fusion.values import Acc, Codes, Float, Lowered
from onnxqat.graph import quantizers_as_identity
from onnxqat.ops.schema import DOMAIN

WEIGHTED = ("Conv", "Gemm", "MatMul")
SHAPE_OPS = ("Flatten", "Reshape", "Squeeze", "Unsqueeze", "Identity", "Transpose", "Dropout", "MaxPool")


class Lowerer:
    """State of one lowering: the QAT graph, the graph being written, and the value of each QAT tensor in it."""

    def __init__(self, model: onnx.ModelProto, *, format: str = "int", rescale: str = "fixed-point",
                 input_scale: float = 1 / 255, input_type: str = "uint8", keep_float=(), dequantize_output: bool = True):
        if format not in ("int", "qdq"):
            raise FuseError(f"unknown format '{format}' (int or qdq)")
        if rescale not in ("fixed-point", "float"):
            raise FuseError(f"unknown rescale '{rescale}' (fixed-point or float)")
        if input_type not in ("uint8", "float"):
            raise FuseError(f"unknown input type '{input_type}' (uint8 or float)")
        if not input_scale > 0:
            raise FuseError(f"input scale must be > 0, got {input_scale}")
        self.g = QatGraph(model)
        self.format, self.rescale = format, rescale
        self.input_scale = float(input_scale)
        self.input_type = "float" if format == "qdq" else input_type
        self.keep_float = set(keep_float)
        self.dequantize_output = dequantize_output
        outputs = {o for n in model.graph.node for o in n.output}
        unknown = sorted(self.keep_float - outputs - {n.name for n in model.graph.node})
        if unknown:  # a misspelt name would otherwise be ignored without a word
            raise FuseError(f"keep_float / --keep-float: no node or node output of the model is named '{unknown[0]}'")
        taken = outputs | {i.name for i in model.graph.input}
        taken |= set(self.g.consts)
        self.b = GraphBuilder(taken)
        self.val: dict[str, object] = {}
        self.done: set[int] = set()  # indices of nodes folded into an earlier one (bias Add, BatchNormalization)
        self.weight_params = 0
        self.weight_bits: dict[str, int] = {}
        self.kept: list[str] = []
        self.act_codes: dict[str, tuple] = {}
        self._shapes: dict | None = None

    def run(self) -> Lowered:
        g = self.g
        if not g.quantizers:
            raise FuseError("model has no quantizer node (com.onnxqat): run `onnxqat insert` and train it first")
        if len(g.inputs) != 1:
            raise FuseError(f"fuse handles one network input, model has {len(g.inputs)}")
        inp = g.inputs[0]
        if inp.type.tensor_type.elem_type != TensorProto.FLOAT:
            raise FuseError(f"network input '{inp.name}' is not float32")
        self._input(inp.name)
        for idx, node in enumerate(g.model.graph.node):
            if idx in self.done:
                continue
            self._node(node)
        outputs = [lower_output(self, name) for name in g.output_names]
        model = assemble_model(g.model, inp, outputs, self.b, self.input_type, self.format)
        return Lowered(model, outputs, self.weight_params, self.weight_bits, self.kept, self.act_codes)

    # ------------------------------------------------------ state shared by the lowering modules
    def record(self, out: str, v):
        """Remember the fused codes of an activation quantizer's output (the self-check compares them)."""
        c = v.grid if isinstance(v, Float) else v
        self.act_codes[out] = (c.name, c.scale, c.dtype, c.zp)
        return v

    def index(self, node) -> int:
        for i, n in enumerate(self.g.model.graph.node):
            if n is node:
                return i
        raise KeyError(node.name)

    def get(self, name: str, node) -> object:
        """The value of QAT tensor `name`, read by `node` (named in the error when it has none)."""
        if name not in self.val:
            prod = self.g.producer.get(name)
            src = f" (from {node_label(prod)})" if prod is not None else ""
            raise FuseError(f"{node_label(node)}: input '{name}'{src} has no integer form")
        return self.val[name]

    def shape_of(self, name: str):
        """Static dims of a QAT tensor (None where unknown), from shape inference on the QAT graph."""
        if self._shapes is None:
            self._shapes = {}
            try:
                inferred = onnx.shape_inference.infer_shapes(quantizers_as_identity(self.g.model))
                for vi in list(inferred.graph.value_info) + list(inferred.graph.input) + list(inferred.graph.output):
                    self._shapes[vi.name] = [d.dim_value if d.HasField("dim_value") else None
                                             for d in vi.type.tensor_type.shape.dim]
            except Exception:  # shape inference is best effort here
                pass
        return self._shapes.get(name)

    # ------------------------------------------------------------------ walk
    def _input(self, name: str) -> None:
        b = self.b
        if self.input_type == "uint8":
            self.val[name] = Codes(name, self.input_scale, 255)
            return
        s = b.const(f"{name}_scale", np.array(self.input_scale, np.float32))
        zp = b.const(f"{name}_zp", np.array(0, np.uint8))
        q = b.op("QuantizeLinear", [name, s, zp], f"{name}_codes")
        self.val[name] = Codes(q, self.input_scale, 255)

    def _node(self, node: onnx.NodeProto) -> None:
        op, g = node.op_type, self.g
        if op == "Constant":
            return
        if node.domain == DOMAIN and node.input[0] in g.consts:
            return  # weight quantizer: read by its consumer
        if node.name in self.keep_float or node.output[0] in self.keep_float:
            return keep_float(self, node)
        if node.domain == DOMAIN and op in ("SatActQuant", "LsqQuant"):
            return lower_activation_quantizer(self, node)
        if node.domain not in ("", "ai.onnx"):
            raise FuseError(f"{node_label(node)}: op of domain '{node.domain}' has no integer lowering")
        if op in WEIGHTED or op == "ConvTranspose":
            return lower_weighted(self, node)
        if op == "BatchNormalization" and isinstance(self.val.get(node.input[0]), Float):
            return keep_float(self, node, record=False)  # after a layer kept in float
        if op == "BatchNormalization" and isinstance(self.val.get(node.input[0]), Acc):
            return batchnorm_on_acc(self, node)  # e.g. after a residual Add of weighted layers: still linear
        if op == "BatchNormalization":
            prod = g.producer.get(node.input[0])
            src = node_label(prod) if prod is not None else "the network input"
            raise FuseError(f"{node_label(node)} follows no weighted layer (its input comes from {src}); "
                            "only BatchNormalization right after Conv/Gemm/MatMul can be folded")
        if op in ("Softmax", "LogSoftmax") and node.output[0] in g.output_names and not g.consumers.get(node.output[0]):
            return keep_float(self, node)  # a classifier's tail after the final dequantize: float like the logits
        if op in ("Relu", "Clip"):
            return lower_clip(self, node)
        if op in ("Mul", "Div", "Sub") or (op == "Add" and any(i in g.consts for i in node.input)):
            v = self.get([i for i in node.input if i not in g.consts][0], node) if len(node.input) == 2 else None
            if isinstance(v, Codes):
                return lower_affine(self, node, v)
            if op == "Add":
                return lower_add(self, node)
            raise FuseError(f"{node_label(node)} has no integer lowering here (only a scalar affine map of quantized "
                            f"codes, e.g. the input normalisation); keep it in float with --keep-float {node.name}")
        if op in ("GlobalAveragePool", "ReduceMean") and isinstance(self.val.get(node.input[0]), Codes):
            return lower_global_pool(self, node)
        if op in ("GlobalAveragePool", "ReduceMean") and isinstance(self.val.get(node.input[0]), Float):  # QDQ
            return lower_float_pool(self, node)
        if op == "Add":
            return lower_add(self, node)
        if op in SHAPE_OPS:
            return lower_shape_op(self, node)
        if op == "Concat":
            return lower_concat(self, node)
        raise FuseError(f"{node_label(node)} has no integer lowering (keep it in float with keep_float=['{node.name}'] "
                        f"/ --keep-float {node.name})")
