"""Read-only view of a QAT graph: constants, producers, consumers, quantizer nodes (CONVENTIONS.md names)."""

from __future__ import annotations

from collections import defaultdict

import numpy as np
import onnx
from onnx import numpy_helper

from onnxqat.errors import FuseError
from onnxqat.graph import quantizers_as_identity
from onnxqat.ops.schema import is_quantizer, is_scale_restore


def node_label(node: onnx.NodeProto) -> str:
    return f"{node.op_type} '{node.name or node.output[0]}'"


class NoIntegerForm(Exception):
    """A lowering cannot write this node with integer ops here (the reason says why). Not a user error: the walk keeps
    the node in float between DequantizeLinear and the next quantizer (a float island), or, with integer_only, reports
    it. FuseError stays for what no island can mend (a malformed quantizer, an accumulator that could overflow)."""

    def __init__(self, reason: str, cause: str = ""):
        super().__init__(reason)
        self.cause = cause or reason  # short, groupable: "no integer lowering", "input not quantized", ...


FUSED_OPSET = 21  # the opset of the fused model (BitwiseAnd needs 18, int4 types 21)


def upgraded(model: onnx.ModelProto, opset: int = FUSED_OPSET) -> onnx.ModelProto:
    """The QAT model at the fused model's opset (onnx.version_converter; the quantizers' domain passes through), so
    that nodes copied into the fused graph (shape ops, float islands) are valid there: ReduceMean's axes, Unsqueeze's
    axes, Clip's bounds ... moved from attributes to inputs between opsets 11 and 18."""
    current = next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), opset)
    if current >= opset:
        return model
    try:
        return onnx.version_converter.convert_version(model, opset)
    except Exception as exc:
        raise FuseError(f"cannot convert the model from opset {current} to {opset} "
                        f"(onnx.version_converter: {str(exc).splitlines()[0] if str(exc) else type(exc).__name__})"
                        ) from None


_NOT_FOLDED = {"Shape", "Size", "RandomNormal", "RandomUniform", "RandomNormalLike", "RandomUniformLike", "Multinomial",
               "Bernoulli"}


class QatGraph:
    """Constants by name, producer/consumers of each tensor, and the attribute/initializer helpers fuse needs."""

    def __init__(self, model: onnx.ModelProto):
        self.model = model
        g = model.graph
        self.consts: dict[str, np.ndarray] = {t.name: numpy_helper.to_array(t) for t in g.initializer}
        self._fold_constants()
        self.producer: dict[str, onnx.NodeProto] = {}
        self.consumers: dict[str, list[onnx.NodeProto]] = defaultdict(list)
        for n in g.node:
            for o in n.output:
                if o:
                    self.producer[o] = n
            for i in n.input:
                if i:
                    self.consumers[i].append(n)
        init_names = {t.name for t in g.initializer}
        self.inputs = [i for i in g.input if i.name not in init_names]
        self.output_names = [o.name for o in g.output]
        self.quantizers = [n for n in g.node if is_quantizer(n)]
        # Mul(weight quantizer, constant) output -> (the quantizer, the constant): folded into the layer's scale
        self.weight_restore: dict[str, tuple[onnx.NodeProto, np.ndarray]] = {}
        for n in g.node:
            q = self.producer.get(n.input[0]) if is_scale_restore(n) else None
            if q is not None and is_quantizer(q) and q.input[0] in self.consts and n.input[1] in self.consts:
                self.weight_restore[n.output[0]] = (q, self.consts[n.input[1]])
        self._types: dict[str, tuple[int, list]] | None = None

    def _fold_constants(self) -> None:
        """Outputs of nodes whose inputs are all constants are constants too (Constant, an exporter's Identity on a
        shared weight, a Cast or Reshape of an initializer ...): evaluated once with onnx.reference."""
        from onnx.reference import ReferenceEvaluator

        for n in self.model.graph.node:
            if n.domain not in ("", "ai.onnx") or n.op_type in _NOT_FOLDED or not n.output:
                continue
            if n.op_type == "Constant":
                a = next((a for a in n.attribute if a.name == "value"), None)
                if a is not None:
                    self.consts[n.output[0]] = numpy_helper.to_array(a.t)
                    continue
            if not all(i in self.consts for i in n.input if i):
                continue
            try:
                inits = [numpy_helper.from_array(self.consts[i], i) for i in dict.fromkeys(n.input) if i]
                m = onnx.helper.make_model(onnx.helper.make_graph(
                    [n], "fold", [], [onnx.helper.make_tensor_value_info(o, 0, None) for o in n.output if o], inits),
                    opset_imports=[o for o in self.model.opset_import if o.domain in ("", "ai.onnx")])
                values = ReferenceEvaluator(m).run(None, {})
            except Exception:  # not foldable here: the walk lowers it as a node
                continue
            for o, v in zip([o for o in n.output if o], values):
                self.consts[o] = np.asarray(v)

    def _infer(self) -> dict[str, tuple[int, list]]:
        """(elem type, static dims or None) of every tensor shape inference can tell, quantizers read as Identity."""
        if self._types is None:
            self._types = {}
            try:
                inferred = onnx.shape_inference.infer_shapes(quantizers_as_identity(self.model))
            except Exception:  # best effort: what inference cannot tell stays unknown
                inferred = self.model
            g = inferred.graph
            for vi in list(g.value_info) + list(g.input) + list(g.output):
                t = vi.type.tensor_type
                dims = [d.dim_value if d.HasField("dim_value") else None for d in t.shape.dim] \
                    if t.HasField("shape") else None
                self._types[vi.name] = (t.elem_type, dims)
            for name, v in self.consts.items():
                self._types.setdefault(name, (onnx.helper.np_dtype_to_tensor_dtype(v.dtype), list(v.shape)))
        return self._types

    def shape_of(self, name: str) -> list | None:
        """Static dims of a tensor (None where unknown)."""
        return self._infer().get(name, (0, None))[1]

    def elem_type(self, name: str) -> int:
        """ONNX element type of a tensor (0 when unknown)."""
        return self._infer().get(name, (0, None))[0]

    def const(self, name: str, node: onnx.NodeProto, what: str) -> np.ndarray:
        if name not in self.consts:
            raise FuseError(f"{node_label(node)}: {what} '{name}' is not a constant initializer")
        return self.consts[name]

    def scalar(self, node: onnx.NodeProto, index: int, what: str) -> float:
        v = self.const(node.input[index], node, what)
        if v.size != 1:
            raise FuseError(f"{node_label(node)}: {what} '{node.input[index]}' must be a scalar, has shape {list(v.shape)}")
        return float(v.reshape(-1)[0])

    def only_consumer(self, tensor: str) -> onnx.NodeProto | None:
        c = self.consumers.get(tensor, [])
        if len(c) == 1 and tensor not in self.output_names:
            return c[0]
        return None


def codes_input(g: QatGraph, input_type: str = "auto") -> str | None:
    """The input the fused graph takes as image codes: with input_type "uint8" the first float input (the user says
    it holds whole codes times input_scale), else image_input(g)."""
    if input_type == "uint8":
        return next((i.name for i in g.inputs if i.type.tensor_type.elem_type == onnx.TensorProto.FLOAT), None)
    return image_input(g)


def image_input(g: QatGraph) -> str | None:
    """The network input that enters the fused graph as codes (uint8 image codes with input_scale): the first float
    input that a weighted layer reads with no activation quantizer on the way (N2D2's design: the image is the first
    layer's 8-bit input). An input whose every path meets a quantizer first (a recipe that quantizes the normalised
    image, a recurrent state) stays float and the graph quantizes it, exactly as the QAT model does: no assumption
    about its value range."""
    for inp in g.inputs:
        if inp.type.tensor_type.elem_type == onnx.TensorProto.FLOAT and _read_unquantized(g, inp.name):
            return inp.name
    return None


_WEIGHTED = ("Conv", "ConvTranspose", "Gemm", "MatMul")


def _read_unquantized(g: QatGraph, tensor: str) -> bool:
    """Whether a weighted layer reads `tensor` (through other ops) before any activation quantizer."""
    seen, stack = set(), [tensor]
    while stack:
        t = stack.pop()
        for n in g.consumers.get(t, []):
            if is_quantizer(n) or id(n) in seen:
                continue
            seen.add(id(n))
            if n.op_type in _WEIGHTED:
                return True
            stack.extend(o for o in n.output if o)
    return False


def attrs(node: onnx.NodeProto) -> dict:
    """Attribute values by name; strings as str (onnx gives bytes)."""
    return {a.name: (v.decode() if isinstance(v, bytes) else v)
            for a in node.attribute for v in [onnx.helper.get_attribute_value(a)]}


def check_range(node: onnx.NodeProto, r: float, *, max_r: int | None = None, what: str = "range") -> int:
    """R must be a whole number >= 1 (and <= max_r where codes must fit a type)."""
    if not np.isfinite(r) or r < 1 or abs(r - round(r)) > 1e-6:
        raise FuseError(f"{node_label(node)}: inconsistent {what} R={r:g} (must be a whole number >= 1)")
    ri = int(round(r))
    if max_r is not None and ri > max_r:
        raise FuseError(f"{node_label(node)}: {what} R={ri} does not fit 8-bit codes (at most {max_r})")
    return ri
