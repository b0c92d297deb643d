"""Resize in linear mode on codes, for the case decoders use (U-Net, FPN: `nn.Upsample(scale_factor=2,
mode="bilinear", align_corners=False)`): a 2x upsampling with half-pixel centres.

With half-pixel centres output 2i sits at input i - 1/4 and output 2i + 1 at i + 1/4, the border clamped (an edge
pad): along one axis the upsampled value is (3 x[i] + x[i-1]) / 4 or (3 x[i] + x[i+1]) / 4. Two axes give 16 times
the bilinear value as an exact int32 sum of codes (weights 9, 3, 3, 1), an accumulator with scale s / 16 that the
next quantizer requantizes; the zero point goes through unchanged (the weights sum to 16). Other factors or
coordinate modes stay float islands.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np
import onnx
from onnx import TensorProto

from onnxqat.fusion.graph import NoIntegerForm, attrs, node_label
from onnxqat.fusion.values import Acc, Codes

if TYPE_CHECKING:
    from onnxqat.fusion.lowering import Lowerer

HALF_PIXEL_MODES = ("half_pixel", "pytorch_half_pixel")  # the same for any output length > 1


def upsample_factors(low: Lowerer, node: onnx.NodeProto) -> list[float] | None:
    """The Resize's scale per axis (from scales, or from sizes and the static input shape); None if not constant."""
    g = low.g
    shape = g.shape_of(node.input[0])
    if len(node.input) > 3 and node.input[3]:
        if node.input[3] not in g.consts or not shape or None in shape:
            return None
        sizes = g.consts[node.input[3]].reshape(-1)
        return [float(o) / float(i) for o, i in zip(sizes, shape)]
    name = node.input[2] if len(node.input) > 2 else node.input[1]  # opset 10: Resize(X, scales)
    if not name or name not in g.consts:
        return None
    return [float(x) for x in g.consts[name].reshape(-1)]


def lower_linear_resize(low: Lowerer, node: onnx.NodeProto, v: Codes) -> None:
    a = attrs(node)
    mode = a.get("coordinate_transformation_mode", "half_pixel")
    factors = upsample_factors(low, node)
    shape = low.g.shape_of(node.input[0])
    if (factors is None or len(factors) != 4 or factors[:2] != [1.0, 1.0] or factors[2:] != [2.0, 2.0]
            or mode not in HALF_PIXEL_MODES or not shape or len(shape) != 4 or None in shape[2:]):
        raise NoIntegerForm(f"{node_label(node)}: Resize linear other than a 2x half-pixel upsampling of NCHW "
                            f"(factors {factors}, {mode})", "Resize linear (not 2x half-pixel)")
    b = low.b
    base = node.output[0]
    t = b.cast(v.name, TensorProto.INT32, f"{base}_i32")
    three = b.const(f"{base}_three", np.array(3, np.int32))
    dims = list(shape[2:])
    for axis in (2, 3):
        pads = [0] * 8
        pads[axis], pads[4 + axis] = 1, 1
        p = b.op("Pad", [t, b.const(f"{base}_pads{axis}", np.array(pads, np.int64))], f"{base}_edge{axis}", mode="edge")
        n = dims[axis - 2]

        def part(lo: int, tag: str) -> str:
            return b.op("Slice", [p, b.const(f"{base}_s{tag}{axis}", np.array([lo], np.int64)),
                                  b.const(f"{base}_e{tag}{axis}", np.array([lo + n], np.int64)),
                                  b.const(f"{base}_ax{tag}{axis}", np.array([axis], np.int64))], f"{base}_{tag}{axis}")

        mid3 = b.op("Mul", [part(1, "mid"), three], f"{base}_mid3_{axis}")
        even = b.op("Add", [mid3, part(0, "lo")], f"{base}_even{axis}")
        odd = b.op("Add", [mid3, part(2, "hi")], f"{base}_odd{axis}")
        after = b.const(f"{base}_unsq{axis}", np.array([axis + 1], np.int64))
        pair = b.op("Concat", [b.op("Unsqueeze", [even, after], f"{base}_ue{axis}"),
                               b.op("Unsqueeze", [odd, after], f"{base}_uo{axis}")], f"{base}_pair{axis}",
                    axis=axis + 1)
        dims[axis - 2] = 2 * n
        t = b.op("Reshape", [pair, b.const(f"{base}_shape{axis}", np.array([0, 0] + dims, np.int64))],
                 f"{base}_up{axis}")
    low.val[node.output[0]] = Acc([(t, np.array([v.scale / 16.0]), 16.0 * v.r)], np.array([-v.scale * v.zp]), (), 1)
