"""The LeNet of N2D2's SAT tutorial, built as an ONNX graph with onnx.helper.

conv 5x5x6 - BN - ReLU - maxpool 2, conv 5x5x16 - BN - ReLU - maxpool 2, conv 5x5x120 - BN - ReLU, dropout,
fc 84 - ReLU, dropout, fc 10 (logits). The input is 1x28x28 (Fashion-MNIST/MNIST); the first convolution pads
by 2, which is the tutorial's 32x32 input with a zero border. Convolutions have no bias (N2D2's NoBias=1: a
BatchNormalization follows each one). Weights (init="he", the default): He (Kaiming) normal for layers followed
by ReLU, Xavier (Glorot) uniform for the last layer, fully connected biases 0. init="torch": what torch.nn.Conv2d and
nn.Linear start from when a PyTorch script leaves them alone (kaiming_uniform with a = sqrt(5), i.e. weights and
Linear biases uniform in +-1/sqrt(fan_in)), for comparison with PyTorch runs. Both from a seeded generator;
BN scale 1, shift 0, mean 0, var 1.

    python -m onnxqat.models.lenet lenet.onnx [--seed 0] [--init he|torch]
"""

from __future__ import annotations

import sys

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

OPSET = 17


def _he(rng, shape, fan_in):
    return (rng.standard_normal(shape) * np.sqrt(2.0 / fan_in)).astype(np.float32)


def _xavier(rng, shape, fan_in, fan_out):
    lim = np.sqrt(6.0 / (fan_in + fan_out))
    return rng.uniform(-lim, lim, shape).astype(np.float32)


def _torch_default(rng, shape, fan_in):
    lim = 1.0 / np.sqrt(fan_in)  # kaiming_uniform(a=sqrt(5)): sqrt(6 / ((1 + 5) fan_in))
    return rng.uniform(-lim, lim, shape).astype(np.float32)


INITS = ("he", "torch")


def build_lenet(seed: int = 0, num_classes: int = 10, in_channels: int = 1, image_size: int = 28,
                dropout: float = 0.5, init: str = "he") -> onnx.ModelProto:
    """Returns the LeNet model (input `input` [N, C, H, W] float32, output `logits` [N, num_classes]); `init`: "he"
    or "torch" (see the module docstring)."""
    if init not in INITS:
        raise ValueError(f"unknown LeNet init {init!r}: one of {', '.join(INITS)}")
    rng = np.random.default_rng(seed)

    def relu_layer(shape, fan_in):
        return _he(rng, shape, fan_in) if init == "he" else _torch_default(rng, shape, fan_in)

    def last_layer(shape, fan_in, fan_out):
        return _xavier(rng, shape, fan_in, fan_out) if init == "he" else _torch_default(rng, shape, fan_in)

    def bias(n, fan_in):
        return np.zeros(n, np.float32) if init == "he" else _torch_default(rng, (n,), fan_in)

    inits: list[onnx.TensorProto] = []
    nodes: list[onnx.NodeProto] = []

    def add(name, arr):
        inits.append(numpy_helper.from_array(np.asarray(arr), name))
        return name

    def conv_bn_relu(idx, x, cin, cout, pads):
        w = add(f"conv{idx}.weight", relu_layer((cout, cin, 5, 5), cin * 25))
        nodes.append(helper.make_node("Conv", [x, w], [f"conv{idx}_out"], name=f"conv{idx}",
                                      kernel_shape=[5, 5], pads=[pads] * 4, strides=[1, 1]))
        bn = [add(f"bn{idx}.{k}", v) for k, v in (("scale", np.ones(cout, np.float32)),
                                                     ("B", np.zeros(cout, np.float32)),
                                                     ("mean", np.zeros(cout, np.float32)),
                                                     ("var", np.ones(cout, np.float32)))]
        nodes.append(helper.make_node("BatchNormalization", [f"conv{idx}_out", *bn], [f"bn{idx}_out"],
                                      name=f"bn{idx}", epsilon=1e-5, momentum=0.9))
        nodes.append(helper.make_node("Relu", [f"bn{idx}_out"], [f"relu{idx}_out"], name=f"relu{idx}"))
        return f"relu{idx}_out"

    pad = 2 if image_size == 28 else 0
    x = conv_bn_relu(1, "input", in_channels, 6, pad)
    nodes.append(helper.make_node("MaxPool", [x], ["pool1_out"], name="pool1", kernel_shape=[2, 2], strides=[2, 2]))
    x = conv_bn_relu(2, "pool1_out", 6, 16, 0)
    nodes.append(helper.make_node("MaxPool", [x], ["pool2_out"], name="pool2", kernel_shape=[2, 2], strides=[2, 2]))
    x = conv_bn_relu(3, "pool2_out", 16, 120, 0)
    ratio = add("dropout.ratio", np.array(dropout, np.float32))
    nodes.append(helper.make_node("Dropout", [x, ratio], ["drop3_out", "drop3_mask"], name="drop3"))
    nodes.append(helper.make_node("Flatten", ["drop3_out"], ["flat_out"], name="flatten", axis=1))
    w = add("fc1.weight", relu_layer((84, 120), 120))
    b = add("fc1.bias", bias(84, 120))
    nodes.append(helper.make_node("Gemm", ["flat_out", w, b], ["fc1_out"], name="fc1", transB=1))
    nodes.append(helper.make_node("Relu", ["fc1_out"], ["relu4_out"], name="relu4"))
    nodes.append(helper.make_node("Dropout", ["relu4_out", ratio], ["drop4_out", "drop4_mask"], name="drop4"))
    w = add("fc2.weight", last_layer((num_classes, 84), 84, num_classes))
    b = add("fc2.bias", bias(num_classes, 84))
    nodes.append(helper.make_node("Gemm", ["drop4_out", w, b], ["logits"], name="fc2", transB=1))

    graph = helper.make_graph(
        nodes, "lenet",
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["N", in_channels, image_size, image_size])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["N", num_classes])],
        inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)], producer_name="onnxqat")
    model.ir_version = 8
    onnx.checker.check_model(model)
    return model


def main(argv: list[str] | None = None) -> None:
    import argparse

    p = argparse.ArgumentParser(description="Write the N2D2 tutorial LeNet as an ONNX file.")
    p.add_argument("out")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--init", choices=INITS, default="he", help="he: He/Xavier normal init (default); torch: "
                   "PyTorch's default Conv2d/Linear init")
    a = p.parse_args(argv)
    onnx.save(build_lenet(a.seed, init=a.init), a.out)
    print(a.out)


if __name__ == "__main__":
    main(sys.argv[1:])
