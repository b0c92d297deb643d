"""How the lowering represents the value of each QAT-graph tensor in the new graph, and what the lowering returns.

- Codes:  unsigned integer codes u in [0, R] with real value scale * (u - zp) (the output of an activation quantizer, or
  the network input as image codes);
- Acc:    an integer accumulator (or a sum of them, residual Add) with real value sum_i scale_i * t_i + bias, the scales
  and bias per output channel: the output of Conv/Gemm/MatMul on codes with BatchNormalization folded in;
- Float:  a float tensor (QDQ format, or a node the user keeps in float with keep_float);
- Pooled: the mean of codes (GlobalAveragePool), not yet computed.
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


@dataclass
class Float:
    name: str
    grid: Codes | None = None  # set when the float tensor is exactly grid.scale * codes
    unit: tuple | None = None  # (scale vector, axis): the integer step of a weighted layer's output (QDQ logits)


@dataclass
class Pooled:
    """The mean of codes over `axes` (GlobalAveragePool), not yet computed: real = codes.scale * (sum(u) / count - zp).
    A quantizer after it takes the int32 sum; a Gemm/MatMul right after it (through Flatten) runs first as a 1x1
    ConvInteger on the codes and sums its output (sum and matrix product commute), so it stays exact."""
    codes: Codes
    axes: list
    count: int
    flat: bool = False


@dataclass
class OutputInfo:
    name: str
    scale: np.ndarray  # real value of one output code, per channel
    axis: int
    dtype: int


@dataclass
class Lowered:
    model: onnx.ModelProto
    outputs: list[OutputInfo]
    weight_params: int = 0
    weight_bits: dict = field(default_factory=dict)
    kept_float: list = field(default_factory=list)
    activation_codes: dict = field(default_factory=dict)  # quantizer output -> (fused codes tensor, scale, zp)


def as_vector(v) -> np.ndarray:
    """A constant as a flat float64 vector (per-channel parameters, scalars as one element)."""
    return np.atleast_1d(np.asarray(v, dtype=np.float64)).reshape(-1)
