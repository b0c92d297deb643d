"""Fusion of a trained QAT graph into an integer ONNX model of standard ops (or a QDQ model). README.md in this folder
has the math and the module map: api.py (`fuse()`), lowering.py (the walk), ops/ (one lowering per op family),
formats/ (one module per output format), values.py, convert.py, weights.py, storage.py, outputs.py, verify.py."""

from onnxqat.fusion.api import FuseResult, fuse
from onnxqat.fusion.verify import accuracy_check

__all__ = ["fuse", "FuseResult", "accuracy_check"]
