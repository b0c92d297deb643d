"""Bad input: one-line FuseError naming the node, exit 1 from the CLI, nothing written."""

import json
import os
import subprocess
import sys

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

import qat_models as qm
from onnxqat.errors import FuseError, ModelError
from onnxqat.fusion.api import fuse

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _set(model, name, value):
    for i, t in enumerate(model.graph.initializer):
        if t.name == name:
            model.graph.initializer[i].CopyFrom(numpy_helper.from_array(np.asarray(value, dtype=numpy_helper.to_array(t).dtype), name))
            return model
    raise KeyError(name)


def float_model():
    w = numpy_helper.from_array(np.ones((2, 1, 3, 3), np.float32), "w")
    g = helper.make_graph([helper.make_node("Conv", ["input", "w"], ["y"], name="conv")], "g",
                          [helper.make_tensor_value_info("input", TensorProto.FLOAT, [1, 1, 4, 4])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)], [w])
    return helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])


def bn_after_pool():
    b = qm.QatBuilder(3)
    x = b.sat_act("relu1", b.bn("bn1", b.conv("conv1", "input", 1, 4), 4), "relu1_out", 2.1)
    x = b.op("MaxPool", [x], "pool1", kernel_shape=[2, 2], strides=[2, 2])
    x = b.sat_act("relu2", b.bn("bn_pool", x, 4), "relu2_out", 2.1)
    x = b.op("Flatten", [x], "flat", axis=1)
    return b.model(["N", 1, 8, 8], b.gemm("fc", x, 4 * 4 * 4, 3), ["N", 3])


CASES = {
    "no quantizer": (float_model, "no quantizer node"),
    "bn after no weighted layer, integer only": (bn_after_pool, "BatchNormalization 'bn_pool' (BatchNormalization "
                                                                "not after a layer)"),
    "sat clamp mode": (lambda: _set(qm.conv_bn_sat(), "conv2_wquant.mode", 0), "SatWeightQuant 'conv2_wquant' is in clamp mode"),
    "activation range too wide": (lambda: _set(qm.conv_bn_sat(), "relu1_aquant.range", 1000.0),
                                  "SatActQuant 'relu1_aquant': range R=1000 does not fit 8-bit codes"),
    "fractional range": (lambda: _set(qm.conv_bn_sat(), "conv1_wquant.range", 15.5),
                         "SatWeightQuant 'conv1_wquant': inconsistent range R=15.5"),
    "per-channel steps vs channels": (lambda: _set(qm.lsq_per_channel(), "conv1_wquant.step", np.full(5, 0.1, np.float32)),
                                      "LsqQuant 'conv1_wquant': inconsistent per-channel step: 5 steps"),
    "zero step": (lambda: _set(qm.lsq_per_channel(), "relu1_aquant.step", [0.0]), "LsqQuant 'relu1_aquant': step must be > 0"),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_bad_input_is_one_line_error_naming_the_node(case, tmp_path):
    build, message = CASES[case]
    out = tmp_path / "out.onnx"
    with pytest.raises(FuseError) as e:
        fuse(build(), out, check=False, integer_only=True)
    assert message in str(e.value) and "\n" not in str(e.value)
    assert not out.exists() and os.listdir(tmp_path) == []


def test_island_without_integer_only(tmp_path):
    """The same BatchNormalization without integer_only: kept in float, named in the summary and the JSON report."""
    out = tmp_path / "out.onnx"
    res = fuse(bn_after_pool(), out, verify_samples=16)
    assert [(i.node, i.op_type) for i in res.islands] == [("bn_pool", "BatchNormalization")]
    assert "float: BatchNormalization x1 (BatchNormalization not after a layer): bn_pool" in res.summary()
    assert res.agreement.identical
    report = json.loads((tmp_path / "out.onnx.json").read_text())
    assert report["float_islands"][0]["node"] == "bn_pool" and report["integer_nodes"] == res.lowered_nodes - 1


def test_strict_fails_and_writes_nothing(tmp_path):
    """Off-grid float data: the fused model sees the input codes, the fake-quantized one the raw floats."""
    out = tmp_path / "out.onnx"
    out.write_bytes(b"previous")
    x = np.random.default_rng(0).uniform(0, 1, (32, 1, 8, 8)).astype(np.float32)
    with pytest.raises(FuseError, match="--strict: fused and fake-quantized outputs differ"):
        fuse(qm.conv_bn_sat(), out, verify_data=x, strict=True)
    assert out.read_bytes() == b"previous" and sorted(os.listdir(tmp_path)) == ["out.onnx"]
    res = fuse(qm.conv_bn_sat(), out, verify_data=x)  # without --strict: reported, written
    assert res.agreement.code_agreement < 1.0 and out.read_bytes() != b"previous"


def test_unreadable_model(tmp_path):
    p = tmp_path / "bad.onnx"
    p.write_bytes(b"not a model")
    with pytest.raises(ModelError, match="bad.onnx"):
        fuse(p)


def _cli(*args):
    return subprocess.run([sys.executable, "-m", "onnxqat", "fuse", *map(str, args)], capture_output=True, text=True,
                          cwd=REPO, env={**os.environ, "PYTHONPATH": REPO})


def test_cli_error_exit_1_nothing_written(tmp_path):
    src = tmp_path / "clamp.onnx"
    onnx.save(_set(qm.conv_bn_sat(), "conv2_wquant.mode", 0), src)
    r = _cli(src, "-o", tmp_path / "out.onnx")
    assert r.returncode == 1
    assert r.stderr.strip().count("\n") == 0 and "conv2_wquant" in r.stderr and r.stderr.startswith("onnxqat: error:")
    assert sorted(os.listdir(tmp_path)) == ["clamp.onnx"]


def test_cli_fuse_writes_model_and_reports(tmp_path):
    src = tmp_path / "m.onnx"
    onnx.save(qm.conv_bn_sat(), src)
    np.savez(tmp_path / "v.npz", x=np.random.default_rng(1).integers(0, 256, (16, 1, 8, 8), dtype=np.uint8))
    r = _cli(src, "--verify-data", tmp_path / "v.npz", "--strict")
    assert r.returncode == 0, r.stderr
    assert "max output code difference 0" in r.stdout and "top-1 agreement 100.00%" in r.stdout
    assert "16 samples" in r.stdout
    fused = onnx.load(tmp_path / "m.int.onnx")
    assert all(n.domain == "" for n in fused.graph.node)
    assert "--format ort" in r.stdout  # the int format says what to use on onnxruntime
    r = _cli(src, "--verify-data", tmp_path / "v.npz", "--format", "ort")
    assert r.returncode == 0, r.stderr
    assert "QLinearConv" in {n.op_type for n in onnx.load(tmp_path / "m.ort.onnx").graph.node}
    assert "--format ort" not in r.stdout


def test_float_verify_data_beyond_the_input_codes_is_an_error():
    """0..255 pixels given as float with the default input scale 1/255: clipped to code 255 they would compare the two
    models on different images; the error names the range and the option. With --input-scale 1 they verify."""
    from onnxqat.errors import DataError

    qat = qm.conv_bn_sat()
    x = np.random.default_rng(0).integers(0, 256, (8, 1, 8, 8)).astype(np.float32)
    with pytest.raises(DataError, match=r"verify data for input 'input' spans \[0, 255\], beyond the 256 codes of "
                                        r"input scale 0.00392157 \(\[0, 1\]\): give the scale of one input step"):
        fuse(qat, verify_data=x)
    res = fuse(qat, verify_data=x, input_scale=1.0, strict=True)
    assert res.agreement.samples == 8 and res.agreement.max_code_diff == 0
