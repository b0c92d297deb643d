"""ConvTranspose as a Conv of the zero-inserted codes (ops/weighted.py as_conv): integer-only and exact."""

import numpy as np
import pytest
from onnx import helper

import qat_models as qm
from onnxqat.fusion.api import fuse


def _model(k: int, stride: int, pads: list[int], output_padding: list[int], wq: str, bn: bool):
    b = qm.QatBuilder(8)
    x = b.sat_act("relu1", b.bn("bn1", b.conv("conv1", "input", 1, 4), 4), "relu1_out", 1.77)
    w = (b.rng.standard_normal((4, 3, k, k)) * 0.3).astype(np.float32)
    b.init("up.weight", w)
    wqn = b.sat_weight("up", "up.weight", 15) if wq == "sat" else b.lsq_weight("up", "up.weight", w, 15, True, 1)
    ins = [x, wqn, b.init("up.bias", (b.rng.standard_normal(3) * 0.1).astype(np.float32))]
    b.nodes.append(helper.make_node("ConvTranspose", ins, ["up_out"], name="up", kernel_shape=[k, k],
                                    strides=[stride, stride], pads=pads, output_padding=output_padding))
    y = b.bn("bn_up", "up_out", 3) if bn else "up_out"
    y = b.sat_act("relu2", y, "relu2_out", 1.41)
    n = (8 - 1) * stride + k - pads[0] - pads[2] + output_padding[0]
    y = b.op("Flatten", [y], "flat", axis=1)
    return b.model(["N", 1, 8, 8], b.gemm("fc", y, 3 * n * n, 5), ["N", 5])


@pytest.mark.parametrize("fmt", ["int", "ort"])
@pytest.mark.parametrize("k,stride,pads,op,wq,bn", [
    (2, 2, [0, 0, 0, 0], [0, 0], "sat", True),   # U-Net's up-sampling
    (3, 2, [1, 1, 1, 1], [1, 1], "lsq", False),  # 'same' up-sampling with output padding
    (4, 2, [1, 1, 1, 1], [0, 0], "sat", True),   # DCGAN-style
    (3, 1, [1, 1, 1, 1], [0, 0], "lsq", True),   # stride 1: a plain (flipped) convolution
    (3, 3, [0, 0, 0, 0], [0, 0], "sat", False),
])
def test_conv_transpose_is_integer_and_exact(k, stride, pads, op, wq, bn, fmt):
    qat = _model(k, stride, pads, op, wq, bn)
    res = fuse(qat, format=fmt, verify_samples=32, strict=True, integer_only=fmt == "int")
    ops = {n.op_type for n in res.model.graph.node}
    assert "ConvTranspose" not in ops and "BatchNormalization" not in ops and res.islands == []
    assert res.agreement.activations["relu2_out"] == 1.0
