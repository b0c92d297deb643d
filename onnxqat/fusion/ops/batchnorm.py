"""BatchNormalization folding: f = gamma / sqrt(var + eps); scale_o *= f_o; bias_o = f_o * (bias_o - mean_o) + beta_o.

Right after a weighted layer the factors go into that layer's scale and bias (ops/weighted.py); after a residual Add
of weighted layers (pre-activation style) into every term of the sum, which is still linear. Elsewhere it has no
integer form here and stays in float.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np
import onnx

from onnxqat.errors import FuseError
from onnxqat.fusion.graph import NoIntegerForm, QatGraph, attrs, node_label
from onnxqat.fusion.values import Acc, as_vector

if TYPE_CHECKING:
    from onnxqat.fusion.lowering import Lowerer


def batchnorm_factors(g: QatGraph, bn: onnx.NodeProto):
    """(f, beta, mean) of an inference-mode BatchNormalization, float64 per channel."""
    gamma, beta, mean, var = (as_vector(g.const(bn.input[i], bn, n)) for i, n in
                              ((1, "scale"), (2, "B"), (3, "mean"), (4, "var")))
    if attrs(bn).get("training_mode", 0):
        raise FuseError(f"{node_label(bn)}: training_mode=1 cannot be folded")
    if any(o for o in bn.output[1:]):
        raise FuseError(f"{node_label(bn)}: running-statistics outputs are in use")
    eps = float(attrs(bn).get("epsilon", 1e-5))
    f = gamma.astype(np.float32).astype(np.float64) / np.sqrt(var.astype(np.float64) + eps)
    return f, beta, mean


def batchnorm_on_acc(low: Lowerer, node: onnx.NodeProto) -> None:
    """A BatchNormalization of an accumulator (e.g. after a residual Add of weighted layers): scales every term."""
    v = low.get(node.input[0], node)
    if not isinstance(v, Acc):
        raise NoIntegerForm(f"{node_label(node)} follows no weighted layer: only BatchNormalization right after "
                            "Conv/Gemm/MatMul (or a sum of them) folds", "BatchNormalization not after a layer")
    if np.isfinite(v.clip).any():
        raise NoIntegerForm(f"{node_label(node)}: BatchNormalization after a Relu/Clip without a quantizer",
                            "BatchNormalization after an activation")
    f, beta, mean = batchnorm_factors(low.g, node)
    c = f.size
    if v.cshape == ():  # per-tensor so far: take the BN's channel layout from the input's rank
        dims = low.shape_of(node.input[0])
        if not dims:
            raise NoIntegerForm(f"{node_label(node)}: rank of '{node.input[0]}' unknown")
        v = Acc(v.terms, v.bias, (1, c) + (1,) * (len(dims) - 2) if len(dims) > 2 else (c,), 1 if len(dims) > 2 else -1)
    terms = [(t, np.broadcast_to(sc, (c,)) * f, bd) for t, sc, bd in v.terms]
    bias = f * (np.broadcast_to(v.bias, (c,)) - mean) + beta
    low.val[node.output[0]] = Acc(terms, bias, v.cshape, v.axis)


HANDLERS = {"BatchNormalization": batchnorm_on_acc}
