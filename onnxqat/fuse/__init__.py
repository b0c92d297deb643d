"""Fusion of a trained QAT graph into an integer-only ONNX model of standard ops (or a QDQ model).

Modules: graph.py (read the QAT graph), weights.py (weight quantizer -> integer codes), storage.py (low-bit packing),
lower.py (BN folding + integer/QDQ lowering, fixed-point rescaling), verify.py (self-check, accuracy check),
stock.py (run on the latest stock onnxruntime in .venv-stock), api.py (`fuse()`).
"""

from onnxqat.fuse.api import FuseResult, fuse
from onnxqat.fuse.verify import accuracy_check

__all__ = ["fuse", "FuseResult", "accuracy_check"]
