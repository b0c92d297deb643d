"""The self-check layer by layer: each layer of the fake-quantized model fed the fused model's codes of its inputs.

End to end, one rounding tie decided differently upstream moves codes downstream (BN folded, another summation order)
and compounds in deep networks; layer by layer, only a layer's own difference shows, so a lowering error in the
middle of a network is named at its quantizer while the layers before it stay exact."""

from __future__ import annotations

import numpy as np
import pytest
from onnx import numpy_helper

from onnxqat.fusion.api import FuseError, fuse
from onnxqat.fusion.lowering import Lowerer
from onnxqat.fusion.verify import verify
from tests.fusion import qat_models as qm


def _codes(model, n=64, seed=0):
    shape = [n] + [d.dim_value for d in model.graph.input[0].type.tensor_type.shape.dim[1:]]
    return np.random.default_rng(seed).integers(0, 256, shape).astype(np.uint8)


def test_layer_by_layer_agreement_is_exact_on_a_residual_network():
    qat = qm.residual()
    a = fuse(qat, verify_data=_codes(qat)).agreement
    assert set(a.local_activations) == set(a.activations)  # every quantizer with codes in the fused model
    assert a.local_code_agreement == 1.0 and min(a.local_activations.values()) == 1.0, a.summary()
    assert a.local_agreement == 1.0


def _move_relu3_bias(model, codes: int = 3) -> None:
    """Moves relu3's requantization bias by `codes` output codes (its fixed-point bias is in units of 2^-shift)."""
    init = {t.name: t for t in model.graph.initializer}
    shift = int(numpy_helper.to_array(init["relu3_out_shift"]).ravel()[0])
    t = init["relu3_out_bias"]
    v = numpy_helper.to_array(t)
    t.CopyFrom(numpy_helper.from_array(v + np.asarray(codes << shift, v.dtype), t.name))


def test_a_wrong_requantization_is_named_at_its_layer():
    """relu3 (after three exact quantizers) off by 3 codes: layer by layer only relu3 disagrees."""
    qat = qm.residual()
    low = Lowerer(qat, format="int").run()
    _move_relu3_bias(low.model)
    a = verify(qat, low.model, low.outputs, input_scale=1 / 255, data=_codes(qat), activation_codes=low.activation_codes)
    assert {k for k, v in a.local_activations.items() if v < 0.99} == {"relu3_out"}, a.local_activations
    assert all(a.local_activations[k] == 1.0 for k in ("relu0_out", "relu1_out", "relu2_out")), a.local_activations
    assert a.local_agreement < 0.9  # codes clipped to 0 or R stay put


def test_fuse_refuses_a_model_wrong_at_one_layer(monkeypatch):
    import onnxqat.fusion.api as api

    class Broken(Lowerer):
        def run(self):
            low = super().run()
            _move_relu3_bias(low.model)
            return low

    monkeypatch.setattr(api, "Lowerer", Broken)
    qat = qm.residual()
    with pytest.raises(FuseError, match="layer by layer.*agrees with the fake-quantized one on"):
        fuse(qat, format="int", verify_data=_codes(qat))
