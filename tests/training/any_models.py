"""Small ONNX models shaped like the ones people bring (tests of issue 11): several inputs and outputs, NHWC,
opset 11, ops without an ORT gradient (HardSigmoid, HardSwish, PReLU, nearest and bilinear Resize), a trailing
Softmax. Weights from a fixed seed."""

from __future__ import annotations

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper


def _w(rng, shape, scale=None):
    fan_in = int(np.prod(shape[1:])) if len(shape) > 1 else shape[0]
    return (rng.standard_normal(shape) * (scale or np.sqrt(2.0 / fan_in))).astype(np.float32)


def two_in_three_out(opset: int = 11, seed: int = 0, size: int = 8) -> onnx.ModelProto:
    """image [N, 3, size, size] + state [N, 4] -> logits [N, 5], map [N, 1, size, size], state_out [N, 4].
    Conv - HardSigmoid*x (HardSwish form of torch's opset < 14 export) - Conv stride 2 - nearest Resize x2 (map head),
    GlobalAveragePool - Gemm + state Gemm - Relu (logits head), state_out = Tanh(Gemm(state))."""
    rng = np.random.default_rng(seed)
    inits = {"c1.w": _w(rng, (6, 3, 3, 3)), "c1.b": np.zeros(6, np.float32), "c2.w": _w(rng, (6, 6, 3, 3)),
             "m.w": _w(rng, (1, 6, 1, 1)), "fc.w": _w(rng, (5, 6)), "fc.b": np.zeros(5, np.float32),
             "st.w": _w(rng, (5, 4)), "so.w": _w(rng, (4, 4)), "scales": np.array([1, 1, 2, 2], np.float32),
             "roi": np.zeros(0, np.float32)}
    n = helper.make_node
    nodes = [n("Conv", ["image", "c1.w", "c1.b"], ["c1"], name="c1", pads=[1, 1, 1, 1]),
             n("HardSigmoid", ["c1"], ["hs"], name="hsig", alpha=1 / 6, beta=0.5),
             n("Mul", ["c1", "hs"], ["a1"], name="hswish"),
             n("Conv", ["a1", "c2.w"], ["c2"], name="c2", pads=[1, 1, 1, 1], strides=[2, 2]),
             n("Relu", ["c2"], ["r2"], name="r2"),
             n("Resize", ["r2", "roi", "scales"], ["up"], name="up", mode="nearest"),
             n("Conv", ["up", "m.w"], ["map"], name="map_head"),
             n("GlobalAveragePool", ["r2"], ["gap"], name="gap"),
             n("Flatten", ["gap"], ["flat"], name="flatten"),
             n("Gemm", ["flat", "fc.w", "fc.b"], ["f1"], name="fc", transB=1),
             n("Gemm", ["state", "st.w"], ["f2"], name="state_fc", transB=1),
             n("Add", ["f1", "f2"], ["logits"], name="logits_add"),
             n("Gemm", ["state", "so.w"], ["s1"], name="state_out_fc", transB=1),
             n("Tanh", ["s1"], ["state_out"], name="state_out_tanh")]
    g = helper.make_graph(
        nodes, "two_in_three_out",
        [helper.make_tensor_value_info("image", TensorProto.FLOAT, ["N", 3, size, size]),
         helper.make_tensor_value_info("state", TensorProto.FLOAT, ["N", 4])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["N", 5]),
         helper.make_tensor_value_info("map", TensorProto.FLOAT, ["N", 1, size, size]),
         helper.make_tensor_value_info("state_out", TensorProto.FLOAT, ["N", 4])],
        [numpy_helper.from_array(v, k) for k, v in inits.items()])
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", opset)])
    m.ir_version = 6
    onnx.checker.check_model(m)
    return m


def keras_nhwc(seed: int = 0, size: int = 12, classes: int = 4) -> onnx.ModelProto:
    """tf2onnx style: input [N, size, size, 3] in 0..255, x/127.5 - 1, Transpose to NCHW, Conv auto_pad SAME_UPPER,
    PReLU per channel, bilinear Resize x2 then Conv stride 2 VALID, GlobalAveragePool, Gemm transB=0, Softmax."""
    rng = np.random.default_rng(seed)
    inits = {"k": np.array(1 / 127.5, np.float32), "one": np.array(1.0, np.float32),
             "c1.w": _w(rng, (8, 3, 3, 3)), "c1.b": np.zeros(8, np.float32),
             "slope": np.full((8, 1, 1), 0.2, np.float32), "c2.w": _w(rng, (8, 8, 2, 2)),
             "fc.w": _w(rng, (8, classes), 0.5), "fc.b": np.zeros(classes, np.float32),
             "scales": np.array([1, 1, 2, 2], np.float32), "roi": np.zeros(0, np.float32)}
    n = helper.make_node
    nodes = [n("Mul", ["input", "k"], ["s"], name="scale"), n("Sub", ["s", "one"], ["x"], name="shift"),
             n("Transpose", ["x"], ["t"], name="to_nchw", perm=[0, 3, 1, 2]),
             n("Conv", ["t", "c1.w", "c1.b"], ["c1"], name="conv1", auto_pad="SAME_UPPER"),
             n("PRelu", ["c1", "slope"], ["p1"], name="prelu1"),
             n("Resize", ["p1", "roi", "scales"], ["up"], name="up", mode="linear"),
             n("Conv", ["up", "c2.w"], ["c2"], name="conv2", auto_pad="VALID", strides=[2, 2]),
             n("Relu", ["c2"], ["r2"], name="relu2"),
             n("GlobalAveragePool", ["r2"], ["gap"], name="gap"),
             n("Flatten", ["gap"], ["flat"], name="flatten"),
             n("Gemm", ["flat", "fc.w", "fc.b"], ["logits"], name="dense"),
             n("Softmax", ["logits"], ["probs"], name="softmax", axis=-1)]
    g = helper.make_graph(nodes, "keras_nhwc",
                          [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["N", size, size, 3])],
                          [helper.make_tensor_value_info("probs", TensorProto.FLOAT, ["N", classes])],
                          [numpy_helper.from_array(v, k) for k, v in inits.items()])
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 13)])
    m.ir_version = 7
    onnx.checker.check_model(m)
    return m
