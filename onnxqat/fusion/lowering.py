"""Lowering of a QAT graph (float ops + com.onnxqat quantizers) to standard ONNX ops: the walk over the QAT graph.

The walk keeps, for each tensor of the QAT graph, how its value is represented in the new graph (values.py: Codes,
Acc, Float, Pooled, Plain) and hands each node to the lowering of its op type (ops/: one module per family, the
LOWERINGS table); how a weighted layer and a requantization are written is the output format's (formats/).
A node whose lowering raises NoIntegerForm, or that has none, is kept in float: its inputs are dequantized, the node
is copied, and the next activation quantizer turns its output back into codes (a float island). `integer_only`
turns every island into an error; `keep_float` forces nodes into islands.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass

import numpy as np
import onnx
from onnx import TensorProto, helper

from onnxqat.errors import FuseError
from onnxqat.fusion.builder import GraphBuilder
from onnxqat.fusion.convert import float_island
from onnxqat.fusion.formats import FORMATS
from onnxqat.fusion.graph import NoIntegerForm, QatGraph, codes_input, node_label, upgraded
from onnxqat.fusion.ops import LOWERINGS
from onnxqat.fusion.outputs import assemble_model, lower_output
from onnxqat.fusion.values import Codes, Float, Lowered, Pending, Plain
from onnxqat.ops.schema import DOMAIN, is_quantizer

@dataclass
class Island:
    node: str  # node name (or first output)
    op_type: str
    cause: str  # short, the same for every node of one kind (what the summary groups by)
    reason: str  # the full one-line reason


class Lowerer:
    """State of one lowering: the QAT graph, the graph being written, and the value of each QAT tensor in it."""

    def __init__(self, model: onnx.ModelProto, *, format: str = "int", rescale: str = "fixed-point",
                 input_scale: float = 1 / 255, input_type: str = "auto", keep_float=(), dequantize_output: bool = True,
                 integer_only: bool = False):
        if format not in FORMATS:
            raise FuseError(f"unknown format '{format}' ({', '.join(FORMATS)})")
        if rescale not in ("fixed-point", "float"):
            raise FuseError(f"unknown rescale '{rescale}' (fixed-point or float)")
        if input_type not in ("auto", "uint8", "float"):
            raise FuseError(f"unknown input type '{input_type}' (auto, uint8 or float)")
        if not input_scale > 0:
            raise FuseError(f"input scale must be > 0, got {input_scale}")
        model = upgraded(model)
        self.g = QatGraph(model)
        self.fmt = FORMATS[format](rescale)
        self.format = format
        self.input_scale = float(input_scale)
        self.input_type = self.fmt.input_type or input_type
        self.keep_float = set(keep_float)
        self.dequantize_output = dequantize_output
        self.integer_only = integer_only
        outputs = {o for n in model.graph.node for o in n.output}
        unknown = sorted(self.keep_float - outputs - {n.name for n in model.graph.node})
        if unknown:  # a misspelt name would otherwise be ignored without a word
            raise FuseError(f"keep_float / --keep-float: no node or node output of the model is named '{unknown[0]}'")
        taken = outputs | {i.name for i in model.graph.input}
        taken |= set(self.g.consts)
        self.b = GraphBuilder(taken)
        self.val: dict[str, object] = {}
        self.done: set[int] = set()  # indices of nodes folded into an earlier one (bias Add, BatchNormalization)
        self._index = {id(n): i for i, n in enumerate(model.graph.node)}
        self.weight_params = 0
        self.weight_bits: dict[str, int] = {}
        self.islands: list[Island] = []
        self.tail: list[str] = []  # float ops after the last quantizer (a classifier's Softmax, a detector's Concat)
        self.head: list[str] = []  # float ops before the first quantizer (a float input's normalisation)
        self._head_tensors: set[str] = set()
        self.lowered_nodes = 0
        self.layers: list = []  # the WeightedLayers written (snap_bias.py reads their grids)
        self.act_codes: dict[str, tuple] = {}
        self._journal: list[tuple[str, object]] = []

    def run(self) -> Lowered:
        g = self.g
        if not g.quantizers:
            raise FuseError("model has no quantizer node (com.onnxqat): run `onnxqat insert` and train it first")
        self._feeds_quantizer = self._reaching_quantizers()
        graph_inputs = self._inputs()
        for idx, node in enumerate(g.model.graph.node):
            if idx not in self.done:
                self._node(node)
        if self.integer_only and self.islands:
            groups = Counter(i.op_type for i in self.islands)
            first = ", ".join(f"{i.op_type} '{i.node}' ({i.cause})" for i in self.islands[:3])
            raise FuseError(f"--integer-only: {len(self.islands)} node(s) have no integer form "
                            f"({', '.join(f'{k} x{v}' for k, v in groups.most_common())}): {first}")
        outputs = [lower_output(self, name) for name in g.output_names]
        model = assemble_model(g.model, graph_inputs, outputs, self.b, self.format)
        if self.codes_input is not None:  # how the self-check (and a user) feeds it
            model.metadata_props.add(key="onnxqat.codes_input", value=self.codes_input)
            model.metadata_props.add(key="onnxqat.input_scale", value=repr(self.input_scale))
        steps = {id(layer): self.fmt.bias_step(self, layer) for layer in self.layers}
        return Lowered(model, outputs, self.weight_params, self.weight_bits, self.islands, self.act_codes,
                       self.lowered_nodes, self.tail, [(layer, steps[id(layer)]) for layer in self.layers], self.head)

    # ------------------------------------------------------ state shared by the lowering modules
    def record(self, out: str, v):
        """Remember the fused codes of an activation quantizer's output (the self-check compares them)."""
        c = v.grid if isinstance(v, Float) else v
        self.act_codes[out] = (c.name, c.scale, c.dtype, c.zp)
        return v

    def index(self, node) -> int:
        return self._index[id(node)]

    def get(self, name: str, node, raw: bool = False) -> object:
        """The value of QAT tensor `name`, read by `node` (named in the error when it has none). A Pending layer is
        written (materialized) for readers that don't take it raw, once: later readers share it."""
        if name not in self.val and name in self.g.consts:  # a constant read as data (Concat of dims ...)
            self.val[name] = Plain(self.b.const(name, self.g.consts[name]))
        if name not in self.val:
            prod = self.g.producer.get(name)
            src = f" (from {node_label(prod)})" if prod is not None else ""
            raise FuseError(f"{node_label(node)}: input '{name}'{src} has no value in the fused graph")
        v = self.val[name]
        if isinstance(v, Pending) and not raw:
            self._journal.append((name, v))  # undone with the nodes if this node ends in a float island
            v = self.val[name] = self.fmt.materialize(self, v)
        return v

    # ------------------------------------------------------------------ walk
    def _inputs(self) -> list[onnx.ValueInfoProto]:
        """Graph inputs of the fused model. The codes input (graph.codes_input: an image a layer reads unquantized, or
        with input_type="uint8" the first float input) is uint8 codes (real value = code * input_scale), or with
        input_type="float" float quantized by the graph's first QuantizeLinear; other float inputs (a recurrent state,
        an input the QAT model quantizes itself) stay float, non-float ones (ids, lengths) Plain."""
        b, g = self.b, self.g
        image = self.codes_input = codes_input(g, self.input_type)
        out = []
        for inp in g.inputs:
            name, elem = inp.name, inp.type.tensor_type.elem_type
            dims = [d.dim_param or d.dim_value or None for d in inp.type.tensor_type.shape.dim] \
                if inp.type.tensor_type.HasField("shape") else None
            if name != image:
                self.val[name] = Float(name) if elem == TensorProto.FLOAT else Plain(name)
                self._head_tensors.add(name)
                out.append(helper.make_tensor_value_info(name, elem, dims))
                continue
            if self.input_type != "float":
                self.val[name] = Codes(name, self.input_scale, 255)
                out.append(helper.make_tensor_value_info(name, TensorProto.UINT8, dims))
                continue
            s = b.const(f"{name}_scale", np.array(self.input_scale, np.float32))
            zp = b.const(f"{name}_zp", np.array(0, np.uint8))
            self.val[name] = Codes(b.op("QuantizeLinear", [name, s, zp], f"{name}_codes"), self.input_scale, 255)
            out.append(helper.make_tensor_value_info(name, TensorProto.FLOAT, dims))
        return out

    def _node(self, node: onnx.NodeProto) -> None:
        g = self.g
        if all(o in self.g.consts for o in node.output if o) and node.domain in ("", "ai.onnx"):
            return  # a constant (folded by QatGraph): its readers take the value
        if node.domain == DOMAIN and node.input[0] in g.consts or node.output[0] in g.weight_restore:
            return  # weight quantizer (and its scale restore): read by its consumer
        self.lowered_nodes += 1
        if node.name in self.keep_float or any(o in self.keep_float for o in node.output):
            return self._island(node, "kept by keep_float", f"{node_label(node)} kept in float (keep_float)")
        data = [i for i in node.input if i and i not in g.consts]
        if data and all(isinstance(self.val.get(i), Plain) for i in data) and node.domain != DOMAIN:
            return self._copy_plain(node)
        handler = LOWERINGS.get(node.op_type) if node.domain in ("", "ai.onnx", DOMAIN) else None
        if handler is None:
            if node.domain == DOMAIN:
                raise FuseError(f"{node_label(node)}: unknown quantizer op")
            return self._island(node, "no integer lowering", f"{node_label(node)} has no integer lowering")
        mark, done = self.b.mark(), set(self.done)
        self._journal = []
        try:
            handler(self, node)
        except NoIntegerForm as exc:
            if node.domain == DOMAIN:  # a quantizer cannot stay as it is: it is a custom op
                raise FuseError(str(exc)) from None
            self.b.rollback(mark)
            self.done = done
            for name, old in reversed(self._journal):
                self.val[name] = old
            self._island(node, exc.cause, str(exc))

    def _island(self, node: onnx.NodeProto, cause: str, reason: str) -> None:
        """The node in float. Before any quantized value (float input the model quantizes itself: its normalisation)
        it is the float head, after the last quantizer (a detector's Transpose/Concat of its heads, a classifier's
        Softmax) the float tail; in between a float island."""
        float_island(self, node)
        name = node.name or node.output[0]
        data = [i for i in node.input if i and i not in self.g.consts]
        if data and all(i in self._head_tensors or isinstance(self.val.get(i), Plain) for i in data):
            self.head.append(name)
            self._head_tensors.update(o for o in node.output if o)
        elif not any(o in self._feeds_quantizer for o in node.output if o):
            self.tail.append(name)
        else:
            self.islands.append(Island(name, node.op_type, cause, reason))

    def _reaching_quantizers(self) -> set[str]:
        """Tensors from which an activation quantizer can be reached (the rest is after the last one)."""
        g, reach = self.g, set()
        for node in reversed(self.g.model.graph.node):
            if (is_quantizer(node) and node.input[0] not in g.consts) or any(o in reach for o in node.output if o):
                reach.update(i for i in node.input if i)
        return reach

    def _copy_plain(self, node: onnx.NodeProto) -> None:
        """A node of shape arithmetic (all inputs Plain or constant): copied, outputs Plain."""
        b, g = self.b, self.g
        ins = [("" if not i else b.const(i, g.consts[i]) if i in g.consts else self.val[i].name) for i in node.input]
        outs = [b.fresh(o) if o else "" for o in node.output]
        b.nodes.append(helper.make_node(node.op_type, ins, outs, name=b.fresh(node.name or outs[0]),
                                        domain=node.domain, **{a.name: helper.get_attribute_value(a)
                                                               for a in node.attribute}))
        for o_old, o_new in zip(node.output, outs):
            if o_old:
                self.val[o_old] = Plain(o_new)
