"""Conv / Gemm / MatMul with a weight quantizer: the weight codes and the layer's real scale and bias per output
channel, with a following bias Add (MatMul) and BatchNormalization folded in; the format writes the layer
(low.fmt.weighted: an integer accumulator, a QLinear op, or a float op on dequantized weights).

Per output channel o, input codes with scale s_in: pre-activation real value = scale_o acc + bias_o with
scale_o = s_in s_w,o (Gemm alpha), bias_o = b_o (Gemm beta); BatchNormalization: scale_o <- f scale_o,
bias_o <- f (bias_o - mean) + beta (f < 0 needs no special case: the multiplier is a signed int64).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np
import onnx

from onnxqat.fusion.convert import to_codes
from onnxqat.fusion.graph import NoIntegerForm, attrs, node_label
from onnxqat.fusion.ops.batchnorm import batchnorm_factors
from onnxqat.fusion.values import Codes, Float, Pooled, WeightedLayer, as_vector
from onnxqat.fusion.weights import weight_codes
from onnxqat.ops.schema import DOMAIN

if TYPE_CHECKING:
    from onnxqat.fusion.lowering import Lowerer


def lower_weighted(low: Lowerer, node: onnx.NodeProto) -> None:
    g = low.g
    op = node.op_type
    if op == "ConvTranspose":
        raise NoIntegerForm(f"{node_label(node)}: ConvTranspose has no integer lowering yet", "no integer lowering")
    wname = node.input[1]
    q = g.producer.get(wname)
    if q is None or q.domain != DOMAIN or q.op_type not in ("SatWeightQuant", "LsqQuant"):
        raise NoIntegerForm(f"{node_label(node)}: weight '{wname}' has no weight quantizer", "weight not quantized")
    x = low.get(node.input[0], node)
    if isinstance(x, Float) and x.grid is not None:
        x = to_codes(low.b, x)
    pooled = None
    if isinstance(x, Pooled) and not low.fmt.float_arithmetic and (
            (x.flat and op in ("Gemm", "MatMul")) or (not x.flat and _pointwise_conv(node))):
        pooled, x = x, x.codes  # a 1x1 ConvInteger on the codes, summed over the pooled axes afterwards
    if not isinstance(x, Codes):
        raise NoIntegerForm(f"{node_label(node)}: input '{node.input[0]}' is not quantized (no activation quantizer "
                            "before this layer)", "input not quantized")
    a = attrs(node)
    w = g.const(q.input[0], q, "weight")
    alpha = beta_g = 1.0
    trans_b = False
    if op == "Conv":
        n_out, cshape, ch_axis = w.shape[0], (1, w.shape[0]) + (1,) * (w.ndim - 2), 1
        out_axis = 0
    elif op == "Gemm":
        if a.get("transA", 0):
            raise NoIntegerForm(f"{node_label(node)}: Gemm with transA=1", "Gemm transA")
        trans_b = bool(a.get("transB", 0))
        out_axis = 0 if trans_b else 1
        n_out, cshape, ch_axis = w.shape[out_axis], (w.shape[out_axis],), -1
        alpha, beta_g = float(a.get("alpha", 1.0)), float(a.get("beta", 1.0))
    else:
        if w.ndim != 2:
            raise NoIntegerForm(f"{node_label(node)}: MatMul with a {w.ndim}-D weight", "MatMul weight rank")
        out_axis, n_out, cshape, ch_axis = 1, w.shape[1], (w.shape[1],), -1
    codes = weight_codes(g, q, out_axis, n_out)
    bias = np.zeros(n_out)
    if len(node.input) > 2 and node.input[2]:
        bias = bias + beta_g * np.broadcast_to(as_vector(g.const(node.input[2], node, "bias")), (n_out,))
    scale = x.scale * codes.scale * alpha / (pooled.count if pooled else 1)
    out = node.output[0]
    nxt = g.only_consumer(out)
    folded = []
    if op == "MatMul" and nxt is not None and nxt.op_type == "Add":
        other = [i for i in nxt.input if i != out]
        if len(other) == 1 and other[0] in g.consts:
            bias = bias + np.broadcast_to(as_vector(g.consts[other[0]]), (n_out,))
            folded.append(nxt)
            out = nxt.output[0]
            nxt = g.only_consumer(out)
    if nxt is not None and nxt.op_type == "BatchNormalization" and nxt.input[0] == out:
        f, beta, mean = batchnorm_factors(g, nxt)
        scale = scale * f
        bias = f * (bias - mean) + beta
        folded.append(nxt)
        out = nxt.output[0]
    wk = codes.w_int.T if trans_b else codes.w_int
    u = codes.u.T if trans_b else codes.u
    layer = WeightedLayer(node, x, codes, wk, u, w.shape, n_out, scale, bias, cshape, ch_axis, out, pooled,
                          tuple(folded))
    value = low.fmt.weighted(low, layer)
    low.layers.append(layer)
    low.weight_params += int(w.size)
    low.weight_bits[q.name or wname] = codes.bits
    for n in folded:
        low.done.add(low.index(n))
    low.val[out] = value


def _pointwise_conv(node: onnx.NodeProto) -> bool:
    """A 1x1 Conv with no stride, padding, dilation or groups (squeeze-excitation's on the pooled mean): it commutes
    with the spatial sum."""
    a = attrs(node)
    return (a.get("group", 1) == 1 and all(k == 1 for k in a.get("kernel_shape", [1])) and
            all(p == 0 for p in a.get("pads", [0])) and all(s == 1 for s in a.get("strides", [1])) and
            all(d == 1 for d in a.get("dilations", [1])) and a.get("auto_pad", "NOTSET") in ("NOTSET", "VALID"))


HANDLERS = {"Conv": lower_weighted, "Gemm": lower_weighted, "MatMul": lower_weighted, "ConvTranspose": lower_weighted}
