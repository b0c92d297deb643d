"""The integer accumulator of a weighted layer: acc = sum (u - z_in) W_int, exact in int32, by ConvInteger or
MatMulInteger on uint8 input codes and uint8 weight codes with a zero point.

W_int = mult (u_w - zp_w) + rem (weights.py): ConvInteger takes the stored codes scaled by mult with zero point
-offset while that fits uint8; else (8-bit DoReFa, 2k - 255 = 2(k - 127) - 1) the graph computes
mult acc(k, 127) + rem boxsum(x), the box sum by a ConvInteger with all-one weights. A Gemm/MatMul on a pooled input
runs as a 1x1 ConvInteger on the codes and sums over the pooled axes afterwards. A layer whose accumulator could
overflow int32 is refused.
"""

from __future__ import annotations

import numpy as np
import onnx
from onnx import TensorProto

from onnxqat.errors import FuseError
from onnxqat.fusion.builder import GraphBuilder
from onnxqat.fusion.graph import attrs, node_label
from onnxqat.fusion.storage import emit_codes, emit_scaled_codes
from onnxqat.fusion.values import Codes, Pooled
from onnxqat.fusion.weights import WeightCodes


def integer_accumulator(b: GraphBuilder, node: onnx.NodeProto, x: Codes, codes: WeightCodes, u: np.ndarray,
                        wk: np.ndarray, w_shape: tuple, n_out: int, pooled: Pooled | None,
                        base: str) -> tuple[str, float]:
    """(int32 accumulator tensor, bound on its magnitude); u and wk are the stored codes and W_int in the op's layout."""
    op = node.op_type
    a = attrs(node)
    zp_x = b.const(f"{base}_x_zp", np.array(x.zp, np.uint8))
    umax = (1 << codes.bits) - 1
    if codes.mult * umax <= 255 and 0 <= -codes.offset <= 255:
        wt = emit_scaled_codes(b, f"{base}_w", np.ascontiguousarray(u), codes.bits, codes.mult)
        zp, rem, mult = -codes.offset, 0, 1
    else:  # W_int = mult*(u - zp) + rem, rem in (-mult, 0]
        wt = emit_codes(b, f"{base}_w", np.ascontiguousarray(u), codes.bits)
        mult = codes.mult
        zp = (-codes.offset) // mult
        rem = codes.offset + mult * zp
    zp_w = b.const(f"{base}_w_zp", np.array(zp, np.uint8))
    if pooled is not None:  # weights [K, N] -> a 1x1 convolution [N, K, 1, 1]
        k1 = [1] * len(pooled.axes)
        wt = b.op("Reshape", [b.op("Transpose", [wt], f"{base}_wT", perm=[1, 0]),
                              b.const(f"{base}_w1x1", np.array([n_out, -1] + k1, np.int64))], f"{base}_w_1x1")
        acc = b.op("ConvInteger", [x.name, wt, zp_x, zp_w], f"{base}_acc_map")
        acc = b.op("ReduceSum", [acc, b.const(f"{base}_pool_axes", np.array(pooled.axes, np.int64))], f"{base}_acc",
                   keepdims=0)
    elif op == "Conv":
        conv_attrs = {k: v for k, v in a.items() if k in ("auto_pad", "dilations", "group", "kernel_shape", "pads", "strides")}
        acc = b.op("ConvInteger", [x.name, wt, zp_x, zp_w], f"{base}_acc", **conv_attrs)
    else:
        acc = b.op("MatMulInteger", [x.name, wt, zp_x, zp_w], f"{base}_acc")
    if mult != 1:
        acc = b.op("Mul", [acc, b.const(f"{base}_m", np.array(mult, np.int32))], f"{base}_accm")
    if rem != 0:
        if pooled is not None:
            box = b.op("ReduceSum", [b.cast(x.name, TensorProto.INT32, f"{base}_x32"),
                                     b.const(f"{base}_box_axes", np.array([1] + pooled.axes, np.int64))],
                       f"{base}_box", keepdims=0)
            if x.zp:
                raise FuseError(f"{node_label(node)}: 8-bit DoReFa weights after a pooled input with a zero point")
            box = b.op("Unsqueeze", [box, b.const(f"{base}_box_ax1", np.array([1], np.int64))], f"{base}_box2")
        elif op == "Conv":
            grp = int(a.get("group", 1))
            ones_shape = (1,) + w_shape[1:] if grp == 1 else w_shape
            ones = b.const(f"{base}_ones", np.ones(ones_shape, np.uint8))
            zero = b.const(f"{base}_ones_zp", np.array(0, np.uint8))
            box = b.op("ConvInteger", [x.name, ones, zp_x, zero], f"{base}_box", **conv_attrs)
        else:
            x32 = b.cast(x.name, TensorProto.INT32, f"{base}_x32")
            if x.zp:
                x32 = b.op("Sub", [x32, b.const(f"{base}_xzp32", np.array(x.zp, np.int32))], f"{base}_xc")
            box = b.op("ReduceSum", [x32, b.const(f"{base}_ax", np.array([-1], np.int64))], f"{base}_box", keepdims=1)
        box = b.op("Mul", [box, b.const(f"{base}_rem", np.array(rem, np.int32))], f"{base}_boxm")
        acc = b.op("Add", [acc, box], f"{base}_accw")
    red = tuple(i for i in range(wk.ndim) if i != (0 if op == "Conv" else 1))
    bound = float(np.max(np.sum(np.abs(wk), axis=red))) * x.bound * (pooled.count if pooled else 1)
    if bound > 2**31 - 1:
        raise FuseError(f"{node_label(node)}: its int32 accumulator could overflow (bound {bound:.3g})")
    return acc, bound
