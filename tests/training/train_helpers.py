"""Small models and data sets for the training tests."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

FASHION = Path("/usr/share/datasets/fashion-mnist")


def linear_model(n_in: int = 12, n_out: int = 4, seed: int = 0) -> onnx.ModelProto:
    """Flatten + Gemm: logits = x W^T + b (gradients known in closed form)."""
    rng = np.random.default_rng(seed)
    inits = [numpy_helper.from_array((rng.standard_normal((n_out, n_in)) * 0.3).astype(np.float32), "fc.weight"),
             numpy_helper.from_array((rng.standard_normal(n_out) * 0.1).astype(np.float32), "fc.bias")]
    nodes = [helper.make_node("Flatten", ["input"], ["flat"], name="flatten", axis=1),
             helper.make_node("Gemm", ["flat", "fc.weight", "fc.bias"], ["logits"], name="fc", transB=1)]
    g = helper.make_graph(nodes, "linear", [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["N", 1, 3, 4])],
                          [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["N", n_out])], inits)
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])
    m.ir_version = 8
    return m


def small_cnn(seed: int = 0, bn: bool = False) -> onnx.ModelProto:
    """Conv 3x3x4 (-BN) - ReLU - Flatten - Gemm 3 on 1x6x6 inputs."""
    rng = np.random.default_rng(seed)
    inits = [numpy_helper.from_array((rng.standard_normal((4, 1, 3, 3)) * 0.4).astype(np.float32), "conv.weight"),
             numpy_helper.from_array(np.zeros(4, np.float32), "conv.bias"),
             numpy_helper.from_array((rng.standard_normal((3, 64)) * 0.2).astype(np.float32), "fc.weight"),
             numpy_helper.from_array(np.zeros(3, np.float32), "fc.bias")]
    nodes = [helper.make_node("Conv", ["input", "conv.weight", "conv.bias"], ["c"], name="conv", kernel_shape=[3, 3])]
    x = "c"
    if bn:
        for k, v in (("scale", 1), ("B", 0), ("mean", 0), ("var", 1)):
            inits.append(numpy_helper.from_array(np.full(4, v, np.float32), f"bn.{k}"))
        nodes.append(helper.make_node("BatchNormalization", ["c", "bn.scale", "bn.B", "bn.mean", "bn.var"], ["b"],
                                      name="bn"))
        x = "b"
    nodes += [helper.make_node("Relu", [x], ["r"], name="relu"),
              helper.make_node("Flatten", ["r"], ["f"], name="flatten", axis=1),
              helper.make_node("Gemm", ["f", "fc.weight", "fc.bias"], ["logits"], name="fc", transB=1)]
    g = helper.make_graph(nodes, "cnn", [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["N", 1, 6, 6])],
                          [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["N", 3])], inits)
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])
    m.ir_version = 8
    return m


def synthetic_npz(path: Path, n: int, shape=(6, 6), classes: int = 3, seed: int = 0, n_test: int = 32) -> Path:
    """Float images whose class sets a bright quadrant (learnable), NHWC with C=1."""
    rng = np.random.default_rng(seed)

    def make(k):
        y = rng.integers(0, classes, k)
        x = rng.normal(0, 0.3, (k, *shape, 1)).astype(np.float32)
        for i, c in enumerate(y):
            x[i, (c % 2) * (shape[0] // 2):(c % 2 + 1) * (shape[0] // 2), (c // 2) * (shape[1] // 2):, 0] += 1.0
        return x, y.astype(np.int64)

    xtr, ytr = make(n)
    xte, yte = make(n_test)
    np.savez(path, x_train=xtr, y_train=ytr, x_test=xte, y_test=yte)
    return path
