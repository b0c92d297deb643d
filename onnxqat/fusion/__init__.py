"""Fusion of a trained QAT graph into an integer-only ONNX model of standard ops (or a QDQ model).

Modules: graph.py (read the QAT graph), weights.py (weight quantizer -> integer codes), storage.py (low-bit packing),
builder.py (the graph being written), values.py (how a tensor is represented: codes, accumulator, float, pooled sum),
lower.py (the walk: `Lowerer`, one node at a time to the module of its concern), fold_batchnorm.py (BN folding),
lower_weighted.py (Conv/Gemm/MatMul: scale and bias per channel), lower_integer.py (ConvInteger/MatMulInteger
accumulator), lower_qdq.py (QDQ weighted layer), requantize.py (activation quantizers: fixed-point multiplier and
half-to-even rounding shift, float rescale, QDQ), lower_codes.py (Relu/Clip, input normalisation, shape ops, Concat),
lower_pooling.py (GlobalAveragePool), lower_residual.py (residual Add), float_islands.py (nodes kept in float),
outputs.py (graph outputs, the fused ModelProto), verify.py (self-check, accuracy check), stock.py (run on the latest
stock onnxruntime in .venv-stock), api.py (`fuse()`).
"""

from onnxqat.fusion.api import FuseResult, fuse
from onnxqat.fusion.verify import accuracy_check

__all__ = ["fuse", "FuseResult", "accuracy_check"]

