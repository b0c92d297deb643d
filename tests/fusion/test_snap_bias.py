"""Bias snapping (snap_bias.py): the folded bias of each quantizer-read layer becomes a whole number of the format's
bias steps in the QAT model; the rest of the model is unchanged; fuse verifies against the snapped model."""

import numpy as np
import onnx
import pytest
from onnx import numpy_helper

import qat_models as qm
from onnxqat.fusion.api import fuse
from onnxqat.fusion.lowering import Lowerer
from onnxqat.ops.schema import is_quantizer


def _quantizer_read(model, tensor):
    """Whether an activation quantizer reads `tensor` (through Relu/Clip): the layers whose bias a kernel rounds."""
    consumers = {}
    for n in model.graph.node:
        for i in n.input:
            consumers.setdefault(i, []).append(n)
    while len(consumers.get(tensor, [])) == 1:
        n = consumers[tensor][0]
        if is_quantizer(n):
            return True
        if n.op_type not in ("Relu", "Clip"):
            return False
        tensor = n.output[0]
    return False


def _folded(model, fmt):
    """{layer: (folded bias, bias step)} of the layers whose bias the format's kernel rounds."""
    low = Lowerer(model, format=fmt).run()
    return {layer.base: (layer.bias, step) for layer, step in low.layers
            if step is not None and _quantizer_read(model, layer.out)}


@pytest.mark.parametrize("fmt", ["ort", "qdq"])
@pytest.mark.parametrize("build", [lambda: qm.conv_bn_sat(15, 15), qm.residual, lambda: qm.lsq_per_channel(255),
                                   lambda: qm.gemm_bn1d(15, "sat")], ids=["conv_bn_sat4", "residual4", "lsq8", "gemm"])
def test_snapped_biases_are_whole_steps(build, fmt):
    qat = build()
    res = fuse(qat, format=fmt, check=False)
    before, after = _folded(qat, fmt), _folded(res.reference, fmt)
    assert before.keys() == after.keys() and res.snap.layers > 0
    for name, (bias, step) in after.items():
        k = bias / np.abs(step)
        # whole steps, up to the float32 rounding of the stored BN beta / bias (1e-7 relative, in steps)
        assert np.all(np.abs(k - np.round(k)) < 1e-3), name
        moved = np.abs(bias - before[name][0]) / np.abs(step)
        assert np.all(moved <= 0.5 + 1e-3)


def test_only_bias_initializers_change():
    """Every initializer but BN's B is byte-identical: conv1 (one input channel: a float conv in the ort format) and
    the logits layer (no quantizer after it) keep theirs, no kernel rounds them."""
    qat = qm.conv_bn_sat(15, 15)
    ref = fuse(qat, format="ort", check=False).reference
    a = {t.name: numpy_helper.to_array(t) for t in qat.graph.initializer}
    b = {t.name: numpy_helper.to_array(t) for t in ref.graph.initializer}
    changed = sorted(n for n in a if not np.array_equal(a[n], b[n]))
    assert changed == ["bn2.B"] and a.keys() == b.keys()
    assert [n.op_type for n in qat.graph.node] == [n.op_type for n in ref.graph.node]


def test_shared_bias_initializer_is_copied():
    """bn1 and bn3 read one B initializer: each gets its own moved copy, the shared one is left as it was."""
    qat = qm.residual()
    for n in qat.graph.node:
        if n.name == "bn3":
            n.input[2] = "bn1.B"
    res = fuse(qat, format="ort", verify_samples=32)
    names = {n.name: n.input[2] for n in res.reference.graph.node if n.op_type == "BatchNormalization"}
    assert names["bn1"] == "conv1.snapped_bias" and names["bn3"] == "conv3.snapped_bias"
    before = {t.name: numpy_helper.to_array(t) for t in qat.graph.initializer}
    after = {t.name: numpy_helper.to_array(t) for t in res.reference.graph.initializer}
    assert np.array_equal(after["bn1.B"], before["bn1.B"]) and res.agreement.identical


def test_int_format_does_not_snap_and_is_exact():
    res = fuse(qm.residual(), format="int", verify_samples=64, strict=True)
    assert res.snap is None and res.reference is not None


def test_fused_matches_snapped_not_necessarily_trained():
    """The summary states how the snapped model differs from the trained one (fake-quant vs fake-quant)."""
    res = fuse(qm.conv_bn_sat(15, 15), format="ort", verify_samples=64)
    assert res.agreement.identical and res.snap_agreement is not None
    assert "moved to the int32 bias grid" in res.summary() and "fake-quant before/after" in res.summary()
