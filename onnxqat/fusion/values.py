"""How the lowering represents the value of each QAT-graph tensor in the new graph, and what the lowering returns.

- Codes:  unsigned integer codes u in [0, R] with real value scale * (u - zp) (the output of an activation quantizer, or
  the network input as image codes);
- Acc:    an integer accumulator (or a sum of them, residual Add) with real value sum_i scale_i * t_i + bias, the scales
  and bias per output channel: the output of Conv/Gemm/MatMul on codes with BatchNormalization folded in;
- Float:  a float tensor (QDQ format, or a node the user keeps in float with keep_float);
- Pooled: the mean of codes (GlobalAveragePool), not yet computed;
- Plain:  a tensor that is not a quantized value at all (shapes, indices, int64 arithmetic of a Reshape's target
  shape): copied as it is.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import onnx
from onnx import TensorProto


@dataclass
class Codes:
    """Unsigned codes u in [0, r]; real value scale * (u - zp) (zp > 0: signed quantizers, input normalisation)."""
    name: str
    scale: float
    r: int
    dtype: int = TensorProto.UINT8
    zp: int = 0
    # the float32 value of each code u in the QAT model, where the quantizer computes it otherwise than
    # float32(u - zp) * float32(scale) (SatActQuant: alpha * (k / R)); lookup tables start from these
    values: np.ndarray | None = field(default=None, compare=False, repr=False)

    def real_values(self) -> np.ndarray:
        """float32 value of every code 0..r, as the fake-quantized model holds it."""
        if self.values is not None:
            return self.values
        u = np.arange(self.r + 1, dtype=np.float32)
        return ((u - np.float32(self.zp)) * np.float32(self.scale)).astype(np.float32)

    @property
    def bound(self) -> float:  # max |u - zp|
        return float(max(self.zp, self.r - self.zp))

    def term(self) -> tuple:
        return (self.name, np.array([self.scale]), self.bound)

    def offset(self) -> np.ndarray:  # real bias of the term form: scale*u - scale*zp
        return np.array([-self.scale * self.zp])


@dataclass
class Acc:
    terms: list  # [(tensor name, float64 scale vector [C] or [1], bound on |t|)]
    bias: np.ndarray  # float64 [C] or [1]
    cshape: tuple  # broadcast shape of a per-channel vector against the tensor
    axis: int  # channel axis
    clip: tuple = (-np.inf, np.inf)  # a Relu / Clip(lo, hi) on the real value, folded into the next quantizer
    sources: tuple = ()  # the Codes summed, when the Acc is exactly a sum of codes (a format may add them natively)


@dataclass
class Float:
    name: str
    grid: Codes | None = None  # set when the float tensor is exactly grid.scale * codes
    unit: tuple | None = None  # (scale vector, axis): the integer step of a weighted layer's output (QDQ logits)
    island: bool = False  # the output of a node kept in float


@dataclass
class Pooled:
    """The mean of codes over `axes` (GlobalAveragePool), not yet computed: real = codes.scale * (sum(u) / count - zp).
    A quantizer after it takes the int32 sum; a Gemm/MatMul right after it (through Flatten) runs first as a 1x1
    ConvInteger on the codes and sums its output (sum and matrix product commute), so it stays exact."""
    codes: Codes
    axes: list
    count: int
    flat: bool = False


@dataclass(frozen=True)
class Replay:
    """How the fake-quantized model computes a Table's values from the float32 values of its codes, as float ops a
    format may emit instead of a lookup (onnxruntime's Gather is ~10x slower than its elementwise float ops):
    op None: the codes' values themselves; ("node", NodeProto, {input: constant}) applied to `parent`;
    ("mul",) the product of `parent` and `other` (x * Sigmoid(x))."""
    op: tuple | None = None
    parent: "Replay | None" = None
    other: "Replay | None" = None


CODES_REPLAY = Replay()


@dataclass
class Table:
    """f(codes) for an elementwise function f, not yet written: `values[u]` is the float32 value the fake-quantized
    model computes for code u (f applied to the code's value by the same kernel). A quantizer after it is one Gather
    of a table of its codes; anything else reads the Gather of the float values."""
    codes: Codes
    values: np.ndarray  # float32 [r + 1], or [C, r + 1]: one row per channel (a per-channel PRelu slope, mean, std)
    axis: int = 1  # the channel axis of a per-channel table, in a tensor of rank `rank`
    rank: int = 0
    # the float ops that give `values` from the codes' DequantizeLinear (None: only the table; the codes of a SAT
    # quantizer, whose values are alpha * (k / R), or a per-channel table moved to another layout)
    replay: Replay | None = field(default=None, compare=False, repr=False)

    @property
    def per_channel(self) -> bool:
        return self.values.ndim == 2


@dataclass
class Joined:
    """A Concat of codes on different grids, not yet written: the quantizer after it requantizes each part."""
    parts: list  # [Codes]
    axis: int


@dataclass
class Plain:
    """A non-float tensor of the QAT graph (Shape, Gather of a shape, Concat of int64 dims ...), copied verbatim."""
    name: str


@dataclass
class CodesProduct:
    """The Mul of two codes tensors (squeeze-excitation gating): real = a.scale b.scale (a - a.zp)(b - b.zp)."""
    a: Codes
    b: Codes
    out: str  # the QAT tensor it stands for


@dataclass
class Pending:
    """A weighted layer or a product of codes a format has not written yet, because how depends on what reads it (the
    ort format: a QLinearConv / QLinearMul when an activation quantizer follows, an accumulator otherwise).
    Lowerer.get() hands readers that don't ask for it raw the format's materialization (an Acc)."""
    layer: "WeightedLayer | CodesProduct"
    clip: tuple = (-np.inf, np.inf)


@dataclass
class WeightedLayer:
    """A Conv/Gemm/MatMul on codes with its bias Add and BatchNormalization folded in, as the formats receive it:
    real output = scale_o * acc + bias_o per output channel, acc = sum (x - x.zp) * W_int."""
    node: onnx.NodeProto
    x: Codes
    codes: object  # weights.WeightCodes
    wk: np.ndarray  # W_int in the op's layout (Gemm transB undone: [K, N])
    u: np.ndarray  # stored unsigned codes in the same layout
    w_shape: tuple
    n_out: int
    scale: np.ndarray  # float64 [n_out]
    bias: np.ndarray  # float64 [n_out]
    cshape: tuple  # broadcast shape of a per-channel vector against the output
    ch_axis: int
    out: str  # the QAT tensor it stands for (after the folded Add/BatchNormalization)
    pooled: Pooled | None = None
    folded: tuple = ()  # the bias Add / BatchNormalization nodes folded into it

    @property
    def base(self) -> str:
        return self.node.name or self.out


@dataclass
class OutputInfo:
    name: str
    scale: np.ndarray  # real value of one output code, per channel
    axis: int
    dtype: int
    # scale is an accumulator's step (input step x weight step), finer than the float32 the fake-quantized model
    # computes in: compared within that model's float32 rounding, not code for code
    accumulator: bool = False


@dataclass
class Lowered:
    model: onnx.ModelProto
    outputs: list[OutputInfo]
    weight_params: int = 0
    weight_bits: dict = field(default_factory=dict)
    islands: list = field(default_factory=list)  # lowering.Island: nodes kept in float
    activation_codes: dict = field(default_factory=dict)  # quantizer output -> (fused codes tensor, scale, zp)
    lowered_nodes: int = 0  # QAT nodes the walk handled (not counting Constants and weight quantizers)
    tail: list = field(default_factory=list)  # float ops after the last quantizer
    layers: list = field(default_factory=list)  # (WeightedLayer, bias step of the format's kernel or None) written
    head: list = field(default_factory=list)  # float ops before the first quantizer


def as_vector(v) -> np.ndarray:
    """A constant as a flat float64 vector (per-channel parameters, scalars as one element)."""
    return np.atleast_1d(np.asarray(v, dtype=np.float64)).reshape(-1)
