"""The integer format (bit-exact, integer ops only; for hardware targets and N2D2's IntegerOnly).

The integer accumulator of a weighted layer: acc = sum (u - z_in) W_int, exact in int32, by ConvInteger or
MatMulInteger on uint8 input codes and uint8 weight codes with a zero point.

W_int = mult (u_w - zp_w) + rem (weights.py): ConvInteger takes the stored codes scaled by mult with zero point
-offset while that fits uint8; else (8-bit DoReFa, 2k - 255 = 2(k - 127) - 1) the graph computes
mult acc(k, 127) + rem boxsum(x), the box sum by a ConvInteger with all-one weights. A Gemm/MatMul on a pooled input
runs as a 1x1 ConvInteger on the codes and sums over the pooled axes afterwards. A layer whose accumulator could
overflow int32 is refused.

Requantization of an accumulator (or a sum of them, or codes) to the next quantizer's codes: a fixed-point multiplier
per channel and a rounding right shift that rounds half to even (rescale="fixed-point"), or a float multiply and ONNX
Round (rescale="float", N2D2's default). README.md "The math" has the derivation.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

import numpy as np
import onnx
from onnx import TensorProto

from onnxqat.errors import FuseError
from onnxqat.fusion.builder import GraphBuilder
from onnxqat.fusion.formats.base import Format, code_bounds
from onnxqat.fusion.graph import attrs, node_label
from onnxqat.fusion.storage import emit_codes, emit_scaled_codes
from onnxqat.fusion.values import Acc, Codes, Pooled, WeightedLayer
from onnxqat.fusion.weights import WeightCodes

if TYPE_CHECKING:
    from onnxqat.fusion.lowering import Lowerer

PRECISION_BITS = 28  # fixed-point multipliers are < 2**28


class IntegerFormat(Format):
    name = "int"

    def weighted(self, low: Lowerer, layer: WeightedLayer) -> Acc:
        acc, bound = integer_accumulator(low.b, layer.node, layer.x, layer.codes, layer.u, layer.wk, layer.w_shape,
                                         layer.n_out, layer.pooled, layer.base)
        return Acc([(acc, layer.scale, bound)], layer.bias, layer.cshape, layer.ch_axis)

    def requantize_value(self, low: Lowerer, v, s_out: float, r: int, name: str, zp: int) -> Codes:
        return requantize_integer(low.b, v, s_out, r, name, zp, self.rescale)


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
    if pooled is not None:  # Gemm weights [K, N] -> a 1x1 convolution [N, K, 1, 1]; a 1x1 Conv's are one already
        if op != "Conv":
            k1 = [1] * len(pooled.axes)
            wt = b.op("Reshape", [b.op("Transpose", [wt], f"{base}_wT", perm=[1, 0]),
                                  b.const(f"{base}_w1x1", np.array([n_out, -1] + k1, np.int64))], f"{base}_w_1x1")
        acc = b.op("ConvInteger", [x.name, wt, zp_x, zp_w], f"{base}_acc_map")
        acc = b.op("ReduceSum", [acc, b.const(f"{base}_pool_axes", np.array(pooled.axes, np.int64))], f"{base}_acc",
                   keepdims=0 if pooled.flat else 1)
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
                       f"{base}_box", keepdims=0 if pooled.flat else 1)
            if x.zp:
                raise FuseError(f"{node_label(node)}: 8-bit DoReFa weights after a pooled input with a zero point")
            if pooled.flat:
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
    red = tuple(i for i in range(wk.ndim) if i != (0 if op == "Conv" else 1))  # (a pooled Conv's too)
    bound = float(np.max(np.sum(np.abs(wk), axis=red))) * x.bound * (pooled.count if pooled else 1)
    if bound > 2**31 - 1:
        raise FuseError(f"{node_label(node)}: its int32 accumulator could overflow (bound {bound:.3g})")
    return acc, bound


def requantize_integer(b: GraphBuilder, v: Acc | Codes, s_out: float, r: int, name: str, zp: int = 0,
                       rescale: str = "fixed-point") -> Codes:
    """The integer format's requantization of an accumulator (or a sum of terms, or codes) to uint8 codes."""
    lo_u, hi_u = code_bounds(v.clip if isinstance(v, Acc) else (-np.inf, np.inf), s_out, r, zp)
    if isinstance(v, Codes):
        v = Acc([v.term()], v.offset(), (), 1)
    n = max([t[1].size for t in v.terms] + [v.bias.size])
    cshape = v.cshape if n > 1 else ()
    a = [np.broadcast_to(t[1], (n,)) / s_out for t in v.terms]
    bq = np.broadcast_to(v.bias, (n,)) / s_out + zp
    if rescale == "float":
        return _float_rescale(b, v, a, bq, cshape, s_out, r, name, zp, lo_u, hi_u)
    return _fixed_point(b, v, a, bq, cshape, s_out, r, name, zp, lo_u, hi_u)


def _float_rescale(b: GraphBuilder, v: Acc, a: list, bq: np.ndarray, cshape: tuple, s_out: float, r: int, name: str,
                   zp: int, lo_u: int, hi_u: int) -> Codes:
    y = None
    for (t, _, _), ai in zip(v.terms, a):
        tf = b.cast(t, TensorProto.FLOAT, f"{name}_f")
        p = b.op("Mul", [tf, b.const(f"{name}_mult", ai.astype(np.float32).reshape(cshape))], f"{name}_scaled")
        y = p if y is None else b.op("Add", [y, p], f"{name}_sum")
    # Round (half to even) before an odd zero point is added: code = round(v / s_out) + zp
    zo = zp % 2
    y = b.op("Add", [y, b.const(f"{name}_bias", (bq - zo).astype(np.float32).reshape(cshape))], f"{name}_biased")
    y = b.op("Round", [y], f"{name}_round")
    if zo:
        y = b.op("Add", [y, b.const(f"{name}_zp_odd", np.array(zo, np.float32))], f"{name}_zp")
    y = b.op("Clip", [y, b.const(f"{name}_lo", np.array(lo_u, np.float32)),
                      b.const(f"{name}_hi", np.array(hi_u, np.float32))], f"{name}_clip")
    return Codes(b.cast(y, TensorProto.UINT8, f"{name}_codes"), s_out, r, TensorProto.UINT8, zp)


def _fixed_point(b: GraphBuilder, v: Acc, a: list, bq: np.ndarray, cshape: tuple, s_out: float, r: int, name: str,
                 zp: int, lo_u: int, hi_u: int) -> Codes:
    # fixed point: u = clip(rne(x / 2^sh), lo, hi) with x = sum t_i*m_i + B (zp included), per channel sh >= 1;
    # rne = round half to even, like the quantizers' np.round. With h = 2^(sh-1) and y = x + h:
    # rne(x / 2^sh) = (y - bit_sh(y)) >> sh, bit_sh(y) = floor(y / 2^sh) mod 2 (y >= 0; README.md "Rounding").
    # The code is c + zp: with an odd zp the tie goes to an even c = an odd u, so bit_sh is inverted there.
    amax = np.max(np.abs(np.stack(a)), axis=0)
    sh_max = 62 - math.ceil(math.log2(r + 1)) - 1
    with np.errstate(divide="ignore"):
        sh = np.where(amax > 0, np.floor(PRECISION_BITS - 1 - np.log2(np.where(amax > 0, amax, 1))), 0)
    sh = np.clip(sh, 1, sh_max).astype(np.int64)  # sh >= 1: the half 2^(sh-1) is an integer
    if sh.size > 1 and sh.max() - sh.min() <= 7:  # one shift for the layer: every multiplier keeps >= 20 bits
        sh = np.full_like(sh, sh.min())
    p2 = np.ldexp(1.0, sh)
    m = [np.round(ai * p2).astype(np.int64) for ai in a]
    lim = float(2 ** 61)
    # B' = round(b*2^sh) + 2^(sh-1): the bias with the half of the rounding shift folded in
    bias_fp = np.clip(np.round(bq * p2) + np.ldexp(0.5, sh), -lim, lim).astype(np.int64)
    half = np.int64(1) << (sh - 1)
    # x clipped to [lo 2^sh, hi 2^sh] (y to that + h): the same as clipping the rounded code to [lo, hi]
    hi = (hi_u << sh) + half
    lo = (lo_u << sh) + half
    shape_sh = cshape if np.any(sh != sh.flat[0]) else ()
    sh_c, hi_c, lo_c = (sh, hi, lo) if shape_sh else (sh[:1], hi[:1], lo[:1])
    y = None
    for k, ((t, _, _), mk) in enumerate(zip(v.terms, m)):
        t64 = b.cast(t, TensorProto.INT64, f"{name}_t{k}")
        p = b.op("Mul", [t64, b.const(f"{name}_m{k}", mk.reshape(cshape))], f"{name}_p{k}")
        y = p if y is None else b.op("Add", [y, p], f"{name}_sum")
    y = b.op("Add", [y, b.const(f"{name}_bias", bias_fp.reshape(cshape))], f"{name}_biased")
    lo_t = b.const(f"{name}_lo", lo_c.reshape(shape_sh).astype(np.int64))
    hi_t = b.const(f"{name}_hi", hi_c.reshape(shape_sh).astype(np.int64))
    if shape_sh:  # per-channel upper bounds: Clip takes scalars only
        y = b.op("Min", [b.op("Max", [y, lo_t], f"{name}_relu"), hi_t], f"{name}_sat")
    else:
        y = b.op("Clip", [y, lo_t, hi_t], f"{name}_sat")
    # ties to even, in int64: BitwiseAnd with 2^sh gives 0 or 2^sh, Min with 1 makes it bit_sh(y); y - bit_sh(y)
    shift_t = b.const(f"{name}_shift", sh_c.reshape(shape_sh).astype(np.uint64))
    if shape_sh:  # per-channel 2^sh computed from the shifts (initializers only: onnxruntime folds it), not stored
        one = b.const(f"{name}_one_u64", np.array(1, np.uint64))
        bit_t = b.cast(b.op("BitShift", [one, shift_t], f"{name}_pow2", direction="LEFT"), TensorProto.INT64,
                       f"{name}_bit")
    else:
        bit_t = b.const(f"{name}_bit", (np.int64(1) << sh_c).reshape(shape_sh))
    par = b.op("BitwiseXor", [y, bit_t], f"{name}_flip") if zp % 2 else y
    bit = b.op("Min", [b.op("BitwiseAnd", [par, bit_t], f"{name}_par"),
                       b.const(f"{name}_one", np.array(1, np.int64))], f"{name}_odd")
    y = b.op("Sub", [y, bit], f"{name}_rne")
    y = b.cast(y, TensorProto.UINT64, f"{name}_u64")
    y = b.op("BitShift", [y, shift_t], f"{name}_shr", direction="RIGHT")
    return Codes(b.cast(y, TensorProto.UINT8, f"{name}_codes"), s_out, r, TensorProto.UINT8, zp)
