"""Activation quantizers: a value (accumulator, codes, pooled sum, float) -> codes
u = clip(round(v / s_out) + zp, lo, hi).

Integer format: a fixed-point multiplier per channel and a rounding right shift that rounds half to even
(rescale="fixed-point"), or a float multiply and ONNX Round (rescale="float", N2D2's default). QDQ format, and a float
tensor in the integer format (after a node kept in float): a float Clip + QuantizeLinear.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

import numpy as np
import onnx
from onnx import TensorProto

from onnxqat.errors import FuseError
from onnxqat.fusion.builder import GraphBuilder
from onnxqat.fusion.float_islands import dequantize, to_float
from onnxqat.fusion.graph import check_range, node_label
from onnxqat.fusion.lower_pooling import acc_of_pooled
from onnxqat.fusion.values import Acc, Codes, Float, Pooled

if TYPE_CHECKING:
    from onnxqat.fusion.lower import Lowerer

PRECISION_BITS = 28  # fixed-point multipliers are < 2**28


def lower_activation_quantizer(low: Lowerer, node: onnx.NodeProto) -> None:
    """SatActQuant (step alpha/R) or LsqQuant on an activation (step s; signed: codes c + (R+1)/2)."""
    g = low.g
    out = node.output[0]
    if node.op_type == "SatActQuant":
        alpha = abs(g.scalar(node, 1, "alpha"))
        r = check_range(node, g.scalar(node, 2, "range"), max_r=255)
        if not alpha > 0:
            raise FuseError(f"{node_label(node)}: alpha is 0")
        low.val[out] = low.record(out, requantize(low, low.get(node.input[0], node), alpha / r, r, out))
        return
    r = check_range(node, g.scalar(node, 2, "range"), max_r=255)
    zp = (r + 1) // 2 if int(g.scalar(node, 3, "signed")) else 0  # signed codes [-(R+1)/2, (R-1)/2] as u - zp
    step = g.const(node.input[1], node, "step")
    if step.size != 1:
        raise FuseError(f"{node_label(node)}: per-channel step on an activation is not supported")
    s = float(step.reshape(-1)[0])
    if not s > 0:
        raise FuseError(f"{node_label(node)}: step must be > 0, is {s:g}")
    low.val[out] = low.record(out, requantize(low, low.get(node.input[0], node), s, r, out, zp))


def code_bounds(clip: tuple, s_out: float, r: int, zp: int) -> tuple[int, int]:
    """[lo, hi] of the codes: [0, r], narrowed by a Relu/Clip folded into the quantizer."""
    lo_u = 0 if not np.isfinite(clip[0]) else int(min(r, max(0, np.round(clip[0] / s_out) + zp)))
    hi_u = r if not np.isfinite(clip[1]) else int(max(lo_u, min(r, np.round(clip[1] / s_out) + zp)))
    return lo_u, hi_u


def requantize(low: Lowerer, v, s_out: float, r: int, name: str, zp: int = 0):
    """u = clip(round(v / s_out) + zp, 0, r) (and within a folded Relu/Clip of v)."""
    b = low.b
    if isinstance(v, Pooled):
        v = acc_of_pooled(b, v, f"{name}_pool")
    if low.format == "qdq" or isinstance(v, Float):
        lo_u, hi_u = code_bounds(v.clip if isinstance(v, Acc) else (-np.inf, np.inf), s_out, r, zp)
        xf = to_float(low, v)
        lo = b.const(f"{name}_lo", np.array((lo_u - zp) * s_out, np.float32))
        hi = b.const(f"{name}_hi", np.array((hi_u - zp) * s_out, np.float32))
        y = b.op("Clip", [xf, lo, hi], f"{name}_clip")
        # uint8 codes with zero point zp (onnxruntime's QDQ default; its QDQ propagation mishandles int8 codes)
        s = b.const(f"{name}_scale", np.array(s_out, np.float32))
        zq = b.const(f"{name}_zp", np.array(zp, np.uint8))
        q = b.op("QuantizeLinear", [y, s, zq], f"{name}_codes")
        if low.format == "qdq":
            c = Codes(q, s_out, r, TensorProto.UINT8, zp)
            return Float(dequantize(b, c), grid=c)
        return Codes(q, s_out, r, TensorProto.UINT8, zp)
    return requantize_integer(b, v, s_out, r, name, zp, low.rescale)


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
