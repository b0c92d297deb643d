"""File size of fused exports against parameters x bits / 8 (weights stored at the quantizer's width)."""

import numpy as np
import pytest

import qat_models as qm
from onnxqat.fusion.api import fuse


def wide_model(r_w, wq="sat"):
    b = qm.QatBuilder(9)
    x = b.sat_act("relu1", b.bn("bn1", b.conv("conv1", "input", 3, 32, wq=wq, r=r_w), 32), "relu1_out", 2.3)
    x = b.sat_act("relu2", b.bn("bn2", b.conv("conv2", x, 32, 64, stride=2, wq=wq, r=r_w), 64), "relu2_out", 2.7)
    x = b.sat_act("relu3", b.bn("bn3", b.conv("conv3", x, 64, 64, wq=wq, r=r_w), 64), "relu3_out", 2.9)
    x = b.op("Flatten", [b.op("MaxPool", [x], "pool", kernel_shape=[2, 2], strides=[2, 2])], "flat", axis=1)
    return b.model(["N", 3, 8, 8], b.gemm("fc", x, 64 * 2 * 2, 100, wq=wq, r=r_w), ["N", 100])


@pytest.mark.parametrize("wq", ["sat", "lsq"])
def test_size_scales_with_bits(wq, tmp_path):
    sizes = {}
    for bits, r in ((4, 15), (8, 255)):
        res = fuse(wide_model(r, wq), tmp_path / f"m{bits}.onnx", check=False)
        params = res.weight_params
        assert params == 3 * 32 * 9 + 32 * 64 * 9 + 64 * 64 * 9 + 256 * 100
        assert set(res.weight_bits.values()) == {bits}
        ideal = params * bits / 8
        on_disk = (tmp_path / f"m{bits}.onnx").stat().st_size
        assert on_disk == res.size
        # the rest: per-channel rescale constants (int64 multiplier and bias: 16 bytes a channel), node protos
        # (~80 nodes at 4 bits, among them BitwiseAnd/Min/Sub of each rounding shift's ties-to-even)
        channels = 32 + 64 + 64 + 100
        assert ideal <= res.size <= ideal + 20 * channels + 7_000, (bits, res.size, ideal)
        sizes[bits] = res.size
    assert sizes[4] < 0.6 * sizes[8]
    fp32 = len(wide_model(15, wq).SerializeToString())
    assert sizes[4] < 0.16 * fp32  # 1/8 of the float32 weights + constants
