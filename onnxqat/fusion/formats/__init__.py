"""Output formats of `fuse`: one module each, one entry in FORMATS.

- int: integer ops only, bit-exact (ConvInteger/MatMulInteger, fixed-point requantization); hardware targets.
- qdq: QuantizeLinear/DequantizeLinear around float ops; portable.
- ort: the integer kernels onnxruntime's CPU provider runs fast (QLinearConv, QGemm, QLinearAdd ...).
"""

from __future__ import annotations

from onnxqat.fusion.formats.base import Format
from onnxqat.fusion.formats.integer import IntegerFormat
from onnxqat.fusion.formats.onnxruntime import OrtFormat
from onnxqat.fusion.formats.qdq import QdqFormat

FORMATS: dict[str, type[Format]] = {"int": IntegerFormat, "ort": OrtFormat, "qdq": QdqFormat}
