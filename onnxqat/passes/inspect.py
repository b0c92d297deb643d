"""inspect: the quantizers of a QAT model and its weight memory at their bit widths.

    report = inspect("resnet18.qat.onnx")
    print(report.format())
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np
from onnx import numpy_helper

from onnxqat.graph import GraphIndex, load_model
from onnxqat.ops.schema import is_quantizer, is_scale_restore, signature
from onnxqat.recipes import WEIGHTED_OP_TYPES

_METHOD = {"SatWeightQuant": "sat", "SatActQuant": "sat", "LsqQuant": "lsq"}
_SAT_MODES = {0: "clamp", 1: "quantize", 2: "symmetric", 3: "fullrange", 4: "asymmetric", 5: "asymmetric-clamp"}


def bits_of(r: float) -> int:
    """Bits needed for R+1 levels (R = 15 -> 4, 255 -> 8)."""
    return max(1, math.ceil(math.log2(float(r) + 1)))


@dataclass(frozen=True)
class QuantizerRow:
    node: str
    op_type: str
    kind: str  # weight | activation
    tensor: str
    method: str
    range: int
    bits: int
    parameters: str
    elements: int  # weights it quantizes (0 for activations)


@dataclass
class InspectReport:
    model: str
    recipe: str | None
    rows: list[QuantizerRow] = field(default_factory=list)
    quantized_weight_bits: int = 0  # sum of elements * bits over quantized weights
    float_params: int = 0  # parameters of weighted layers/BatchNorm that stay float32
    total_params: int = 0

    @property
    def memory_bytes(self) -> float:
        return (self.quantized_weight_bits + 32 * self.float_params) / 8

    @property
    def float_memory_bytes(self) -> float:
        return 4.0 * self.total_params

    def format(self) -> str:
        head = ("node", "kind", "method", "bits", "range", "tensor", "parameters")
        table = [head] + [
            (r.node, r.kind, r.method, str(r.bits), str(r.range), r.tensor, r.parameters) for r in self.rows
        ]
        widths = [max(len(row[i]) for row in table) for i in range(len(head) - 1)]
        lines = [f"model {self.model}" + (f", recipe {self.recipe}" if self.recipe else "")]
        for row in table:
            lines.append("  ".join(c.ljust(w) for c, w in zip(row, widths)) + "  " + row[-1])
        nw = sum(1 for r in self.rows if r.kind == "weight")
        na = len(self.rows) - nw
        ratio = self.float_memory_bytes / self.memory_bytes if self.memory_bytes else float("nan")
        lines.append(f"{nw} weight quantizers, {na} activation quantizers")
        lines.append(
            f"weight memory: {_human(self.memory_bytes)} at these bits vs {_human(self.float_memory_bytes)} float32 "
            f"({ratio:.2f}x smaller; {self.total_params} parameters, {self.float_params} kept float)"
        )
        return "\n".join(lines) + "\n"


def _human(n: float) -> str:
    for unit, size in (("MB", 1e6), ("kB", 1e3)):
        if n >= size:
            return f"{n / size:.2f} {unit}"
    return f"{n:.0f} B"


def _value(index: GraphIndex, tensor: str) -> np.ndarray | None:
    if tensor in index.initializers:
        return numpy_helper.to_array(index.initializers[tensor])
    if index.is_constant(tensor):
        return np.asarray(index.constant_value(tensor).array())
    return None


def inspect(model) -> InspectReport:
    m = load_model(model)
    index = GraphIndex(m)
    recipe = next((p.value for p in m.metadata_props if p.key == "onnxqat.recipe"), None)
    report = InspectReport(model=m.graph.name or "model", recipe=recipe)
    quantized: dict[str, int] = {}  # weight tensor -> bits
    for node in m.graph.node:
        if not is_quantizer(node):
            continue
        # the quantizer's parameter inputs by their schema names (input 0, the quantized tensor, is not read)
        vals = {name: _value(index, t) for name, t in zip(signature(node.op_type).inputs[1:], node.input[1:])}

        def scalar(name: str) -> float:
            return float(np.asarray(vals[name]).reshape(-1)[0])

        r = scalar("range")
        if node.op_type == "SatActQuant":
            params = f"alpha={scalar('alpha'):.6g}"
            kind = "activation"
        elif node.op_type == "SatWeightQuant":
            mode = _SAT_MODES.get(int(scalar("mode")), "?")
            params = f"mode={mode} fan_out={int(scalar('scale_fan_out'))}"
            restore = next((c for c, _ in index.consumers.get(node.output[0], []) if is_scale_restore(c)), None)
            if restore is not None:
                c = np.asarray(_value(index, restore.input[1])).reshape(-1)
                params += f" restore_scale={c[0]:.6g}" if c.size == 1 else \
                    f" restore_scale=[{c.size}: {c.min():.6g}..{c.max():.6g}]"
            kind = "weight"
        else:
            step = np.asarray(vals["step"]).reshape(-1)
            s = f"{step[0]:.6g}" if step.size == 1 else f"[{step.size}: {step.min():.6g}..{step.max():.6g}]"
            params = f"step={s} signed={int(scalar('signed'))} grad_scale={scalar('grad_scale'):.6g}"
            kind = "weight" if index.is_constant(node.input[0]) else "activation"
        elements = 0
        if kind == "weight":
            elements = int(np.prod(index.constant_value(node.input[0]).shape))
            quantized[node.input[0]] = bits_of(r)
        report.rows.append(
            QuantizerRow(node.name, node.op_type, kind, node.input[0], _METHOD[node.op_type], int(round(r)),
                         bits_of(r), params, elements)
        )
    # parameters: constant inputs of weighted layers (read through weight quantizers) and of BatchNormalization
    params: dict[str, int] = {}
    for node in m.graph.node:
        if node.op_type not in WEIGHTED_OP_TYPES + ("BatchNormalization",) or node.domain not in ("", "ai.onnx"):
            continue
        for t in node.input:
            q = index.producer.get(t)
            if q is not None and is_scale_restore(q):  # folded into the layer's scale by fuse: no parameter
                t, q = q.input[0], index.producer.get(q.input[0])
            if q is not None and is_quantizer(q):
                t = q.input[0]
            if t and t not in params and index.is_constant(t):
                params[t] = int(np.prod(index.constant_value(t).shape))
    report.total_params = sum(params.values())
    report.quantized_weight_bits = sum(params[t] * b for t, b in quantized.items() if t in params)
    report.float_params = sum(n for t, n in params.items() if t not in quantized)
    return report
