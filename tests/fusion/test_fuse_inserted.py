"""insert() -> fuse(): QAT graphs written by the insert passes (every shipped recipe) fuse to integer-only models whose
outputs equal the fake-quantized model's; the fake-quantized model also runs on onnxruntime with the op library."""

import warnings

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from onnxqat.fusion.api import fuse

insert_mod = pytest.importorskip("onnxqat.passes.insert")


def float_lenet(seed=0, batchnorm=True):
    rng = np.random.default_rng(seed)
    inits, nodes = [], []

    def p(name, shape, scale=0.3):
        inits.append(numpy_helper.from_array((rng.standard_normal(shape) * scale).astype(np.float32), name))
        return name

    def bn(name, x, c):
        if not batchnorm:
            return x
        for part, v in (("scale", rng.uniform(0.5, 1.5, c)), ("B", rng.standard_normal(c) * 0.2),
                        ("mean", rng.standard_normal(c) * 0.3), ("var", rng.uniform(0.5, 2, c))):
            inits.append(numpy_helper.from_array(v.astype(np.float32), f"{name}.{part}"))
        nodes.append(helper.make_node("BatchNormalization", [x] + [f"{name}.{q}" for q in ("scale", "B", "mean", "var")],
                                      [f"{name}_y"], name=name))
        return f"{name}_y"

    x = "input"
    nodes.append(helper.make_node("Conv", [x, p("c1.w", (6, 1, 3, 3))], ["c1_y"], name="conv1", pads=[1] * 4))
    nodes.append(helper.make_node("Relu", [bn("bn1", "c1_y", 6)], ["r1"], name="relu1"))
    nodes.append(helper.make_node("MaxPool", ["r1"], ["p1"], name="pool1", kernel_shape=[2, 2], strides=[2, 2]))
    nodes.append(helper.make_node("Conv", ["p1", p("c2.w", (12, 6, 3, 3))], ["c2_y"], name="conv2", pads=[1] * 4))
    nodes.append(helper.make_node("Relu", [bn("bn2", "c2_y", 12)], ["r2"], name="relu2"))
    nodes.append(helper.make_node("MaxPool", ["r2"], ["p2"], name="pool2", kernel_shape=[2, 2], strides=[2, 2]))
    nodes.append(helper.make_node("Flatten", ["p2"], ["f"], name="flat", axis=1))
    nodes.append(helper.make_node("Gemm", ["f", p("fc1.w", (32, 12 * 4 * 4), 0.1), p("fc1.b", (32,), 0.1)], ["h"],
                                  name="fc1", transB=1))
    nodes.append(helper.make_node("Relu", ["h"], ["hr"], name="relu3"))
    nodes.append(helper.make_node("Gemm", ["hr", p("fc2.w", (10, 32)), p("fc2.b", (10,), 0.1)], ["logits"],
                                  name="fc2", transB=1))
    g = helper.make_graph(nodes, "lenet", [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["N", 1, 16, 16])],
                          [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["N", 10])], inits)
    return helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)], ir_version=9)


@pytest.mark.parametrize("recipe", ["sat4", "sat8", "lsq4", "lsq8"])
def test_inserted_model_fuses_exactly(recipe):
    x = np.random.default_rng(1).integers(0, 256, (64, 1, 16, 16), dtype=np.uint8)
    calib = {"input": (x[:16] / np.float32(255)).astype(np.float32)}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        qat = insert_mod.insert(float_lenet(), recipe, calibration_data=calib)
    res = fuse(qat, verify_data=x, strict=recipe.endswith("4"))
    ops = {n.op_type for n in res.model.graph.node}
    assert "BatchNormalization" not in ops and all(n.domain == "" for n in res.model.graph.node)
    a = res.agreement
    assert a.samples == 64 and a.top1_agreement == 1.0
    assert len(a.activations) == 3 and a.min_activation_agreement >= 0.999
    if recipe.endswith("4"):
        assert a.max_code_diff == 0
    else:
        # at 8 bits the fake-quantized model's float32 rounding error moves ~0.01-0.1 % of the activation codes
        # across a rounding boundary (the fused model computes exactly); one moved code shifts every logit of its
        # sample by up to 255 steps of the last layer
        assert a.code_agreement >= 0.95


@pytest.mark.parametrize("fmt", ["int", "ort"])
def test_restored_scale_sat_weights_fuse_exactly(fmt):
    """Convs with no BatchNormalization after them get SAT's per-channel restore_scale (a Mul after the weight quantizer):
    fuse folds it into the layer's scale, and the fused model gives the fake-quantized model's codes exactly."""
    x = np.random.default_rng(1).integers(0, 256, (64, 1, 16, 16), dtype=np.uint8)
    calib = {"input": (x[:16] / np.float32(255)).astype(np.float32)}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        qat = insert_mod.insert(float_lenet(batchnorm=False), "sat4", calibration_data=calib)
    restores = [n for n in qat.graph.node if n.name.endswith("_wquant_restore")]
    assert sorted(n.name for n in restores) == ["conv1_wquant_restore", "conv2_wquant_restore"]
    res = fuse(qat, verify_data=x, strict=True, format=fmt)
    assert not any(n.domain == "com.onnxqat" or n.name.endswith("_restore") for n in res.model.graph.node)
    a = res.agreement
    assert a.samples == 64 and a.top1_agreement == 1.0 and a.max_code_diff == 0


@pytest.mark.parametrize("mode", ["quantize", "symmetric"])
@pytest.mark.parametrize("fmt", ["int", "ort"])
def test_integer_weights_fuse_exactly(mode, fmt):
    """weights.integer (N2D2 QWeight.Mode=Integer): the Mul by R (or floor(R/2)) after each weight quantizer is folded
    into the layer scale like restore_scale; the fused model gives the fake-quantized model's codes exactly."""
    from pathlib import Path

    from onnxqat.recipes import parse_recipe

    text = (Path(__file__).parents[2] / "recipes" / "sat4.toml").read_text()
    text = text.replace("[weights]", "[weights]\ninteger = true", 1).replace("apply_scaling = true", "apply_scaling = false")
    recipe = parse_recipe(text.replace('mode = "quantize"', f'mode = "{mode}"'))
    x = np.random.default_rng(1).integers(0, 256, (64, 1, 16, 16), dtype=np.uint8)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        qat = insert_mod.insert(float_lenet(), recipe, calibration_data={"input": (x[:16] / np.float32(255))})
    factor = 15 if mode == "quantize" else 7
    inits = {t.name: numpy_helper.to_array(t) for t in qat.graph.initializer}
    assert inits["conv1_wquant.restore_scale"].reshape(-1).tolist() == [255.0 if mode == "quantize" else 127.0]
    assert inits["conv2_wquant.restore_scale"].reshape(-1).tolist() == [float(factor)]  # BN after conv1, conv2
    assert inits["fc1_wquant.restore_scale"].size == 32  # no BN after the Gemms: restore_scale "auto" there
    res = fuse(qat, verify_data=x, strict=True, format=fmt)
    assert not any(n.domain == "com.onnxqat" or n.name.endswith("_restore") for n in res.model.graph.node)
    a = res.agreement
    assert a.samples == 64 and a.top1_agreement == 1.0 and a.max_code_diff == 0


def test_fake_quant_on_onnxruntime_with_op_library_matches_reference():
    """The fused model against the fake-quantized model run by onnxruntime + the compiled op library."""
    lib = pytest.importorskip("onnxqat.ops.library")
    try:
        so = lib.session_options()
    except Exception as exc:  # op library not built here
        pytest.skip(f"op library unavailable: {exc}")
    import onnxruntime as ort
    from onnx.reference import ReferenceEvaluator

    x = np.random.default_rng(2).integers(0, 256, (32, 1, 16, 16), dtype=np.uint8)
    xf = (x / np.float32(255)).astype(np.float32)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        qat = insert_mod.insert(float_lenet(), "sat4", calibration_data={"input": xf[:16]})
    fq = ort.InferenceSession(qat.SerializeToString(), so, providers=["CPUExecutionProvider"]).run(None, {"input": xf})[0]
    res = fuse(qat, check=False, dequantize_output=False)
    codes = ReferenceEvaluator(res.model).run(None, {"input": x})[0]
    unit = res.outputs[0].scale.reshape(1, -1)
    assert np.mean(np.round(fq / unit) == codes) >= 0.999


def test_verify_engine_onnxruntime():
    lib = pytest.importorskip("onnxqat.ops.library")
    try:
        lib.session_options()
    except Exception as exc:
        pytest.skip(f"op library unavailable: {exc}")
    x = np.random.default_rng(4).integers(0, 256, (32, 1, 16, 16), dtype=np.uint8)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        qat = insert_mod.insert(float_lenet(), "lsq4", calibration_data={"input": (x[:16] / np.float32(255)).astype(np.float32)})
    res = fuse(qat, verify_data=x, verify_engine="onnxruntime", strict=True)
    assert res.agreement.fake_quant_engine == "onnxruntime + op library"
    assert "fake-quant on onnxruntime + op library" in res.summary()


@pytest.mark.parametrize("recipe", ["sat4", "lsq4"])
def test_project_lenet_fuses(recipe):
    """The LeNet that training uses (onnxqat.models.lenet: Dropout included), untrained: same structure as example 01."""
    lenet = pytest.importorskip("onnxqat.models.lenet")
    x = np.random.default_rng(5).integers(0, 256, (32, 1, 28, 28), dtype=np.uint8)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        qat = insert_mod.insert(lenet.build_lenet(seed=0), recipe,
                                calibration_data={"input": (x[:16] / np.float32(255)).astype(np.float32)})
    res = fuse(qat, verify_data=x)
    assert set(res.weight_bits.values()) <= {4, 8} and res.size < 0.25 * len(qat.SerializeToString())
    a = res.agreement
    assert a.top1_agreement == 1.0 and a.min_activation_agreement >= 0.998
    # SAT's fake-quantized weights are float32(2*float32(k/R) - 1), off the grid 2k-R by an ulp; on this seed one
    # conv1 value sits 2.3e-7 of a code above a rounding boundary (checked in float64), falls below it with the exact
    # grid, and the flipped code moves a few later codes of that sample and so its logits
    assert a.code_agreement >= 0.95


@pytest.mark.parametrize("mode", ["fullrange", "asymmetric"])
@pytest.mark.parametrize("fmt", ["int", "ort"])
def test_n2d2_weight_modes_fuse_exactly(mode, fmt):
    """N2D2's FullRange and Asymmetric SAT weight modes: integer codes 2j - R (full range) and j in [-h-1, h]
    (asymmetric: an 8-bit weight is an int8, 2^bits levels), the fused model equal to the fake-quantized one."""
    from pathlib import Path

    from onnxqat.fusion.api import fuse as fuse_fn
    from onnxqat.recipes import parse_recipe

    text = (Path(__file__).parents[2] / "recipes" / "sat4.toml").read_text()
    recipe = parse_recipe(text.replace('mode = "quantize"', f'mode = "{mode}"'))
    x = np.random.default_rng(1).integers(0, 256, (64, 1, 16, 16), dtype=np.uint8)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        qat = insert_mod.insert(float_lenet(), recipe, calibration_data={"input": (x[:16] / np.float32(255))})
    modes = {int(onnx.numpy_helper.to_array(t)) for t in qat.graph.initializer if t.name.endswith("_wquant.mode")}
    assert modes == {3 if mode == "fullrange" else 4}
    res = fuse_fn(qat, verify_data=x, strict=True, format=fmt)
    a = res.agreement
    assert a.samples == 64 and a.top1_agreement == 1.0 and a.max_code_diff == 0
    if mode == "asymmetric":  # 4-bit layers use all 16 codes -8..7 of the grid (j in [-h-1, h], h = 7)
        from onnxqat.fusion.graph import QatGraph
        from onnxqat.fusion.weights import weight_codes

        g = QatGraph(qat)
        q = next(n for n in qat.graph.node if n.name == "conv2_wquant")
        codes = weight_codes(g, q, 0, 12)
        assert codes.int_min == -8 and codes.int_max == 7 and codes.bits == 4
        assert codes.w_int.min() >= -8 and codes.w_int.max() <= 7


def test_asymmetric_clamp_phase_is_not_fused():
    from pathlib import Path

    from onnxqat.errors import FuseError
    from onnxqat.recipes import parse_recipe

    text = (Path(__file__).parents[2] / "recipes" / "sat4.toml").read_text()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        qat = insert_mod.insert(float_lenet(), parse_recipe(text.replace('mode = "quantize"',
                                                                        'mode = "asymmetric-clamp"')))
    with pytest.raises(FuseError, match=r"is in clamp mode \(mode 5\): its weights are not quantized yet"):
        fuse(qat)
