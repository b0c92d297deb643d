"""Read-only view of a QAT graph: constants, producers, consumers, quantizer nodes (CONVENTIONS.md names)."""

from __future__ import annotations

from collections import defaultdict

import numpy as np
import onnx
from onnx import numpy_helper

from onnxqat.errors import FuseError
from onnxqat.ops.schema import is_quantizer


def node_label(node: onnx.NodeProto) -> str:
    return f"{node.op_type} '{node.name or node.output[0]}'"


class QatGraph:
    """Constants by name, producer/consumers of each tensor, and the attribute/initializer helpers fuse needs."""

    def __init__(self, model: onnx.ModelProto):
        self.model = model
        g = model.graph
        self.consts: dict[str, np.ndarray] = {t.name: numpy_helper.to_array(t) for t in g.initializer}
        for n in g.node:
            if n.op_type == "Constant" and n.domain in ("", "ai.onnx"):
                for a in n.attribute:
                    if a.name == "value":
                        self.consts[n.output[0]] = numpy_helper.to_array(a.t)
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


def attrs(node: onnx.NodeProto) -> dict:
    return {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}


def check_range(node: onnx.NodeProto, r: float, *, max_r: int | None = None, what: str = "range") -> int:
    """R must be a whole number >= 1 (and <= max_r where codes must fit a type)."""
    if not np.isfinite(r) or r < 1 or abs(r - round(r)) > 1e-6:
        raise FuseError(f"{node_label(node)}: inconsistent {what} R={r:g} (must be a whole number >= 1)")
    ri = int(round(r))
    if max_r is not None and ri > max_r:
        raise FuseError(f"{node_label(node)}: {what} R={ri} does not fit 8-bit codes (at most {max_r})")
    return ri
