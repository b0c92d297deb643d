"""Integer-only fusion of small QAT models: graph properties, runtimes agree bit for bit, codes equal fake-quant's."""

import numpy as np
import onnx
import pytest
from onnx import TensorProto, shape_inference
from onnx.reference import ReferenceEvaluator

import qat_models as qm
from onnxqat.fusion.api import fuse
from onnxqat.ops.reference import reference_ops
from onnxqat.ops.schema import DOMAIN

MODELS = {
    "conv_bn_sat4": lambda: qm.conv_bn_sat(15, 15),
    "conv_bn_sat8": lambda: qm.conv_bn_sat(255, 255),  # 8-bit DoReFa: codes 2k-255 need the box-sum form
    "residual4": lambda: qm.residual(),
    "lsq_per_channel4": lambda: qm.lsq_per_channel(15),
    "lsq_per_channel8": lambda: qm.lsq_per_channel(255),
    # input normalisation, ReLU6 before LSQ, signed linear bottleneck + residual, GlobalAveragePool
    "mobile_block8": lambda: qm.mobile_block(255),
    "mobile_block4": lambda: qm.mobile_block(15),
    "gemm_bn1d_lsq8": lambda: qm.gemm_bn1d(255, "lsq"),
}
INTEGER = {TensorProto.UINT8, TensorProto.INT8, TensorProto.INT32, TensorProto.INT64, TensorProto.UINT64,
           TensorProto.UINT32, TensorProto.INT16, TensorProto.UINT16}
N = 64


def codes_in(model, n=N, seed=11):
    dims = [d.dim_value for d in model.graph.input[0].type.tensor_type.shape.dim][1:]
    return np.random.default_rng(seed).integers(0, 256, size=[n] + dims, dtype=np.uint8)


def run_ort(model, x):
    import onnxruntime as ort

    return ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, {"input": x})[0]


def fake_quant(model, codes):
    x = (codes.astype(np.float32) * np.float32(1 / 255)).astype(np.float32)
    return ReferenceEvaluator(model, new_ops=reference_ops()).run(None, {"input": x})[0]


@pytest.fixture(scope="module", params=sorted(MODELS))
def case(request):
    qat = MODELS[request.param]()
    res = fuse(qat, check=False)
    codes_res = fuse(qat, check=False, dequantize_output=False)  # int32 output codes as the graph output
    x = codes_in(qat)
    return request.param, qat, res, codes_res, x, fake_quant(qat, x)


def test_graph_is_integer_only_standard_ops(case):
    name, qat, res, codes_res, x, fq = case
    m = res.model
    ops = {n.op_type for n in m.graph.node}
    assert "BatchNormalization" not in ops
    assert all(n.domain in ("", "ai.onnx") for n in m.graph.node)
    assert [o.domain for o in m.opset_import] == [""]
    assert {"ConvInteger", "MatMulInteger"} & ops
    inferred = shape_inference.infer_shapes(codes_res.model, strict_mode=True, data_prop=True)
    g = inferred.graph
    assert g.input[0].type.tensor_type.elem_type == TensorProto.UINT8
    assert g.output[0].type.tensor_type.elem_type == TensorProto.INT32
    typed = list(g.value_info) + list(g.output)
    assert len(typed) >= len(g.node)  # every node output got a type
    floats = [v.name for v in typed if v.type.tensor_type.elem_type not in INTEGER]
    assert floats == []
    assert all(t.data_type in INTEGER for t in g.initializer)
    # with the final dequantize, only the graph output is float
    g2 = shape_inference.infer_shapes(m, strict_mode=True).graph
    assert [v.name for v in list(g2.value_info) + list(g2.output) if v.type.tensor_type.elem_type not in INTEGER] == \
        [o.name for o in g2.output]


def test_onnxruntime_and_reference_agree_bit_for_bit(case):
    import onnxruntime as ort

    name, qat, res, codes_res, x, fq = case
    x = x[:16]  # onnx.reference's integer convolution is slow
    for r in (res, codes_res):
        sess = ort.InferenceSession(r.model.SerializeToString(), providers=["CPUExecutionProvider"])
        a = sess.run(None, {"input": x})[0]
        b = ReferenceEvaluator(r.model).run(None, {"input": x})[0]
        assert a.dtype == b.dtype and np.array_equal(a, b)


def test_fused_codes_equal_fake_quant(case):
    name, qat, res, codes_res, x, fq = case
    fused_codes = run_ort(codes_res.model, x)  # int32 codes in last-layer steps (ORT == onnx.reference: test above)
    unit = codes_res.outputs[0].scale.reshape(1, -1)
    assert fused_codes.dtype == np.int32
    assert np.mean(np.round(fq / unit) == fused_codes) >= 0.999
    fused = run_ort(res.model, x)
    assert np.array_equal(np.argmax(fused, 1), np.argmax(fq, 1))
    # dequantized logits: within half a step of the last layer (the bias is kept to 2^-k of a step)
    assert np.max(np.abs(fused - fq) / unit) <= 0.5 + 1e-3


def test_activation_codes_equal_fake_quant_layer_by_layer():
    """Every intermediate activation code of conv_bn_sat equals the fake-quantized model's, element for element."""
    qat = qm.conv_bn_sat(15, 15)
    res = fuse(qat, check=False)
    x = codes_in(qat)
    names = {"relu1_out": 2.11 / 15, "relu2_out": 2.93 / 15}
    probe = onnx.ModelProto()
    probe.CopyFrom(qat)
    fused = onnx.ModelProto()
    fused.CopyFrom(res.model)
    for n in names:
        probe.graph.output.append(onnx.helper.make_tensor_value_info(n, TensorProto.FLOAT, None))
        fused.graph.output.append(onnx.helper.make_tensor_value_info(f"{n}_codes", TensorProto.UINT8, None))
    xf = (x.astype(np.float32) / np.float32(255)).astype(np.float32)
    fq = ReferenceEvaluator(probe, new_ops=reference_ops()).run(None, {"input": xf})
    got = ReferenceEvaluator(fused).run(None, {"input": x})
    for i, (n, s) in enumerate(names.items()):
        want = np.round(fq[1 + i] / np.float32(s))
        assert got[1 + i].dtype == np.uint8
        assert np.mean(want == got[1 + i]) >= 0.999, n
        assert got[1 + i].max() <= 15 and got[1 + i].max() > 0


@pytest.mark.parametrize("rescale", ["fixed-point", "float"])
def test_builtin_self_check_reports_agreement(rescale):
    res = fuse(qm.residual(), rescale=rescale, verify_samples=32, strict=True)
    a = res.agreement
    assert a.samples == 32 and a.max_code_diff == 0 and a.top1_agreement == 1.0 and a.code_agreement == 1.0
    assert "max output code difference 0" in res.summary()


def test_float_input_option_quantizes_in_graph():
    qat = qm.conv_bn_sat(15, 15)
    res = fuse(qat, input_type="float", check=False)
    assert res.model.graph.input[0].type.tensor_type.elem_type == TensorProto.FLOAT
    assert res.model.graph.node[0].op_type == "QuantizeLinear"
    x = codes_in(qat)
    a = ReferenceEvaluator(res.model).run(None, {"input": (x / np.float32(255)).astype(np.float32)})[0]
    b = ReferenceEvaluator(fuse(qat, check=False).model).run(None, {"input": x})[0]
    assert np.array_equal(a, b)


def _pool_model(op):
    b = qm.QatBuilder(5)
    x = b.sat_act("relu1", b.bn("bn1", b.conv("conv1", "input", 3, 8), 8), "relu1_out", 1.93)
    x = b.op(op, [x], "pooled", **({"size": 3} if op == "LRN" else {}))
    x = b.sat_act("pooledq", x, "pooled_q", 0.71)
    x = b.op("Flatten", [x], "flat", axis=1)
    return b.model(["N", 3, 6, 6], b.gemm("fc", x, 8 * (36 if op in ("Sigmoid", "LRN") else 1), 4), ["N", 4])


@pytest.mark.parametrize("r", [15, 255])
def test_global_average_pool_then_gemm_without_quantizer(r):
    """GAP -> Flatten -> Gemm (the classifier head): Gemm as a 1x1 ConvInteger on the codes, then an int32 sum."""
    b = qm.QatBuilder(6)
    x = b.sat_act("relu1", b.bn("bn1", b.conv("conv1", "input", 3, 8, r=r), 8), "relu1_out", 1.93, r)
    x = b.op("Flatten", [b.op("GlobalAveragePool", [x], "gap")], "flat", axis=1)
    qat = b.model(["N", 3, 6, 6], b.gemm("fc", x, 8, 4, r=r, fan_out=4), ["N", 4])
    res = fuse(qat, verify_samples=64, strict=True)
    ops = [n.op_type for n in res.model.graph.node]
    assert ops.count("ConvInteger") >= 2 and "MatMulInteger" not in ops and "ReduceSum" in ops


def test_global_average_pool_sums_codes_in_int32():
    res = fuse(_pool_model("GlobalAveragePool"), verify_samples=32, strict=True)
    assert "ReduceSum" in {n.op_type for n in res.model.graph.node}
    assert res.agreement.min_activation_agreement == 1.0


def test_float_island_where_no_integer_form():
    """An op without integer lowering is kept in float between Dequantize/Quantize by itself (named in the summary),
    or named in the error with integer_only."""
    qat = _pool_model("LRN")
    from onnxqat.errors import FuseError

    with pytest.raises(FuseError, match="--integer-only: 1 node.*LRN 'pooled'"):
        fuse(qat, check=False, integer_only=True)
    res = fuse(qat, verify_samples=32)
    assert res.kept_float == ["pooled"] and res.integer_nodes == res.lowered_nodes - 1
    ops = [n.op_type for n in res.model.graph.node]
    i = ops.index("LRN")
    assert ops[i - 1] == "DequantizeLinear" and "QuantizeLinear" in ops[i + 1:i + 3]
    assert res.agreement.top1_agreement == 1.0 and res.agreement.code_agreement >= 0.999


def test_mobile_block_lowering_details():
    """Input normalisation -> ConvInteger x_zero_point 127 (scale 1/128); signed codes stored as u = c + 128."""
    res = fuse(qm.mobile_block(255), verify_samples=32, strict=True)
    m = res.model
    inits = {t.name: onnx.numpy_helper.to_array(t) for t in m.graph.initializer}
    stem = next(n for n in m.graph.node if n.op_type == "ConvInteger")
    assert stem.input[0] == "input" and int(inits[stem.input[2]]) == 127
    assert not {"Mul", "Sub"} & {n.op_type for n in m.graph.node if "input" in n.input}
    proj_in = [n for n in m.graph.node if n.op_type == "ConvInteger" and n.input[0].startswith("bn_pw_out_q")]
    assert len(proj_in) == 1 and int(inits[proj_in[0].input[2]]) == 128  # the signed bottleneck codes' zero point
    assert res.agreement.activations["bn_pw_out_q"] == 1.0 and res.agreement.activations["gap_q"] == 1.0


def test_conv_transpose_named_or_kept_float():
    """ConvTranspose kept in float runs on its fake-quantized weights and its BatchNormalization stays float too,
    between DequantizeLinear and the next quantizer's QuantizeLinear; integer_only names it."""
    from onnx import helper

    from onnxqat.errors import FuseError

    b = qm.QatBuilder(8)
    x = b.sat_act("relu1", b.bn("bn1", b.conv("conv1", "input", 1, 4), 4), "relu1_out", 1.77)
    w = (b.rng.standard_normal((4, 3, 2, 2)) * 0.3).astype(np.float32)
    b.init("up.weight", w)
    wq = b.sat_weight("up", "up.weight", 15)
    b.nodes.append(helper.make_node("ConvTranspose", [x, wq], ["up_out"], name="up", strides=[2, 2]))
    x = b.sat_act("relu2", b.bn("bn_up", "up_out", 3), "relu2_out", 1.41)
    x = b.op("Flatten", [x], "flat", axis=1)
    qat = b.model(["N", 1, 4, 4], b.gemm("fc", x, 3 * 8 * 8, 5), ["N", 5])
    with pytest.raises(FuseError, match="ConvTranspose 'up'"):
        fuse(qat, check=False, keep_float=["up"], integer_only=True)
    res = fuse(qat, keep_float=["up"], verify_samples=32)
    ops = [n.op_type for n in res.model.graph.node]
    assert "ConvTranspose" in ops and "BatchNormalization" in ops and res.kept_float == ["up", "bn_up"]
    assert res.agreement.top1_agreement == 1.0 and res.agreement.min_activation_agreement >= 0.999


def test_accuracy_check_one_liner(tmp_path):
    """The trained-LeNet check: top-1 of fake-quant and fused on a labelled set (here labels = a noisy argmax)."""
    from onnxqat.fusion import accuracy_check

    qat = qm.conv_bn_sat(15, 15)
    fused_path = tmp_path / "m.int.onnx"
    fuse(qat, fused_path, check=False)
    x = codes_in(qat, 200, seed=3)
    labels = np.argmax(fake_quant(qat, x), 1)
    labels[::4] = (labels[::4] + 1) % 10  # a quarter wrong: top-1 75 %
    r = accuracy_check(qat, str(fused_path), x, labels, batch=64)
    assert r["top1_fake_quant"] == pytest.approx(75.0) and r["diff_points"] <= 0.05 and r["top1_agreement"] == 1.0


def test_batchnorm_after_residual_add_folds():
    """Pre-activation style: conv-bn + skip -> Add -> BatchNormalization -> SatAct: the BN scales both branches."""
    b = qm.QatBuilder(12)
    a = b.sat_act("relu0", b.bn("bn0", b.conv("conv0", "input", 3, 6), 6), "relu0_out", 2.07)
    h = b.conv("conv1", a, 6, 6)
    s = b.op("Add", [h, a], "add")
    y = b.sat_act("relu1", b.bn("bn_add", s, 6), "relu1_out", 2.61)
    f = b.op("Flatten", [y], "flat", axis=1)
    qat = b.model(["N", 3, 4, 4], b.gemm("fc", f, 6 * 16, 5), ["N", 5])
    res = fuse(qat, verify_samples=64, strict=True)
    assert "BatchNormalization" not in {n.op_type for n in res.model.graph.node}


def test_fixed_batch_model_verifies_in_chunks():
    qat = qm.conv_bn_sat()
    for vi in (qat.graph.input[0], qat.graph.output[0]):
        vi.type.tensor_type.shape.dim[0].dim_value = 1
    res = fuse(qat, verify_samples=8, strict=True)
    assert res.agreement.samples == 8
    assert res.model.graph.input[0].type.tensor_type.shape.dim[0].dim_value == 1


def test_softmax_tail_stays_float_after_the_last_dequantize():
    b = qm.QatBuilder(13)
    x = b.sat_act("relu1", b.bn("bn1", b.conv("conv1", "input", 1, 4), 4), "relu1_out", 2.03)
    x = b.op("Flatten", [x], "flat", axis=1)
    x = b.op("Softmax", [b.gemm("fc", x, 4 * 8 * 8, 10, fan_out=10)], "probs", axis=1)
    res = fuse(b.model(["N", 1, 8, 8], x, ["N", 10]), verify_samples=32)
    ops = [n.op_type for n in res.model.graph.node]
    assert ops[-1] == "Softmax" and res.kept_float == ["probs"] and res.islands == []
    assert res.agreement.top1_agreement == 1.0


def test_top_level_api_stays_callable():
    import onnxqat

    first = onnxqat.fuse(qm.conv_bn_sat(), check=False)
    second = onnxqat.fuse(qm.conv_bn_sat(), check=False)  # the attribute is the package by now: still callable
    assert first.size == second.size
