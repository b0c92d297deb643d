"""The quantizer op library seen from Python: schema, numpy reference, loading, gradients."""

from onnxqat.ops.schema import DOMAIN, OPSET_VERSION, QUANTIZER_OP_TYPES

__all__ = ["DOMAIN", "OPSET_VERSION", "QUANTIZER_OP_TYPES"]
