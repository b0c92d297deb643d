"""The ort format: the integer kernels onnxruntime's CPU provider runs fast (the default target of `fuse`).

onnxruntime's ConvInteger is about as slow as its float Conv and an int64 rescale chain costs ~10 elementwise ops per
quantizer; its QLinearConv / QGemm (int8 GEMM with the requantization fused) run at about half the float time. So:
- a weighted layer read by an activation quantizer (through its folded BatchNormalization and Relu/Clip) is one
  QLinearConv (Conv) or QGemm (Gemm/MatMul, com.microsoft) with an int32 bias and the quantizer's scale and zero
  point as output, plus a uint8 Clip when the quantizer's range is narrower than the uint8 saturation (4 bits);
- 8-bit weights as int8_weights.py decides (int8, or uint8 where AVX2's int16 pair sums could saturate; scaled by 2^k
  for a finer bias grid); negative per-channel scales (BatchNorm's negative gammas) stay in the weight scale, which
  both kernels accept; the int32 bias is rounded to that grid, so fuse first moves the QAT model's bias onto it
  (snap_bias.py) and the two compute the same;
- a dense convolution on fewer than 4 input channels (an image's first layer: QLinearConv is 2-5x slower than a float
  Conv there, measured; depthwise ones are fast) is a float Conv on the codes with the bias in its B input, exact while
  the accumulator stays below 2^24, as is a Gemm read through GlobalAveragePool (float ReduceSum of the codes, then
  Gemm), and any layer read by something else than a quantizer (a residual Add); one per-channel QuantizeLinear
  requantizes them;
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

from onnxqat.fusion.convert import acc_to_float
from onnxqat.fusion.formats.base import code_bounds
from onnxqat.fusion.formats.int8_weights import EXACT_FLOAT, accumulator_bound, int8_weights, out_axis
from onnxqat.fusion.formats.integer import IntegerFormat
from onnxqat.fusion.graph import attrs
from onnxqat.fusion.storage import emit_codes
from onnxqat.fusion.values import Acc, Codes, CodesProduct, Pending, Pooled, WeightedLayer

if TYPE_CHECKING:
    from onnxqat.fusion.lowering import Lowerer

MS = "com.microsoft"
# a dense QLinearConv on fewer input channels is slower than a float Conv (depthwise is not): bench/conv_lowering_sweep.py
MIN_QLINEAR_CHANNELS = 4
CONV_ATTRS = ("auto_pad", "dilations", "group", "kernel_shape", "pads", "strides")


class OrtFormat(IntegerFormat):
    name = "ort"

    def __init__(self, rescale: str = "fixed-point"):
        super().__init__(rescale)
        self.float_tensors: set[str] = set()  # accumulators computed in float (exact integers)
        self.qlinear_steps: dict[int, np.ndarray] = {}  # id(layer) -> its int32 bias grid, for the layers written so
        # float MaxPool outputs: their QuantizeLinear gets a per-axis scale even when all channels share it, because
        # onnxruntime's QDQ propagation moves a per-tensor QuantizeLinear above the MaxPool, which then runs on uint8
        # in NCHW, a scalar loop (ResNet-18's first pool, batch 64: 6.3 ms instead of 0.4 ms; measured on 1.32)
        self.pooled_floats: set[str] = set()

    # ------------------------------------------------------------------ weighted layers
    def weighted(self, low: Lowerer, layer: WeightedLayer):
        if layer.pooled is not None or _dense_with_few_channels(layer):
            acc = self.float_accumulator(low, layer)
            return acc if acc is not None else super().weighted(low, layer)
        return Pending(layer)

    def materialize(self, low: Lowerer, v):
        if not isinstance(v, Pending):
            return v
        if isinstance(v.layer, CodesProduct):
            acc = super().product(low, v.layer)
        else:
            acc = self.float_accumulator(low, v.layer) or super().weighted(low, v.layer)
        return replace(acc, clip=v.clip)

    def product(self, low: Lowerer, p: CodesProduct):
        """Deferred: one QLinearMul when a quantizer reads it, the int32 product otherwise."""
        if p.a.dtype != TensorProto.UINT8 or p.b.dtype != TensorProto.UINT8:
            return super().product(low, p)
        return Pending(p)

    def float_accumulator(self, low: Lowerer, layer: WeightedLayer) -> Acc | None:
        """The layer as a float Conv/MatMul on the codes with integer weights (signs of the per-channel scales folded
        in) and the bias in accumulator steps as its B input: the output is acc + bias/|scale|, acc exact while below
        2^24 (else None). Real value = |scale| * output."""
        x, b = layer.x, low.b
        bound = accumulator_bound(layer)
        mag = np.abs(layer.scale)
        if bound >= EXACT_FLOAT or not np.all(mag > 0):
            return None
        sign = np.where(layer.scale < 0, -1, 1).astype(np.int64)
        base = layer.base
        # Cast, not DequantizeLinear: onnxruntime's QDQ fusion would turn DequantizeLinear -> Conv -> QuantizeLinear
        # into a QLinearConv that refuses the per-channel output scale
        xf = b.cast(x.name, TensorProto.FLOAT, f"{base}_xf")
        if x.zp:
            xf = b.op("Sub", [xf, b.const(f"{base}_xzp_f", np.array(x.zp, np.float32))], f"{base}_xc")
        w = self.weight_tensor(low, layer, TensorProto.FLOAT, sign)
        bias = b.const(f"{base}_bias_acc", (layer.bias / mag).astype(np.float32))
        if layer.pooled is not None:
            xf = b.op("ReduceSum", [xf, b.const(f"{base}_pool_axes", np.array(layer.pooled.axes, np.int64))],
                      f"{base}_xsum", keepdims=0 if layer.pooled.flat else 1)
        if layer.node.op_type == "Conv":
            acc = b.op("Conv", [xf, w, bias], f"{base}_acc_f", **_conv_attrs(layer))
        elif len(low.g.shape_of(layer.node.input[0]) or []) == 2 or layer.pooled is not None:
            acc = b.op("Gemm", [xf, w, bias], f"{base}_acc_f")
        else:  # a MatMul on a [.., K] tensor (a transformer's tokens): Gemm takes 2-D only
            acc = b.op("Add", [b.op("MatMul", [xf, w], f"{base}_mm_f"), bias], f"{base}_acc_f")
        self.float_tensors.add(acc)
        return Acc([(acc, mag, bound)], np.zeros(1), layer.cshape, layer.ch_axis)

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
        if isinstance(v, Pending) and isinstance(v.layer, CodesProduct):
            return self._clip(low, self._qlinear_mul(low, v.layer, s_out, name, zp), s_out, r, zp, v.clip, name)
        if isinstance(v, Pending):
            c = self.qlinear_layer(low, v, s_out, r, name, zp)
            if c is not None:
                return c
            v = self.materialize(low, v)
        if isinstance(v, Codes):
            v = Acc([v.term()], v.offset(), (), 1, sources=(v,))
        if len(v.sources) == 2:  # a Relu/Clip between the sum and its quantizer: code bounds after the kernel
            return self._clip(low, self._qlinear_add(low, v.sources, s_out, name, zp), s_out, r, zp, v.clip, name)
        return self.float_requantize(low, v, s_out, r, name, zp)

    def quantize_node(self, low: Lowerer, node, v, s_out: float, r: int, zp: int) -> str:
        """A layer whose quantizer only feeds a MaxPool is pooled before the quantizer's last step, which then runs on
        4x fewer values: a float accumulator in float, requantized after (exact: the requantization is non-decreasing,
        positive per-channel scales: the float accumulator has the signs in its weights; MaxPool's padding is -inf);
        a QLinearConv on its uint8 output, clipped to the code range after (max and clip commute), which onnxruntime
        runs as an NHWC uint8 MaxPool (NhwcMaxPool) beside the NHWC QLinearConv: 0.62-0.94x the time of the clipped
        codes pooled as floats between two Casts (three conv -> pool layers of bench/conv_lowering_sweep.py's model,
        batch 1 and 64, measured against that previous lowering)."""
        pool = low.g.only_consumer(node.output[0])
        if pool is None or pool.op_type != "MaxPool" or len([o for o in pool.output if o]) != 1:
            return super().quantize_node(low, node, v, s_out, r, zp)
        out = pool.output[0]
        if isinstance(v, Pending) and isinstance(v.layer, WeightedLayer):
            y = self.qlinear_kernel(low, v, s_out, out, zp)
            if y is not None:
                y = low.b.op("MaxPool", [y], f"{out}_u8pool", **attrs(pool))
                low.val[out] = low.record(out, self._clip(low, y, s_out, r, zp, v.clip, out))
                low.done.add(low.index(pool))
                return out
        if (not isinstance(v, Acc) or len(v.terms) != 1 or v.terms[0][0] not in self.float_tensors
                or not np.all(v.terms[0][1] > 0)):
            return super().quantize_node(low, node, v, s_out, r, zp)
        t, sc, bound = v.terms[0]
        pooled = low.b.op("MaxPool", [t], f"{out}_acc_pool", **attrs(pool))
        self.float_tensors.add(pooled)
        self.pooled_floats.add(pooled)
        low.val[out] = low.record(out, self.requantize(low, replace(v, terms=[(pooled, sc, bound)]), s_out, r, out, zp))
        low.done.add(low.index(pool))
        return out

    def requantize(self, low: Lowerer, v, s_out: float, r: int, name: str, zp: int = 0):
        if isinstance(v, Pooled) and not v.flat:
            return self._clip(low, self._qlinear_pool(low, v, s_out, name, zp), s_out, r, zp, (-np.inf, np.inf), name)
        return super().requantize(low, v, s_out, r, name, zp)

    def bias_step(self, low: Lowerer, layer: WeightedLayer) -> np.ndarray | None:
        """The int32 bias grid of the layers written as QLinearConv / QGemm (the others add a float bias)."""
        return self.qlinear_steps.get(id(layer))

    def _qlinear_plan(self, low: Lowerer, layer: WeightedLayer, s_out: float):
        if layer.pooled is not None or _dense_with_few_channels(layer):
            return None
        if layer.node.op_type != "Conv" and len(low.g.shape_of(layer.node.input[0]) or []) != 2:
            return None  # QGemm takes 2-D inputs
        return int8_weights(layer, s_out)

    def qlinear_layer(self, low: Lowerer, p: Pending, s_out: float, r: int, name: str, zp: int) -> Codes | None:
        """QLinearConv / QGemm writing the quantizer's codes; None where the layer does not fit their types."""
        y = self.qlinear_kernel(low, p, s_out, name, zp)
        return None if y is None else self._clip(low, y, s_out, r, zp, p.clip, name)

    def qlinear_kernel(self, low: Lowerer, p: Pending, s_out: float, name: str, zp: int) -> str | None:
        """The QLinearConv / QGemm node's uint8 output (saturated to [0, 255], not yet to the code range)."""
        layer, b = p.layer, low.b
        x, op = layer.x, layer.node.op_type
        plan = self._qlinear_plan(low, layer, s_out)
        if plan is None:
            return None
        self.qlinear_steps[id(layer)] = plan.step
        unit, signed = plan.step, plan.signed  # negative per-channel scales (BatchNorm's negative gammas) work in
        bias_q = np.round(layer.bias / unit)  # QLinearConv and QGemm: the sign stays in the weight scale
        wdtype = TensorProto.INT8 if signed else TensorProto.UINT8
        w = self.weight_tensor(low, layer, wdtype, np.full(layer.n_out, 1 << plan.k, np.int64), 0 if signed else 128)
        base = layer.base
        n = layer.n_out
        ins = [x.name, b.const(f"{base}_x_scale", np.array(x.scale, np.float32)),
               b.const(f"{base}_x_zp", np.array(x.zp, np.uint8)), w,
               b.const(f"{base}_w_scale", (unit / x.scale).astype(np.float32)),
               b.const(f"{base}_w_zp", np.zeros(n, np.int8) if signed else np.full(n, 128, np.uint8))]
        y_scale = b.const(f"{name}_scale", np.array(s_out, np.float32))
        y_zp = b.const(f"{name}_zp", np.array(zp, np.uint8))
        bias = b.const(f"{base}_bias_i32", bias_q.astype(np.int32))
        if op == "Conv":
            return b.op("QLinearConv", ins + [y_scale, y_zp, bias], f"{name}_qconv", **_conv_attrs(layer))
        return b.op("QGemm", ins + [bias, y_scale, y_zp], f"{name}_qgemm", domain=MS)

    def float_requantize(self, low: Lowerer, v: Acc, s_out: float, r: int, name: str, zp: int) -> Codes:
        """round(sum_i t_i scale_i / s_out + bias / s_out) + zp, saturated to uint8, in float: every term in units of
        the first one (u, per channel: a float accumulator as it is, others by a per-channel DequantizeLinear), their
        sum, then one per-channel QuantizeLinear with scale s_out / u (which rounds half to even)."""
        b = low.b
        n = max([t[1].size for t in v.terms] + [v.bias.size])
        unit = np.broadcast_to(v.terms[0][1], (n,)).astype(np.float64)
        if not np.all(unit > 0):
            unit = np.full(n, float(np.max(np.abs(unit))) or 1.0)
        per_channel = n > 1 and (not np.all(unit == unit[0]) or v.terms[0][0] in self.pooled_floats)
        axis = v.axis if n > 1 else 1

        def vec(x: np.ndarray) -> np.ndarray:
            x = np.broadcast_to(x, (n,)).astype(np.float32)
            return x if per_channel else x[:1].reshape(())

        y = None
        for k, (t, sc, _) in enumerate(v.terms):
            rel = np.broadcast_to(sc, (n,)) / unit
            if t in self.float_tensors:
                p = t if np.all(rel == 1) else b.op("Mul", [t, b.const(f"{name}_m{k}", vec(rel).reshape(
                    v.cshape if per_channel else ()))], f"{name}_p{k}")
            elif np.all(rel > 0):  # (t - 0) * rel in one op; rel per channel needs DequantizeLinear's axis
                rel_c = np.broadcast_to(rel, (n,)).astype(np.float32)
                one_rel = np.all(rel_c == rel_c[0])
                p = b.op("DequantizeLinear", [t, b.const(f"{name}_m{k}", rel_c[:1].reshape(()) if one_rel else rel_c)],
                         f"{name}_p{k}", **({} if one_rel else {"axis": axis}))
            else:
                tf = b.cast(t, TensorProto.FLOAT, f"{name}_t{k}")
                p = b.op("Mul", [tf, b.const(f"{name}_m{k}", np.broadcast_to(rel, (n,)).astype(np.float32).reshape(
                    v.cshape if n > 1 else ()) if n > 1 else rel.astype(np.float32)[:1].reshape(()))], f"{name}_p{k}")
            y = p if y is None else b.op("Add", [y, p], f"{name}_sum")
        bias = np.broadcast_to(v.bias, (n,)) / unit
        if np.any(bias != 0):
            bshape = v.cshape if n > 1 else ()
            y = b.op("Add", [y, b.const(f"{name}_bias", bias.astype(np.float32).reshape(bshape) if n > 1
                                        else bias.astype(np.float32)[:1].reshape(()))], f"{name}_biased")
        ys = s_out / unit
        zps = np.full(n, zp, np.uint8) if per_channel else np.array(zp, np.uint8)  # per-axis scale: per-axis zero point
        q = b.op("QuantizeLinear", [y, b.const(f"{name}_scale", vec(ys)), b.const(f"{name}_zp", zps)],
                 f"{name}_q", **({"axis": axis} if per_channel else {}))
        return self._clip(low, q, s_out, r, zp, v.clip, name)

    def _qlinear_add(self, low: Lowerer, src: tuple, s_out: float, name: str, zp: int) -> str:
        return self._qlinear_binary(low, "QLinearAdd", src, s_out, name, zp)

    def _qlinear_binary(self, low: Lowerer, op: str, src: tuple, s_out: float, name: str, zp: int) -> str:
        b = low.b
        ins = []
        for k, c in enumerate(src):
            ins += [c.name, b.const(f"{name}_s{k}", np.array(c.scale, np.float32)),
                    b.const(f"{name}_z{k}", np.array(c.zp, np.uint8))]
        ins += [b.const(f"{name}_scale", np.array(s_out, np.float32)), b.const(f"{name}_zp", np.array(zp, np.uint8))]
        return b.op(op, ins, f"{name}_q{op[7:].lower()}", domain=MS)

    def _qlinear_mul(self, low: Lowerer, p: CodesProduct, s_out: float, name: str, zp: int) -> str:
        """round((a - za)(b - zb) * (sa sb / s_out)) + zp saturated to uint8: the int32 product times one float32
        ratio, rounded half to even (MLAS), the int format's requantization of the same product."""
        return self._qlinear_binary(low, "QLinearMul", (p.a, p.b), s_out, name, zp)

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

    def codes_op(self, low: Lowerer, op: str, inputs: list[str], name: str, attrs: dict) -> str:
        """MaxPool on uint8 is a scalar loop in onnxruntime (10-70x slower than its float MaxPool, measured on 1.32):
        pool the codes as floats (exact: small integers) and cast back."""
        if op != "MaxPool":
            return super().codes_op(low, op, inputs, name, attrs)
        b = low.b
        xf = b.cast(inputs[0], TensorProto.FLOAT, f"{name}_f")
        return b.cast(b.op("MaxPool", [xf] + inputs[1:], f"{name}_pool_f", **attrs), TensorProto.UINT8, name)

    # ------------------------------------------------------------------ elementwise functions (tables)
    def table_codes(self, low: Lowerer, t, q, name: str) -> str:
        """An LSQ quantizer of f(codes): DequantizeLinear, the model's own float ops, QuantizeLinear (round(y / s)
        + zp, saturated: LSQ's round(clip(y / s)) + zp) and the code bounds; onnxruntime's Gather, which the int
        format uses, costs ~9 ns an element (MobileNetV3-Small's HardSwish tables: 55 % of the time). SAT's codes
        (alpha * (k / R), not a DequantizeLinear) and SAT quantizers (R x / alpha) keep the table."""
        if t.replay is None or q.op_type != "LsqQuant":
            return super().table_codes(low, t, q, name)
        from onnxqat.fusion.ops.unary import emit_replay

        b = low.b
        y = emit_replay(low, t, name)
        u = b.op("QuantizeLinear", [y, b.const(f"{name}_scale", np.array(q.step, np.float32)),
                                    b.const(f"{name}_zp", np.array(q.zp, np.uint8))], f"{name}_q")
        if _within_codes(t.values, q):  # f of every input code lands inside the code range: no Clip
            return u
        return self._clip(low, u, q.s, q.r, q.zp, (-np.inf, np.inf), name).name

    def table_floats(self, low: Lowerer, t, name: str) -> str:
        if t.replay is None:
            return super().table_floats(low, t, name)
        from onnxqat.fusion.ops.unary import emit_replay

        return emit_replay(low, t, name)

    # ------------------------------------------------------------------ float values
    def moved_term(self, old: str, new: str) -> None:
        if old in self.float_tensors:
            self.float_tensors.add(new)

    def acc_to_float(self, low: Lowerer, v: Acc, name: str) -> str:
        return acc_to_float(low.b, v, name, self.float_tensors)

    def output_acc(self, low: Lowerer, v: Acc, name: str) -> str | None:
        """A float accumulator output: scale * acc + bias in float (int32 ones take the integer path)."""
        if not any(t in self.float_tensors for t, _, _ in v.terms):
            return None
        return self.acc_to_float(low, v, name)


def _within_codes(values: np.ndarray, q) -> bool:
    """Whether round(v / step) + zp lies in the quantizer's [0, r] for all the float32 values a table's codes map to,
    by a margin of 0.01 of a step (QuantizeLinear divides in float32; no rounding order can then cross a bound)."""
    y = values.astype(np.float64) / float(np.float32(q.step)) + q.zp
    return bool(np.all(np.isfinite(y)) and y.min() > -0.49 and y.max() < q.r + 0.49)


def _wshape(layer: WeightedLayer) -> list:
    shape = [1] * layer.wk.ndim
    shape[out_axis(layer)] = layer.n_out
    return shape


def _dense_with_few_channels(layer: WeightedLayer) -> bool:
    return (layer.node.op_type == "Conv" and layer.wk.shape[1] < MIN_QLINEAR_CHANNELS
            and int(attrs(layer.node).get("group", 1)) == 1)


def _conv_attrs(layer: WeightedLayer) -> dict:
    return {k: v for k, v in attrs(layer.node).items() if k in CONV_ATTRS}
