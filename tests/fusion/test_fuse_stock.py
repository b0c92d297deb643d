"""Fused models on the latest stock onnxruntime (second venv, no op library, no training build) and the QDQ export."""

import os

import numpy as np
import pytest
from onnx.reference import ReferenceEvaluator

import qat_models as qm
from onnxqat.fusion.api import fuse
from onnxqat.fusion import stock
from test_fuse_int import MODELS, codes_in, fake_quant


@pytest.fixture(scope="module")
def stock_env():
    try:
        py = stock.stock_python(create=True)
    except Exception as exc:  # no network and no env: say so
        if os.environ.get("CI"):
            raise
        pytest.skip(f"stock onnxruntime env unavailable: {exc}")
    return py


@pytest.mark.parametrize("name", sorted(MODELS))
def test_int_model_runs_on_stock_onnxruntime_bit_for_bit(stock_env, tmp_path, name):
    qat = MODELS[name]()
    res = fuse(qat, tmp_path / "m.onnx", check=False, dequantize_output=False)
    x = codes_in(qat, 16)
    (out,), version = stock.run_stock(tmp_path / "m.onnx", {"input": x})
    assert tuple(int(v) for v in version.split(".")[:2]) >= (1, 20), version  # not the training package's 1.19
    want = ReferenceEvaluator(res.model).run(None, {"input": x})[0]
    assert out.dtype == want.dtype == np.int32 and np.array_equal(out, want)


@pytest.mark.parametrize("name", ["conv_bn_sat4", "residual4", "lsq_per_channel8", "mobile_block8", "gemm_bn1d_lsq8"])
def test_qdq_export(stock_env, tmp_path, name):
    qat = MODELS[name]()
    res = fuse(qat, tmp_path / "q.onnx", format="qdq", check=False)
    ops = {n.op_type for n in res.model.graph.node}
    assert {"QuantizeLinear", "DequantizeLinear"} <= ops
    assert "BatchNormalization" not in ops and all(n.domain == "" for n in res.model.graph.node)
    assert not ops & {"ConvInteger", "MatMulInteger"}
    x = codes_in(qat, 32)
    xf = (x.astype(np.float32) / np.float32(255)).astype(np.float32)
    fq = fake_quant(res.reference, x)  # the bias-snapped QAT model (snap_bias.py)
    unit = res.outputs[0].scale.reshape(1, -1)
    # the graph's own semantics: onnx.reference and stock onnxruntime without graph rewrites equal fake-quant's codes
    ref = ReferenceEvaluator(res.model).run(None, {"input": xf})[0]
    (plain,), _ = stock.run_stock(tmp_path / "q.onnx", {"input": xf}, optimize=False)
    for out in (ref, plain):
        assert np.array_equal(np.argmax(out, 1), np.argmax(fq, 1))
        assert np.mean(np.round(out / unit) == np.round(fq / unit)) >= 0.999
    # onnxruntime's QDQ optimizer (QLinearConv etc.) adds the biases as int32 at x_scale*w_scale: on the snapped
    # grid, so its activations are the fake-quant's too (up to float32 requantization rounding)
    (opt,), _ = stock.run_stock(tmp_path / "q.onnx", {"input": xf})
    assert np.array_equal(np.argmax(opt, 1), np.argmax(fq, 1))
    assert np.mean(np.round(opt / unit) == np.round(fq / unit)) >= 0.999
    import onnxruntime as ort  # the training package's 1.19.2 runs it as well (int4 DequantizeLinear)

    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    local = ort.InferenceSession(res.model.SerializeToString(), so).run(None, {"input": xf})[0]
    np.testing.assert_allclose(local, plain, rtol=0, atol=1e-5 * np.max(np.abs(plain)))
