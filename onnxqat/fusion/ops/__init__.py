"""The lowering of each QAT op type: one module per family, each with a HANDLERS table {op_type: function}; LOWERINGS
is their union. A handler writes the node's value into low.val (values.py) or raises NoIntegerForm, and the walk then
keeps the node in float (a float island). Adding an op: a module with its HANDLERS, one line below."""

from __future__ import annotations

from onnxqat.fusion.ops import (arithmetic, batchnorm, clip, concat, movement, pooling, quantizer, shape, unary,
                                weighted)

LOWERINGS = {}
for _module in (weighted, batchnorm, quantizer, clip, arithmetic, movement, concat, pooling, shape, unary):
    LOWERINGS.update(_module.HANDLERS)
