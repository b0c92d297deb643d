"""The QDQ format: QuantizeLinear/DequantizeLinear pairs around float ops (portable: any runtime with QDQ support).

Every activation quantizer becomes Clip + QuantizeLinear + DequantizeLinear; sums, pooling and shape ops run on the
dequantized floats. The weighted layer: DequantizeLinear(x) -> float Conv / MatMul + Add on DequantizeLinear(W_int) with the
BatchNorm factor folded into the per-channel weight scale, and a float bias (BN folded).

Weights int8 (int8_weights.py: what onnxruntime's QDQ fusion into QLinearConv/QGemm takes), int16 for 8-bit DoReFa.
The fusion adds the bias as int32 in accumulator steps: fuse moves the QAT model's bias onto that grid first
(snap_bias.py, through bias_step).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np
from onnx import TensorProto

from onnxqat.fusion.builder import GraphBuilder
from onnxqat.fusion.convert import dequantize, to_float
from onnxqat.fusion.formats.base import Format, code_bounds, dequantized, quantize_float
from onnxqat.fusion.formats.int8_weights import int8_weights, reading_quantizer_step
from onnxqat.fusion.graph import attrs
from onnxqat.fusion.values import Acc, Codes, Float, Pooled, WeightedLayer

if TYPE_CHECKING:
    from onnxqat.fusion.lowering import Lowerer


class QdqFormat(Format):
    name = "qdq"
    float_arithmetic = True
    input_type = "float"

    def weighted(self, low: Lowerer, layer: WeightedLayer) -> Float:
        return Float(qdq_layer(low.b, layer, reading_quantizer_step(low, layer)), unit=(layer.scale, layer.ch_axis))

    def bias_step(self, low: Lowerer, layer: WeightedLayer) -> np.ndarray | None:
        s_out = reading_quantizer_step(low, layer)
        plan = int8_weights(layer, s_out) if s_out is not None else None
        return None if plan is None else plan.step

    def requantize(self, low: Lowerer, v, s_out: float, r: int, name: str, zp: int = 0) -> Float:
        """QuantizeLinear to uint8 codes, a uint8 Clip to the quantizer's range, DequantizeLinear: onnxruntime fuses
        DequantizeLinear -> op -> QuantizeLinear into its QLinear kernels, which a float Clip narrower than uint8 in
        front of the QuantizeLinear would block."""
        b = low.b
        if isinstance(v, Pooled):
            raise AssertionError("QDQ pools in float")
        if isinstance(v, Float) and v.island:
            # a node kept in float: onnxruntime's QDQ rewrites would run it on uint8 codes (a linear Resize between
            # DequantizeLinear and QuantizeLinear becomes a uint8 Resize that rounds differently); a float Clip in
            # front of the QuantizeLinear keeps it float
            return dequantized(low, quantize_float(low, v, s_out, r, name, zp))
        lo_u, hi_u = code_bounds(v.clip if isinstance(v, Acc) else (-np.inf, np.inf), s_out, r, zp)
        q = b.op("QuantizeLinear", [to_float(low, v), b.const(f"{name}_scale", np.array(s_out, np.float32)),
                                    b.const(f"{name}_zp", np.array(zp, np.uint8))], f"{name}_q")
        if (lo_u, hi_u) != (0, 255):
            q = b.op("Clip", [q, b.const(f"{name}_lo", np.array(lo_u, np.uint8)),
                              b.const(f"{name}_hi", np.array(hi_u, np.uint8))], f"{name}_codes")
        return dequantized(low, Codes(q, s_out, r, TensorProto.UINT8, zp))


def qdq_layer(b: GraphBuilder, layer: WeightedLayer, s_out: float | None) -> str:
    """DequantizeLinear(x) -> float op with DequantizeLinear(W) (BN folded into the weight scale) + float bias; W as
    int8_weights.py says (int8 scaled by 2^k, or uint8 with zero point 128), or int16 for weights no 8-bit kernel
    takes (8-bit DoReFa: odd integers up to +-255). Where onnxruntime would round the bias onto a grid coarser than
    int8_weights.MAX_BIAS_STEP of the reading quantizer's step, the bias is a separate Add after the op, which keeps
    the op out of onnxruntime's QDQ fusion: float, exact bias."""
    node, x, wk, scale = layer.node, layer.x, layer.wk, layer.scale
    op = node.op_type
    base = layer.base
    xf = dequantize(b, x)
    w_axis = 0 if op == "Conv" else 1  # Gemm/MatMul weights are written [K, N]
    plan = int8_weights(layer)
    if plan is not None:
        w = wk * (1 << plan.k)
        wq = b.const(f"{base}_w_int8", w.astype(np.int8)) if plan.signed else \
            b.const(f"{base}_w_uint8", (w + 128).astype(np.uint8))
        wscale = plan.step / x.scale
        zp = [] if plan.signed else [b.const(f"{base}_w_zp", np.full(layer.n_out, 128, np.uint8))]
    else:
        wq, wscale, zp = b.const(f"{base}_w_int16", wk.astype(np.int16)), scale / x.scale, []
    ws = b.const(f"{base}_w_scale", wscale.astype(np.float32))
    wf = b.op("DequantizeLinear", [wq, ws] + zp, f"{base}_w_f", axis=w_axis)
    bconst = b.const(f"{base}_bias", layer.bias.astype(np.float32))
    fused_bias = plan is not None and s_out is not None and int8_weights(layer, s_out) is not None
    if op == "Conv" and fused_bias:
        return b.op("Conv", [xf, wf, bconst], layer.out, **attrs(node))
    if op == "Conv":
        y = b.op("Conv", [xf, wf], f"{base}_conv", **attrs(node))
        return b.op("Add", [y, b.const(f"{base}_bias_c", layer.bias.astype(np.float32).reshape(layer.cshape))],
                    layer.out)
    y = b.op("MatMul", [xf, wf], f"{base}_mm")
    return b.op("Add", [y, bconst], layer.out)
