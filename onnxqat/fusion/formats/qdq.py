"""The QDQ format: QuantizeLinear/DequantizeLinear pairs around float ops (portable: any runtime with QDQ support).

Every activation quantizer becomes Clip + QuantizeLinear + DequantizeLinear; sums, pooling and shape ops run on the
dequantized floats. The weighted layer: DequantizeLinear(x) -> float Conv / MatMul + Add on DequantizeLinear(W_int) with the
BatchNorm factor folded into the per-channel weight scale, and a float bias (BN folded).

Weights int4 where they fit [-8, 7] (LSQ, symmetric SAT), else int8 (DoReFa 4-bit: ±15), int16 for 8-bit DoReFa.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np
import onnx
from onnx import TensorProto

from onnxqat.fusion.builder import GraphBuilder
from onnxqat.fusion.convert import dequantize
from onnxqat.fusion.formats.base import Format, dequantized, quantize_float
from onnxqat.fusion.graph import attrs
from onnxqat.fusion.values import Codes, Float, Pooled, WeightedLayer

if TYPE_CHECKING:
    from onnxqat.fusion.lowering import Lowerer


class QdqFormat(Format):
    name = "qdq"
    float_arithmetic = True
    input_type = "float"

    def weighted(self, low: Lowerer, layer: WeightedLayer) -> Float:
        y = qdq_layer(low.b, layer.node, layer.x, layer.wk, layer.scale, layer.bias, layer.out)
        return Float(y, unit=(layer.scale, layer.ch_axis))

    def requantize(self, low: Lowerer, v, s_out: float, r: int, name: str, zp: int = 0) -> Float:
        if isinstance(v, Pooled):
            raise AssertionError("QDQ pools in float")
        return dequantized(low, quantize_float(low, v, s_out, r, name, zp))


def qdq_layer(b: GraphBuilder, node: onnx.NodeProto, x: Codes, wk: np.ndarray, scale: np.ndarray, bias: np.ndarray,
              out: str) -> str:
    """QDQ: DequantizeLinear(x) -> float op with DequantizeLinear(W_int) (BN folded into the scale) + float bias."""
    op = node.op_type
    base = node.name or out
    xf = dequantize(b, x)
    lo, hi = int(wk.min()), int(wk.max())
    w_axis = 0 if op == "Conv" else 1  # Gemm/MatMul weights are written [K, N]
    wscale = scale / x.scale  # weight step per output channel (BN factor included)
    if -8 <= lo and hi <= 7:
        flat = (wk.reshape(-1) & 0xF).astype(np.uint8)
        if flat.size % 2:
            flat = np.concatenate([flat, np.zeros(1, np.uint8)])
        raw = (flat[0::2] | (flat[1::2] << 4)).astype(np.uint8)
        wq = b.const_typed(f"{base}_w_int4", raw, TensorProto.INT4, list(wk.shape))
    elif -128 <= lo and hi <= 127:
        wq = b.const(f"{base}_w_int8", wk.astype(np.int8))
    else:
        wq = b.const(f"{base}_w_int16", wk.astype(np.int16))
    ws = b.const(f"{base}_w_scale", wscale.astype(np.float32))
    wf = b.op("DequantizeLinear", [wq, ws], f"{base}_w_f", axis=w_axis)
    bconst = b.const(f"{base}_bias", bias.astype(np.float32))
    a = attrs(node)
    if op == "Conv":
        return b.op("Conv", [xf, wf, bconst], out, **a)
    y = b.op("MatMul", [xf, wf], f"{base}_mm")
    return b.op("Add", [y, bconst], out)
