"""Quantizer parameters (LSQ step, SAT alpha) stay positive under a huge quantizer learning rate."""

import numpy as np
import onnx
import pytest
from onnx import numpy_helper

from onnxqat.training.solver import QUANT_FLOOR_FRACTION, QUANT_FLOOR_MIN, Solver, quantizer_floor
from train_helpers import small_cnn, synthetic_npz

QUIET = dict(progress=False, histograms=False, log=lambda *_: None, threads=1)


def test_solver_clamps_quantizer_elements_only():
    mask = np.array([False, True, True, False])
    w0 = np.array([1.0, 0.5, 0.0, -2.0], np.float32)
    floor = quantizer_floor(w0, mask)
    np.testing.assert_array_equal(floor, np.float32([QUANT_FLOOR_FRACTION * 0.5, QUANT_FLOOR_MIN]))
    for kind in ("sgd", "adamw"):
        s = Solver(kind, 4, mask, momentum=0.0, quant_floor=floor)
        w = w0.copy()
        s.step(w, np.float32([10.0, 10.0, 10.0, 10.0]), lr=1.0, qlr=1e6)
        assert w[0] < 1.0 and w[3] < -2.0  # ordinary parameters are not clamped
        np.testing.assert_array_equal(w[1:3], floor)  # pushed below 0: held at the floor
    s = Solver("sgd", 4, mask, momentum=0.0, quant_floor=QUANT_FLOOR_MIN)  # one floor for all
    w = w0.copy()
    s.step(w, np.float32([0.0, 1.0, 0.0, 0.0]), lr=1.0)
    assert w[1] == np.float32(QUANT_FLOOR_MIN)
    s = Solver("sgd", 4, mask, momentum=0.0)  # no floor given: no clamp
    w = w0.copy()
    s.step(w, np.float32([0.0, 1.0, 0.0, 0.0]), lr=1.0)
    assert w[1] == np.float32(-0.5)


@pytest.mark.parametrize("recipe", ["lsq4", "sat4"])
def test_huge_quantizer_lr_does_not_crash(tmp_path, recipe):
    from onnxqat.errors import OpLibraryError

    try:
        from onnxqat.ops.library import library_path

        library_path()
    except (OpLibraryError, ImportError) as exc:
        pytest.skip(f"quantizer op library not available: {exc}")
    from onnxqat.passes.insert import insert
    from onnxqat.training.run import train

    qat = insert(small_cnn(0), recipe)
    start = {i.name: numpy_helper.to_array(i) for i in qat.graph.initializer}
    qnames = [n for n in start if n.endswith((".step", ".alpha"))]
    assert qnames
    npz = synthetic_npz(tmp_path / "d.npz", 128, seed=0)
    res = train(qat, npz, epochs=1, out=tmp_path / "run", batch_size=32, lr=0.01, quantizer_lr=1e6,
                validation=0.0, transforms=[], init_quantizers=False, **QUIET)  # floors from insert's values
    t = {i.name: numpy_helper.to_array(i) for i in onnx.load(str(res.model_path)).graph.initializer}
    moved = 0
    for n in qnames:
        floor = np.maximum(np.float32(QUANT_FLOOR_FRACTION) * np.abs(start[n]), np.float32(QUANT_FLOOR_MIN))
        assert np.all(t[n] >= floor), n
        moved += int(np.any(t[n] == floor))
    assert moved > 0  # the rate did push some parameter down to its floor
