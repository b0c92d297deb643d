"""Small test models written as ONNX text; weights are declared as graph inputs and filled with seeded values."""

from __future__ import annotations

import numpy as np
import onnx
import onnx.parser
from onnx import numpy_helper


def model_from_text(
    text: str,
    data: tuple[str, ...] = ("x",),
    seed: int = 0,
    as_constant: tuple[str, ...] = (),
    values: dict[str, np.ndarray] | None = None,
) -> onnx.ModelProto:
    """Parse `text`; every graph input not in `data` becomes an initializer: the array in `values`, or seeded
    normal values scaled by 1/sqrt(fan-in); inputs named in `as_constant` become Constant nodes instead."""
    m = onnx.parser.parse_model(text)
    rng = np.random.default_rng(seed)
    values = values or {}
    g = m.graph
    keep, consts = [], []
    for vi in g.input:
        if vi.name in data:
            keep.append(vi)
            continue
        shape = [d.dim_value for d in vi.type.tensor_type.shape.dim]
        if vi.name in values:
            arr = np.asarray(values[vi.name])
        else:
            fan_in = int(np.prod(shape[1:])) if len(shape) > 1 else 1
            arr = (rng.standard_normal(shape) / np.sqrt(fan_in)).astype(np.float32)
        t = numpy_helper.from_array(arr, vi.name)
        if vi.name in as_constant:
            consts.append(onnx.helper.make_node("Constant", [], [vi.name], value=t, name=f"const_{vi.name}"))
        else:
            g.initializer.append(t)
    del g.input[:]
    g.input.extend(keep)
    nodes = consts + list(g.node)
    del g.node[:]
    g.node.extend(nodes)
    onnx.checker.check_model(m, full_check=True)
    return m


# conv -> relu -> pool -> flatten -> fc; the fc weight is a Constant node (as in rapidocr models)
CONV_GEMM = """
<ir_version: 8, opset_import: ["" : 13]>
convnet (float[1,3,8,8] x, float[4,3,3,3] w1, float[4] b1, float[10,4] wfc, float[10] bfc) => (float[1,10] y)
{
  conv1 = Conv<pads=[1,1,1,1]>(x, w1, b1)
  relu1 = Relu(conv1)
  pool = GlobalAveragePool(relu1)
  flat = Flatten(pool)
  fc = Gemm<transB=1>(flat, wfc, bfc)
  y = Identity(fc)
}
"""


def conv_gemm() -> onnx.ModelProto:
    return model_from_text(CONV_GEMM, as_constant=("wfc",))


# BatchNorm, residual Add, Clip(0,6), Concat, ConvTranspose, Transpose + Reshape, MatMul
RESBLOCK = """
<ir_version: 8, opset_import: ["" : 13]>
resblock (float[2,3,8,8] x, float[8,3,3,3] w0, float[8] s0, float[8] b0, float[8] m0, float[8] v0,
          float[8,8,3,3] w1, float[8,8,3,3] w2, float[4,16,1,1] w3, float[4,2,2,2] wt, float[128,5] wm,
          float zero, float six, int64[2] shape) => (float[2,5] y)
{
  c0 = Conv<pads=[1,1,1,1]>(x, w0)
  n0 = BatchNormalization(c0, s0, b0, m0, v0)
  r0 = Relu(n0)
  p0 = MaxPool<kernel_shape=[2,2], strides=[2,2]>(r0)
  c1 = Conv<pads=[1,1,1,1]>(p0, w1)
  r1 = Relu(c1)
  c2 = Conv<pads=[1,1,1,1]>(r1, w2)
  a = Add(c2, p0)
  r2 = Clip(a, zero, six)
  cat = Concat<axis=1>(r2, p0)
  c3 = Conv(cat, w3)
  r3 = Relu(c3)
  up = ConvTranspose<strides=[2,2]>(r3, wt)
  r4 = Relu(up)
  t = Transpose<perm=[0,2,3,1]>(r4)
  f = Reshape(t, shape)
  y = MatMul(f, wm)
}
"""
RESBLOCK_VALUES = {
    "s0": np.linspace(0.5, 1.5, 8, dtype=np.float32),
    "b0": np.linspace(-0.2, 0.3, 8, dtype=np.float32),
    "m0": np.zeros(8, np.float32),
    "v0": np.ones(8, np.float32),
    "zero": np.array(0.0, np.float32),
    "six": np.array(6.0, np.float32),
    "shape": np.array([2, 128], np.int64),
}


def resblock() -> onnx.ModelProto:
    return model_from_text(RESBLOCK, values=RESBLOCK_VALUES, seed=1)


# what the passes cannot handle: an activation they do not know, conv straight after conv, an attention-like MatMul
UNHANDLED = """
<ir_version: 8, opset_import: ["" : 13]>
unhandled (float[1,3,8,8] x, float[4,3,3,3] w0, float[4,4,1,1] w1, float[4,4,1,1] w2) => (float[1,4,8,8] y)
{
  c0 = Conv<pads=[1,1,1,1]>(x, w0)
  s0 = Sigmoid(c0)
  c1 = Conv(s0, w1)
  c2 = Conv(c1, w2)
  y = MatMul(c2, c2)
}
"""


def unhandled() -> onnx.ModelProto:
    return model_from_text(UNHANDLED, seed=2)


NO_WEIGHTS = """
<ir_version: 8, opset_import: ["" : 13]>
noweights (float[1,3,8,8] x) => (float[1,3,8,8] y)
{
  y = Relu(x)
}
"""
