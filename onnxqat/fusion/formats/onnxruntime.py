"""The ort format: the integer kernels onnxruntime's CPU provider runs fast (the default target of `fuse`).

onnxruntime's ConvInteger is about as slow as its float Conv and an int64 rescale chain costs ~10 elementwise ops per
quantizer; its QLinearConv / QGemm (int8 GEMM with the requantization fused) run at about half the float time. So:
- a weighted layer read by an activation quantizer (through its folded BatchNormalization and Relu/Clip) is one
  QLinearConv (Conv) or QGemm (Gemm/MatMul, com.microsoft) with an int32 bias and the quantizer's scale and zero
  point as output, plus a uint8 Clip when the quantizer's range is narrower than the uint8 saturation (4 bits);
- int8 weights are scaled by 2^k (the largest that keeps them in int8) so the int32 bias, rounded on the grid of
  the accumulator, errs by at most 2^-(k+1) of an accumulator step;
- AVX2 without VNNI sums pairs of u8 x s8 products in saturating int16: a layer whose codes reach x_max takes int8
  weights only while 2 x_max |w| <= 32767, else uint8 weights with zero point 128 (the u8u8 kernel widens first);
- a layer with a small reduction (C_in/group x kH x kW < 32: a 1-channel first conv) is a float Conv on the codes,
  exact while its accumulator stays below 2^24, as is a Gemm read through GlobalAveragePool (float ReduceSum of the
  codes, then MatMul); their requantization is float (Mul, Add, QuantizeLinear);
- a sum of two codes requantized (residual Add of quantized tensors) is one QLinearAdd, GlobalAveragePool of codes
  requantized one QLinearGlobalAveragePool; other sums a float rescale + QuantizeLinear.
The requantizations round in float32 like onnxruntime's kernels (half to even); the fake-quantized model rounds its own
float32 values: codes can differ where a value lies within float32 rounding of a tie (the self-check counts them).
The rescale option does not apply (always the float rescale of the kernels).
"""

from __future__ import annotations

from dataclasses import replace
from typing import TYPE_CHECKING

import numpy as np
from onnx import TensorProto

from onnxqat.fusion.formats.base import code_bounds
from onnxqat.fusion.formats.integer import IntegerFormat
from onnxqat.fusion.graph import attrs
from onnxqat.fusion.storage import emit_codes
from onnxqat.fusion.values import Acc, Codes, Pending, Pooled, WeightedLayer

if TYPE_CHECKING:
    from onnxqat.fusion.lowering import Lowerer

MS = "com.microsoft"
PAIR_SATURATION = 32767  # int16 sum of two u8 x s8 products (vpmaddubsw)
SMALL_REDUCTION = 32  # C_in/group x kH x kW below which a float conv on the codes beats QLinearConv
EXACT_FLOAT = 2 ** 24  # integers below this are exact in float32
CONV_ATTRS = ("auto_pad", "dilations", "group", "kernel_shape", "pads", "strides")


class OrtFormat(IntegerFormat):
    name = "ort"

    def __init__(self, rescale: str = "fixed-point"):
        super().__init__(rescale)
        self.float_tensors: set[str] = set()  # accumulators computed in float (exact integers)

    # ------------------------------------------------------------------ weighted layers
    def weighted(self, low: Lowerer, layer: WeightedLayer):
        if layer.pooled is not None or _reduction(layer) < SMALL_REDUCTION:
            acc = self.float_accumulator(low, layer)
            return acc if acc is not None else super().weighted(low, layer)
        return Pending(layer)

    def materialize(self, low: Lowerer, v):
        if not isinstance(v, Pending):
            return v
        acc = self.float_accumulator(low, v.layer) or super().weighted(low, v.layer)
        return replace(acc, clip=v.clip)

    def float_accumulator(self, low: Lowerer, layer: WeightedLayer) -> Acc | None:
        """The accumulator as exact integers in float32 (a float Conv/MatMul on the codes), or None when it could
        reach 2^24."""
        x, b = layer.x, low.b
        red = tuple(i for i in range(layer.wk.ndim) if i != _out_axis(layer))
        bound = float(np.max(np.sum(np.abs(layer.wk), axis=red))) * x.bound
        if layer.pooled is not None:
            bound *= layer.pooled.count
        if bound >= EXACT_FLOAT:
            return None
        base = layer.base
        xf = b.cast(x.name, TensorProto.FLOAT, f"{base}_xf")
        if x.zp:
            xf = b.op("Sub", [xf, b.const(f"{base}_xzp_f", np.array(x.zp, np.float32))], f"{base}_xc")
        w = self.weight_tensor(low, layer, TensorProto.FLOAT, np.ones(layer.n_out, np.int64))
        if layer.pooled is not None:
            xf = b.op("ReduceSum", [xf, b.const(f"{base}_pool_axes", np.array(layer.pooled.axes, np.int64))],
                      f"{base}_xsum", keepdims=0)
            acc = b.op("MatMul", [xf, w], f"{base}_acc_f")
        elif layer.node.op_type == "Conv":
            acc = b.op("Conv", [xf, w], f"{base}_acc_f", **_conv_attrs(layer))
        else:
            acc = b.op("MatMul", [xf, w], f"{base}_acc_f")
        self.float_tensors.add(acc)
        return Acc([(acc, layer.scale, bound)], layer.bias, layer.cshape, layer.ch_axis)

    def weight_tensor(self, low: Lowerer, layer: WeightedLayer, dtype: int, factor: np.ndarray, add: int = 0) -> str:
        """factor_o * W_int + add in the op's layout as `dtype`, stored as the quantizer's packed codes and computed in
        the graph from initializers only (onnxruntime folds it when the session starts)."""
        b, codes = low.b, layer.codes
        base = layer.base
        u = emit_codes(b, f"{base}_w", np.ascontiguousarray(layer.u), codes.bits)
        shape = _wshape(layer)
        mult = (factor * codes.mult).astype(np.int32).reshape(shape)
        offs = (factor * codes.offset + add).astype(np.int32).reshape(shape)
        w = b.op("Mul", [b.cast(u, TensorProto.INT32, f"{base}_w32"), b.const(f"{base}_w_mult", mult)], f"{base}_wm")
        w = b.op("Add", [w, b.const(f"{base}_w_offset", offs)], f"{base}_wo")
        return b.cast(w, dtype, f"{base}_weight")

    # ------------------------------------------------------------------ requantization
    def requantize_value(self, low: Lowerer, v, s_out: float, r: int, name: str, zp: int) -> Codes:
        if isinstance(v, Pending):
            c = self.qlinear_layer(low, v, s_out, r, name, zp)
            if c is not None:
                return c
            v = self.materialize(low, v)
        if isinstance(v, Codes):
            v = Acc([v.term()], v.offset(), (), 1, sources=(v,))
        if len(v.sources) == 2 and not np.isfinite(v.clip).any():
            return self._clip(low, self._qlinear_add(low, v.sources, s_out, name, zp), s_out, r, zp, v.clip, name)
        return self.float_requantize(low, v, s_out, r, name, zp)

    def requantize(self, low: Lowerer, v, s_out: float, r: int, name: str, zp: int = 0):
        if isinstance(v, Pooled) and not v.flat:
            return self._clip(low, self._qlinear_pool(low, v, s_out, name, zp), s_out, r, zp, (-np.inf, np.inf), name)
        return super().requantize(low, v, s_out, r, name, zp)

    def qlinear_layer(self, low: Lowerer, p: Pending, s_out: float, r: int, name: str, zp: int) -> Codes | None:
        """QLinearConv / QGemm writing the quantizer's codes; None where the layer does not fit their types."""
        layer, b = p.layer, low.b
        x, op = layer.x, layer.node.op_type
        if op != "Conv" and len(low.g.shape_of(layer.node.input[0]) or []) != 2:
            return None  # QGemm takes 2-D inputs
        mag = np.abs(layer.scale)
        if not np.all(mag > 0):
            return None
        sign = np.where(layer.scale < 0, -1, 1).astype(np.int64)
        wmax = int(np.max(np.abs(layer.wk))) if layer.wk.size else 0
        s8_limit = min(127, PAIR_SATURATION // (2 * max(x.r, 1)))
        signed = wmax <= s8_limit
        limit = s8_limit if signed else 127
        if wmax > limit or (not signed and int(np.min(layer.wk * sign.reshape(_wshape(layer)))) < -128):
            return None  # 8-bit DoReFa weights (2k - 255) fit neither int8 nor uint8 - 128
        red = tuple(i for i in range(layer.wk.ndim) if i != _out_axis(layer))
        bound = float(np.max(np.sum(np.abs(layer.wk), axis=red))) * x.bound
        k = 0
        while wmax and wmax << (k + 1) <= limit and bound * 2 ** (k + 1) < EXACT_FLOAT:
            k += 1
        unit = mag / 2 ** k  # real value of one accumulator step
        bias_q = np.round(layer.bias / unit)
        if np.max(np.abs(bias_q)) + bound * 2 ** k >= 2 ** 31:
            return None
        factor = sign << k
        wdtype = TensorProto.INT8 if signed else TensorProto.UINT8
        w = self.weight_tensor(low, layer, wdtype, factor, 0 if signed else 128)
        base = layer.base
        n = layer.n_out
        ins = [x.name, b.const(f"{base}_x_scale", np.array(x.scale, np.float32)),
               b.const(f"{base}_x_zp", np.array(x.zp, np.uint8)), w,
               b.const(f"{base}_w_scale", (unit / x.scale).astype(np.float32)),
               b.const(f"{base}_w_zp", np.zeros(n, np.int8) if signed else np.array(128, np.uint8))]
        y_scale = b.const(f"{name}_scale", np.array(s_out, np.float32))
        y_zp = b.const(f"{name}_zp", np.array(zp, np.uint8))
        bias = b.const(f"{base}_bias_i32", bias_q.astype(np.int32))
        if op == "Conv":
            y = b.op("QLinearConv", ins + [y_scale, y_zp, bias], f"{name}_qconv", **_conv_attrs(layer))
        else:
            y = b.op("QGemm", ins + [bias, y_scale, y_zp], f"{name}_qgemm", domain=MS)
        return self._clip(low, y, s_out, r, zp, p.clip, name)

    def float_requantize(self, low: Lowerer, v: Acc, s_out: float, r: int, name: str, zp: int) -> Codes:
        """round(sum_i t_i m_i + B) + zp, saturated: float Mul/Add per term, QuantizeLinear (scale 1, zero point zp)."""
        b = low.b
        n = max([t[1].size for t in v.terms] + [v.bias.size])
        cshape = v.cshape if n > 1 else ()
        y = None
        for k, (t, sc, _) in enumerate(v.terms):
            tf = t if t in self.float_tensors else b.cast(t, TensorProto.FLOAT, f"{name}_t{k}")
            m = np.broadcast_to(sc / s_out, (n,)).astype(np.float32)
            p = b.op("Mul", [tf, b.const(f"{name}_m{k}", m.reshape(cshape) if n > 1 else m[:1].reshape(()))],
                     f"{name}_p{k}")
            y = p if y is None else b.op("Add", [y, p], f"{name}_sum")
        bias = np.broadcast_to(v.bias / s_out, (n,)).astype(np.float32)
        if np.any(bias != 0):
            y = b.op("Add", [y, b.const(f"{name}_bias", bias.reshape(cshape) if n > 1 else bias[:1].reshape(()))],
                     f"{name}_biased")
        q = b.op("QuantizeLinear", [y, b.const(f"{name}_one", np.array(1, np.float32)),
                                    b.const(f"{name}_zp", np.array(zp, np.uint8))], f"{name}_q")
        return self._clip(low, q, s_out, r, zp, v.clip, name)

    def _qlinear_add(self, low: Lowerer, src: tuple, s_out: float, name: str, zp: int) -> str:
        b = low.b
        ins = []
        for k, c in enumerate(src):
            ins += [c.name, b.const(f"{name}_s{k}", np.array(c.scale, np.float32)),
                    b.const(f"{name}_z{k}", np.array(c.zp, np.uint8))]
        ins += [b.const(f"{name}_scale", np.array(s_out, np.float32)), b.const(f"{name}_zp", np.array(zp, np.uint8))]
        return b.op("QLinearAdd", ins, f"{name}_qadd", domain=MS)

    def _qlinear_pool(self, low: Lowerer, p: Pooled, s_out: float, name: str, zp: int) -> str:
        b, c = low.b, p.codes
        return b.op("QLinearGlobalAveragePool", [c.name, b.const(f"{name}_xs", np.array(c.scale, np.float32)),
                                                 b.const(f"{name}_xz", np.array(c.zp, np.uint8)),
                                                 b.const(f"{name}_scale", np.array(s_out, np.float32)),
                                                 b.const(f"{name}_zp", np.array(zp, np.uint8))],
                    f"{name}_qgap", domain=MS, channels_last=0)

    def _clip(self, low: Lowerer, y: str, s_out: float, r: int, zp: int, clip: tuple, name: str) -> Codes:
        """Codes saturated to uint8 by the kernel, narrowed to the quantizer's [lo, hi] by a uint8 Clip."""
        lo_u, hi_u = code_bounds(clip, s_out, r, zp)
        if (lo_u, hi_u) != (0, 255):
            b = low.b
            y = b.op("Clip", [y, b.const(f"{name}_lo", np.array(lo_u, np.uint8)),
                              b.const(f"{name}_hi", np.array(hi_u, np.uint8))], f"{name}_codes")
        return Codes(y, s_out, r, TensorProto.UINT8, zp)

    # ------------------------------------------------------------------ outputs
    def output_acc(self, low: Lowerer, v: Acc, name: str):
        """A float accumulator output: scale * acc + bias in float (the integer path handles int32 ones)."""
        if not any(t in self.float_tensors for t, _, _ in v.terms):
            return None
        return float_output(low, v, name, self.float_tensors)


def float_output(low: Lowerer, v: Acc, name: str, float_tensors: set) -> str:
    b = low.b
    n = max([t[1].size for t in v.terms] + [v.bias.size])
    cshape = v.cshape if n > 1 else ()
    y = None
    for k, (t, sc, _) in enumerate(v.terms):
        tf = t if t in float_tensors else b.cast(t, TensorProto.FLOAT, f"{name}_t{k}")
        s = np.broadcast_to(sc, (n,)).astype(np.float32)
        p = b.op("Mul", [tf, b.const(f"{name}_s{k}", s.reshape(cshape) if n > 1 else s[:1].reshape(()))],
                 f"{name}_p{k}")
        y = p if y is None else b.op("Add", [y, p], f"{name}_sum")
    bias = np.broadcast_to(v.bias, (n,)).astype(np.float32)
    return b.op("Add", [y, b.const(f"{name}_bias", bias.reshape(cshape) if n > 1 else bias[:1].reshape(()))],
                f"{name}_real")


def _out_axis(layer: WeightedLayer) -> int:
    return 0 if layer.node.op_type == "Conv" and layer.pooled is None else 1


def _wshape(layer: WeightedLayer) -> list:
    shape = [1] * layer.wk.ndim
    shape[_out_axis(layer)] = layer.n_out
    return shape


def _reduction(layer: WeightedLayer) -> int:
    return int(np.prod(layer.wk.shape)) // max(layer.n_out, 1)


def _conv_attrs(layer: WeightedLayer) -> dict:
    return {k: v for k, v in attrs(layer.node).items() if k in CONV_ATTRS}
