"""8-bit weights for the kernels that multiply uint8 codes by 8-bit weights and add an int32 bias (onnxruntime's
QLinearConv and QGemm, and its fusion of a QDQ Conv/Gemm into them).

- AVX2 without VNNI sums pairs of u8 x s8 products in saturating int16 (vpmaddubsw): a layer whose input codes reach
  x_max takes int8 weights only while 2 x_max |w| <= 32767, else uint8 weights with zero point 128 (the u8 x u8 kernel
  widens to 16 bits first). Measured on onnxruntime 1.19.2 and 1.32.0: codes 0..255 x weights +-127 gave 4369 wrong
  outputs of 4608; +-64 and uint8 weights none.
- The bias is added in accumulator steps, so it is rounded to them: weights scaled by 2^k (the largest that keeps
  them in range and the accumulator exact in float32, which the kernels' requantization converts it to) make that
  step 2^k times finer.
8-bit DoReFa weights (odd integers 2k - 255) fit neither type: such layers take another path.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from onnxqat.fusion.values import WeightedLayer

PAIR_SATURATION = 32767  # int16 sum of two u8 x s8 products (vpmaddubsw)
# a layer takes an int32-bias kernel only while a whole bias step is at most this fraction of its quantizer's step:
# fuse moves the QAT model's bias onto that grid (snap_bias.py) by at most half a step, so its output codes move by at
# most 1/16 of a code; coarser accumulators (a layer whose output quantizer is much finer than its input x weight
# grid) keep a float bias (measured: an 8-bit SE gate whose bias step was ~1 output code changed the class of 78 % of
# a random-weight EfficientNet's inputs when snapped)
MAX_BIAS_STEP = 1 / 8
EXACT_FLOAT = 2 ** 24  # integers below this are exact in float32


@dataclass
class Int8Weights:
    signed: bool  # int8 weights (else uint8 with zero point 128)
    k: int  # weights stored as W_int * 2^k
    step: np.ndarray  # real value of one accumulator step, per output channel (layer.scale / 2^k, signed)
    bound: float  # bound on |accumulator| before the 2^k scaling


def reading_quantizer_step(low, layer: WeightedLayer) -> float | None:
    """The step of the activation quantizer that reads the layer's output (through a Relu/Clip), or None."""
    g, t = low.g, layer.out
    for _ in range(3):
        n = g.only_consumer(t)
        if n is None:
            return None
        if n.op_type == "SatActQuant":
            return abs(g.scalar(n, 1, "alpha")) / g.scalar(n, 2, "range")
        if n.op_type == "LsqQuant":
            step = g.const(n.input[1], n, "step")
            return float(step.reshape(-1)[0]) if step.size == 1 else None
        if n.op_type not in ("Relu", "Clip"):
            return None
        t = n.output[0]
    return None


def out_axis(layer: WeightedLayer) -> int:
    return 0 if layer.node.op_type == "Conv" else 1


def accumulator_bound(layer: WeightedLayer) -> float:
    red = tuple(i for i in range(layer.wk.ndim) if i != out_axis(layer))
    bound = float(np.max(np.sum(np.abs(layer.wk), axis=red))) * layer.x.bound if layer.wk.size else 0.0
    return bound * (layer.pooled.count if layer.pooled is not None else 1)


def int8_weights(layer: WeightedLayer, s_out: float | None = None) -> Int8Weights | None:
    """How the layer's weights go into an 8-bit kernel, or None when they don't fit one (or, given the step s_out of
    the quantizer that reads it, when the int32 bias grid is coarser than MAX_BIAS_STEP of s_out)."""
    if not np.all(layer.scale != 0):
        return None
    wmax = int(np.max(np.abs(layer.wk))) if layer.wk.size else 0
    s8_limit = min(127, PAIR_SATURATION // (2 * max(layer.x.r, 1)))
    signed = wmax <= s8_limit
    if not signed and (wmax > 128 or int(np.max(layer.wk)) > 127):
        return None
    limit = s8_limit if signed else 127
    bound = accumulator_bound(layer)
    k = 0
    while wmax and wmax << (k + 1) <= limit and bound * 2 ** (k + 1) < EXACT_FLOAT:
        k += 1
    step = layer.scale / 2 ** k
    if np.max(np.abs(np.round(layer.bias / step))) + bound * 2 ** k >= 2 ** 31:
        return None
    if s_out is not None and float(np.max(np.abs(step))) > MAX_BIAS_STEP * s_out:
        return None
    return Int8Weights(signed, k, step, bound)
