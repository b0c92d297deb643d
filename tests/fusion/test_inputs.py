"""Which input the fused model takes as uint8 codes (graph.codes_input), and several inputs."""

import numpy as np
import onnx
from onnx import TensorProto, helper

import qat_models as qm
from onnxqat.fusion.api import fuse


def _normalised_then_quantized(r: int = 255):
    """(x - 127.5) / 128 -> signed LSQ -> conv: the QAT model quantizes its own input (any value range)."""
    b = qm.QatBuilder(9)
    x = b.op("Sub", ["input", b.init("mean", np.array(127.5, np.float32))], "centred")
    x = b.op("Div", [x, b.init("std", np.array(128.0, np.float32))], "norm")
    b._lsq("norm_aquant", x, "norm_q", np.array([1 / 128], np.float32), r, 1)
    x = b.sat_act("relu1", b.bn("bn1", b.conv("conv1", "norm_q", 3, 4), 4), "relu1_out", 1.7)
    return b.model(["N", 3, 6, 6], b.gemm("fc", b.op("Flatten", [x], "flat", axis=1), 4 * 36, 5), ["N", 5])


def _input_type(model):
    return {i.name: i.type.tensor_type.elem_type for i in model.graph.input}


def test_first_layer_reading_the_image_takes_uint8_codes():
    res = fuse(qm.conv_bn_sat(), check=False)
    assert _input_type(res.model) == {"input": TensorProto.UINT8}
    meta = {p.key: p.value for p in res.model.metadata_props}
    assert meta["onnxqat.codes_input"] == "input" and float(meta["onnxqat.input_scale"]) == 1 / 255


def test_self_quantized_input_stays_float_whatever_its_range():
    """Pixels 0..255 (not the 1/255 codes fuse would otherwise assume): the fused model takes the same floats and
    quantizes them as the QAT model does; identical codes."""
    qat = _normalised_then_quantized()
    x = np.random.default_rng(3).integers(0, 256, (64, 3, 6, 6)).astype(np.float32)
    for fmt in ("int", "ort", "qdq"):
        res = fuse(qat, format=fmt, verify_data=x, strict=True)
        assert _input_type(res.model) == {"input": TensorProto.FLOAT}
        assert "onnxqat.codes_input" not in {p.key for p in res.model.metadata_props}
        assert res.agreement.activations["norm_q"] == 1.0


def test_input_type_uint8_forces_codes():
    res = fuse(_normalised_then_quantized(), input_type="uint8", input_scale=1.0, verify_samples=32, strict=True)
    assert _input_type(res.model) == {"input": TensorProto.UINT8}


def test_state_input_stays_float_and_outputs_are_all_there():
    """A second input (a recurrent state added to a layer's output) stays float; both outputs come out."""
    b = qm.QatBuilder(11)
    x = b.sat_act("relu1", b.bn("bn1", b.conv("conv1", "input", 1, 4), 4), "relu1_out", 2.0)
    h = b.gemm("fc", b.op("Flatten", [x], "flat", axis=1), 4 * 64, 6)
    y = b.op("Add", [h, "state"], "h_out")
    m = b.model(["N", 1, 8, 8], y, ["N", 6])
    m.graph.input.append(helper.make_tensor_value_info("state", TensorProto.FLOAT, ["N", 6]))
    m.graph.output.append(helper.make_tensor_value_info("fc_out", TensorProto.FLOAT, ["N", 6]))
    onnx.checker.check_model(m)
    res = fuse(m, verify_samples=32)
    assert _input_type(res.model) == {"input": TensorProto.UINT8, "state": TensorProto.FLOAT}
    # h_out is float (a sum with a float state): compared in units of 1e-6 of its range, float32 rounding apart
    assert res.agreement.top1_agreement == 1.0 and res.agreement.max_code_diff <= 1
    assert [o.name for o in res.model.graph.output] == ["h_out", "fc_out"]
