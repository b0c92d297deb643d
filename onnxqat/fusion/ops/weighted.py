"""Conv / Gemm / MatMul with a weight quantizer: the weight codes and the layer's real scale and bias per output
channel, with a following bias Add (MatMul) and BatchNormalization folded in; the format writes the layer
(low.fmt.weighted: an integer accumulator, a QLinear op, or a float op on dequantized weights).

Per output channel o, input codes with scale s_in: pre-activation real value = scale_o acc + bias_o with
scale_o = s_in s_w,o c_o (Gemm alpha; c_o SAT's restore_scale, 1 without), bias_o = b_o (Gemm beta);
BatchNormalization: scale_o <- f scale_o, bias_o <- f (bias_o - mean) + beta (f < 0 needs no special case: the
multiplier is a signed int64).
"""

from __future__ import annotations

from dataclasses import replace
from typing import TYPE_CHECKING

import numpy as np
import onnx

from onnxqat.fusion.convert import to_codes
from onnxqat.fusion.graph import NoIntegerForm, attrs, node_label
from onnxqat.fusion.ops.arithmetic import activation_matmul
from onnxqat.fusion.ops.batchnorm import batchnorm_factors
from onnxqat.fusion.values import Codes, Float, Pooled, WeightedLayer, as_vector
from onnxqat.fusion.weights import weight_codes
from onnxqat.ops.schema import DOMAIN

if TYPE_CHECKING:
    from onnxqat.fusion.lowering import Lowerer


def lower_weighted(low: Lowerer, node: onnx.NodeProto) -> None:
    g = low.g
    op = node.op_type
    wname = node.input[1]
    q, restore = g.weight_restore.get(wname, (g.producer.get(wname), None))
    if op == "MatMul" and wname not in g.consts and (q is None or q.domain != DOMAIN or q.op_type == "LsqQuant"
                                                     and q.input[0] not in g.consts):
        return activation_matmul(low, node)
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
    w = g.const(q.input[0], q, "weight")
    transposed = None
    if op == "ConvTranspose":  # the equivalent Conv on the zero-inserted codes (its weights transformed below)
        node, x, transposed = as_conv(low, node, x, w)
        op = "Conv"
    a = attrs(node)
    alpha = beta_g = 1.0
    trans_b = False
    if transposed is not None:  # ConvTranspose weights [C_in, C_out, kH, kW]: output channels on axis 1
        n_out, cshape, ch_axis = w.shape[1], (1, w.shape[1]) + (1,) * (w.ndim - 2), 1
        out_axis = 1
    elif op == "Conv":
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
    if restore is not None:
        codes = replace(codes, scale=codes.scale * _channel_values(node, restore, w.shape, out_axis, n_out))
    if transposed is not None:  # Conv weights [C_out, C_in, kH, kW], the kernel flipped
        flip = (slice(None), slice(None)) + (slice(None, None, -1),) * (w.ndim - 2)
        codes = replace(codes, w_int=np.ascontiguousarray(codes.w_int.swapaxes(0, 1)[flip]),
                        u=np.ascontiguousarray(codes.u.swapaxes(0, 1)[flip]))
        w = w.swapaxes(0, 1)
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


def _channel_values(node: onnx.NodeProto, c: np.ndarray, shape: tuple, out_axis: int, n_out: int) -> np.ndarray:
    """The restore_scale constant (broadcast against the weight) as one value per output channel; a constant that varies
    along another axis has no per-channel form."""
    full = np.moveaxis(np.broadcast_to(np.asarray(c, np.float64), shape), out_axis, 0).reshape(n_out, -1)
    if full.size and np.any(full != full[:, :1]):
        raise NoIntegerForm(f"{node_label(node)}: weight restore_scale is not one value per output channel",
                            "restore_scale shape")
    return full[:, 0] if full.size else np.ones(n_out)


def as_conv(low: Lowerer, node: onnx.NodeProto, x: Codes, w: np.ndarray) -> tuple[onnx.NodeProto, Codes, bool]:
    """ConvTranspose (stride s, pads p, output_padding o, kernel k) = Conv (stride 1, the kernel flipped, in/out
    channels swapped) of the input with s - 1 zeros inserted between pixels, padded by k - 1 - p at the start and
    k - 1 - p + o at the end. The zeros are the code of 0 (zp), inserted by a Pad of [N, C, H, 1, W, 1] to
    [N, C, H, s, W, s] and a Reshape (uint8 Pad runs everywhere; onnxruntime 1.19.2 has no uint8 DepthToSpace): each
    pixel lands at (i*s, j*s), with s - 1 zero rows/columns after the last one too, which the end padding takes back
    (or a Slice, where it is shorter). Exact: the same integer sums."""
    a = attrs(node)
    k = list(a.get("kernel_shape", w.shape[2:]))
    s = list(a.get("strides", [1] * len(k)))
    p = list(a.get("pads", [0] * 2 * len(k)))
    op = list(a.get("output_padding", [0] * len(k)))
    if (len(k) != 2 or int(a.get("group", 1)) != 1 or any(d != 1 for d in a.get("dilations", [1]))
            or a.get("auto_pad", "NOTSET") != "NOTSET" or "output_shape" in a or s[0] != s[1]):
        raise NoIntegerForm(f"{node_label(node)}: ConvTranspose with groups, dilations, auto_pad, output_shape or "
                            "unequal strides", "ConvTranspose form")
    b, st = low.b, s[0]
    base = node.name or node.output[0]
    xu = x.name
    if st > 1:
        dims = low.g.shape_of(node.input[0])
        if not dims or len(dims) != 4 or any(d is None for d in dims[1:]):
            raise NoIntegerForm(f"{node_label(node)}: input shape unknown (zero insertion needs it)",
                                "ConvTranspose of a dynamic shape")
        _, c, h, wd = dims
        x6 = b.op("Reshape", [x.name, b.const(f"{base}_x6", np.array([0, c, h, 1, wd, 1], np.int64))], f"{base}_x6")
        pads6 = np.array([0, 0, 0, 0, 0, 0, 0, 0, 0, st - 1, 0, st - 1], np.int64)
        x6 = b.op("Pad", [x6, b.const(f"{base}_zpads", pads6), b.const(f"{base}_zp_fill", np.array(x.zp, np.uint8))],
                  f"{base}_x6z")
        xu = b.op("Reshape", [x6, b.const(f"{base}_xup_shape", np.array([0, c, h * st, wd * st], np.int64))],
                  f"{base}_xup")
    begin = [kk - 1 - pp for kk, pp in zip(k, p[:2])]
    end = [kk - 1 - pp + oo - (st - 1) for kk, pp, oo in zip(k, p[2:], op)]
    if min(begin) < 0:
        raise NoIntegerForm(f"{node_label(node)}: ConvTranspose pads larger than its kernel", "ConvTranspose form")
    if min(end) < 0:  # crop the extra zero rows/columns the padding cannot take back
        xu = b.op("Slice", [xu, b.const(f"{base}_crop0", np.array([0, 0], np.int64)),
                            b.const(f"{base}_crop1", np.array([e if e < 0 else np.iinfo(np.int64).max for e in end],
                                                              np.int64)),
                            b.const(f"{base}_crop_axes", np.array([2, 3], np.int64))], f"{base}_xcrop")
        end = [max(e, 0) for e in end]
    conv = onnx.helper.make_node("Conv", [xu, node.input[1]] + list(node.input[2:]), list(node.output),
                                 name=node.name, kernel_shape=k, pads=begin + end, strides=[1, 1])
    return conv, replace(x, name=xu), True


def _pointwise_conv(node: onnx.NodeProto) -> bool:
    """A 1x1 Conv with no stride, padding, dilation or groups (squeeze-excitation's on the pooled mean): it commutes
    with the spatial sum."""
    a = attrs(node)
    return (a.get("group", 1) == 1 and all(k == 1 for k in a.get("kernel_shape", [1])) and
            all(p == 0 for p in a.get("pads", [0])) and all(s == 1 for s in a.get("strides", [1])) and
            all(d == 1 for d in a.get("dilations", [1])) and a.get("auto_pad", "NOTSET") in ("NOTSET", "VALID"))


HANDLERS = {"Conv": lower_weighted, "Gemm": lower_weighted, "MatMul": lower_weighted, "ConvTranspose": lower_weighted}
