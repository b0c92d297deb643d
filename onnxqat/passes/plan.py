"""The plan: what the passes decided to insert, before anything is edited.

Each pass emits PlanEntry objects; onnxqat.passes.apply turns a Plan into graph
edits. `Plan.format()` is what `onnxqat insert --dry-run` prints and what the
golden files in tests/passes/golden/ hold.
"""

from __future__ import annotations

from dataclasses import dataclass, field


def _fmt(x: float) -> str:
    return f"{x:.6g}"


def _span(values: tuple[float, ...]) -> str:
    """One value, or [count: min..max]."""
    return _fmt(values[0]) if len(values) == 1 else f"[{len(values)}: {_fmt(min(values))}..{_fmt(max(values))}]"


@dataclass(frozen=True)
class PlanEntry:
    kind: str  # "weight" | "activation"
    name: str  # the quantizer node to create (<consumer>_wquant, <activation>_aquant)
    op_type: str  # SatWeightQuant | SatActQuant | LsqQuant
    node: str  # weighted layer (weight) or the activation node (activation)
    node_op: str  # its op type
    tensor: str  # quantized tensor: the weight, or the activation's output
    port: int  # weight: input index on `node`; activation: -1
    method: str  # "sat" | "lsq"
    range: int
    consumers: tuple[str, ...] = ()  # nodes whose input is rewired to the quantizer output
    # SAT weights
    mode: str | None = None
    fan_out: int = 0
    restore_scale: tuple[float, ...] | None = None  # constant per output channel after the quantizer (weights.restore_scale)
    # SAT activations
    alpha: float | None = None
    # LSQ
    step: tuple[float, ...] | None = None
    signed: bool = False
    grad_scale: float | None = None
    axis: int = 0
    per_channel: bool = False
    notes: tuple[str, ...] = ()  # "first", "last", "calibrated", ...

    @property
    def output(self) -> str:
        """The quantizer's output tensor."""
        if self.op_type == "SatActQuant":
            return self.tensor  # it replaces the activation node, keeps its output name
        return f"{self.tensor}_q"

    @property
    def layer_input(self) -> str:
        """What the consumers read: the quantizer's output, or that times the restore_scale constant."""
        return f"{self.tensor}_qs" if self.restore_scale is not None else self.output

    def parameters(self) -> str:
        if self.op_type == "SatWeightQuant":
            restore = f" restore_scale={_span(self.restore_scale)}" if self.restore_scale else ""
            return f"mode={self.mode} fan_out={self.fan_out}{restore}"
        if self.op_type == "SatActQuant":
            return f"alpha={_fmt(self.alpha)}"
        return (f"step={_span(self.step or ())} signed={int(self.signed)} grad_scale={_fmt(self.grad_scale)} "
                f"axis={self.axis}")

    def format(self) -> str:
        where = f"{self.node} ({self.node_op})"
        port = f" port={self.port}" if self.port >= 0 else ""
        notes = f"  [{', '.join(self.notes)}]" if self.notes else ""
        return (
            f"{self.kind:<10} {self.name}  {self.op_type}  on {where} tensor={self.tensor}{port}"
            f" range={self.range} {self.parameters()}{notes}"
        )


@dataclass
class Plan:
    model: str
    recipe: str
    entries: list[PlanEntry] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)

    @property
    def weights(self) -> list[PlanEntry]:
        return [e for e in self.entries if e.kind == "weight"]

    @property
    def activations(self) -> list[PlanEntry]:
        return [e for e in self.entries if e.kind == "activation"]

    def format(self) -> str:
        lines = [
            f"# onnxqat plan: model {self.model}, recipe {self.recipe}: "
            f"{len(self.weights)} weight quantizers, {len(self.activations)} activation quantizers"
        ]
        lines += [e.format() for e in self.entries]
        lines += [f"warning: {w}" for w in self.warnings]
        return "\n".join(lines) + "\n"
