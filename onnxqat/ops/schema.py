"""The contract of the quantizer op library: domain, op names, input order.

Every per-node value (range R, mode, fan-out, signedness, gradient scale,
channel axis) is a constant *input*, never an attribute: ORT fixes a gradient
node's attributes when the gradient is registered per op type, so attributes
could not differ between two nodes of the same type (ORT training notes).

The C++ kernels (custom_ops/cpu, custom_ops/cuda), the numpy reference
(onnxqat/ops/reference.py) and the graph passes all follow this file.
"""

from __future__ import annotations

from dataclasses import dataclass

DOMAIN = "com.onnxqat"
OPSET_VERSION = 1

# SatWeightQuant mode input values (N2D2 ApplyQuantization / QuantMode).
SAT_MODE_CLAMP = 0  # ApplyQuantization=0: Wq = tanh(W)/max|tanh(W)|
SAT_MODE_DOREFA = 1  # ApplyQuantization=1, QuantMode=Default: R+1 levels in [-1, 1]
SAT_MODE_SYMMETRIC = 2  # ApplyQuantization=1, QuantMode=Symmetric: 2*floor(R/2)+1 levels
# N2D2 SATQuantizerCell modes (SATQuantizer_Frame_Kernels): QuantMode=FullRange, R+1 levels 2j/R - 1 from u = (tn+1)/2
# stretched to (1 + 0.9998/R) u - 0.4999/R (the end levels get whole bins); QuantMode=Asymmetric, 2h+2 levels j/h,
# j in [-h-1, h] (h = floor(R/2): an 8-bit weight is exactly an int8) from q = (1 + 1/(2h)) tn - 1/(2h); its
# ApplyQuantization=0 phase is q itself. The weight gradient is multiplied by the stretch (1 + 0.9998/R), (1 + 1/(2h)).
SAT_MODE_FULLRANGE = 3
SAT_MODE_ASYMMETRIC = 4
SAT_MODE_ASYMMETRIC_CLAMP = 5
SAT_MODES_DOREFA_LEVELS = (SAT_MODE_DOREFA, SAT_MODE_FULLRANGE)  # levels 2 j / R - 1, j in [0, R]
SAT_MODES_HALF = (SAT_MODE_SYMMETRIC, SAT_MODE_ASYMMETRIC, SAT_MODE_ASYMMETRIC_CLAMP)  # need floor(R/2) >= 1
SAT_MODES_CLAMP = (SAT_MODE_CLAMP, SAT_MODE_ASYMMETRIC_CLAMP)  # not quantized (training phase one)


@dataclass(frozen=True)
class OpSignature:
    name: str
    inputs: tuple[str, ...]
    outputs: tuple[str, ...]
    # Gradient op: takes GO(0), then every forward input, then the forward
    # outputs listed in `grad_uses_outputs` (by index; ORT's O(k)); returns one
    # gradient per trainable forward input (listed in `grad_of`, by forward
    # input index).
    grad_name: str
    grad_of: tuple[int, ...]
    # Outputs from this index on are optional: an inference graph leaves them
    # out; the training graph has them (onnxqat.ops.gradients.add_gradient_outputs)
    # where the gradient op reads them.
    first_optional_output: int | None = None
    grad_uses_outputs: tuple[int, ...] = ()


SAT_WEIGHT = OpSignature(
    name="SatWeightQuant",
    # W: float32 any shape; range: float32 scalar R >= 1;
    # mode: int64 scalar (SAT_MODE_*); scale_fan_out: int64 scalar, 0 = no
    # ApplyScaling, n > 0 = ApplyScaling with fan-out n.
    # Outputs: Wq; optional dWq_dW = sech^2(W) / (M * S) (float32, sech2_f32; shaped
    # like W), the derivative factor, so that the gradient op evaluates no tanh.
    # Gradient op SatWeightQuantGrad(dWq, W, range, mode, scale_fan_out,
    # [dWq_dW]) -> dW = dWq * dWq_dW; without its optional input 5 it computes
    # the factor from W (tanh, M, S) itself.
    inputs=("W", "range", "mode", "scale_fan_out"),
    outputs=("Wq", "dWq_dW"),
    grad_name="SatWeightQuantGrad",
    grad_of=(0,),
    first_optional_output=1,
    grad_uses_outputs=(1,),
)

SAT_ACT = OpSignature(
    name="SatActQuant",
    # x: float32 any shape; alpha: float32 scalar (shape [] or [1]), > 0;
    # range: float32 scalar R >= 1.
    inputs=("x", "alpha", "range"),
    outputs=("y",),
    grad_name="SatActQuantGrad",
    grad_of=(0, 1),
)

LSQ = OpSignature(
    name="LsqQuant",
    # v: float32 any shape; step: float32, shape [] or [1] (per tensor) or
    # [C] with C == v.shape[axis] (per channel), every element > 0;
    # range: float32 scalar R >= 1; signed: int64 scalar (1: Qn=-(R+1)/2,
    # Qp=(R-1)/2, weights; 0: Qn=0, Qp=R, activations); grad_scale: float32
    # scalar g; axis: int64 scalar channel axis (ignored per tensor).
    # y = round(clip(v/s, Qn, Qp)) * s, rounding half to even (as N2D2's CUDA kernels; N2D2's CPU kernels round
    # half away from zero: the two differ on exact ties only). dv = dy strictly inside (Qn, Qp), 0 at and beyond
    # the bounds (LSQ paper Eq. 3, N2D2); ds = g * sum dy * {Qn | Qp at and beyond the bounds, round(v/s) - v/s
    # inside}. g = 1/sqrt(N Qp) is set by insert: N = weights of the tensor, or features per sample (LSQ paper;
    # recipe activations.grad_scale = "n2d2": batch x features, as N2D2).
    inputs=("v", "step", "range", "signed", "grad_scale", "axis"),
    outputs=("y",),
    grad_name="LsqQuantGrad",
    grad_of=(0, 1),
)

ALL_OPS = (SAT_WEIGHT, SAT_ACT, LSQ)
QUANTIZER_OP_TYPES = frozenset(op.name for op in ALL_OPS)


def is_quantizer(node) -> bool:
    """Whether an onnx NodeProto is one of the quantizer ops above (domain and op type both)."""
    return node.domain == DOMAIN and node.op_type in QUANTIZER_OP_TYPES


def signature(op_type: str) -> OpSignature:
    for op in ALL_OPS:
        if op.name == op_type:
            return op
    raise KeyError(op_type)


# A stock Mul(Wq, c) after a SAT weight quantizer (recipe key weights.restore_scale): a constant per output channel that
# training leaves as it is, fuse folds into the layer's scale and strip_quantizers removes with the quantizer.
SCALE_RESTORE_DOC = "onnxqat.weight_scale_restore"


def is_scale_restore(node) -> bool:
    return node.op_type == "Mul" and node.domain in ("", "ai.onnx") and node.doc_string == SCALE_RESTORE_DOC
