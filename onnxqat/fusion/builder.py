"""Collects the nodes and initializers of the graph being written, with unique names."""

from __future__ import annotations

import numpy as np
import onnx
from onnx import helper, numpy_helper


class GraphBuilder:
    def __init__(self, taken: set[str]):
        self.nodes: list[onnx.NodeProto] = []
        self.initializers: list[onnx.TensorProto] = []
        self._taken = set(taken)

    def mark(self) -> tuple[int, int]:
        """A point to roll back to when a lowering gives up half-way (names stay taken: harmless)."""
        return len(self.nodes), len(self.initializers)

    def rollback(self, mark: tuple[int, int]) -> None:
        del self.nodes[mark[0]:]
        del self.initializers[mark[1]:]

    def fresh(self, base: str) -> str:
        name, i = base, 1
        while name in self._taken:
            name, i = f"{base}_{i}", i + 1
        self._taken.add(name)
        return name

    def const(self, base: str, value: np.ndarray) -> str:
        name = self.fresh(base)
        self.initializers.append(numpy_helper.from_array(np.asarray(value), name))
        return name

    def const_typed(self, base: str, raw: np.ndarray, dtype: int, dims: list[int]) -> str:
        """An initializer of an ONNX type numpy lacks (e.g. INT4), from its packed raw bytes."""
        name = self.fresh(base)
        t = helper.make_tensor(name, dtype, dims, vals=raw.tobytes(), raw=True)
        self.initializers.append(t)
        return name

    def node(self, op: str, inputs: list[str], base: str, n_out: int = 1, name: str | None = None, **attrs) -> list[str]:
        outs = [self.fresh(f"{base}" if n_out == 1 else f"{base}_{k}") for k in range(n_out)]
        self.nodes.append(helper.make_node(op, inputs, outs, name=self.fresh(name or f"{base}_{op}"), **attrs))
        return outs

    def op(self, op: str, inputs: list[str], base: str, **attrs) -> str:
        return self.node(op, inputs, base, **attrs)[0]

    def cast(self, x: str, to: int, base: str) -> str:
        return self.op("Cast", [x], base, to=to)
