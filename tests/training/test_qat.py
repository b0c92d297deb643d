"""Training graphs with quantizer ops (needs the compiled op library)."""

import numpy as np
import onnx
import pytest
from onnx import numpy_helper

from onnxqat.training.run import train
from train_helpers import FASHION, synthetic_npz

QUIET = dict(progress=False, histograms=False, log=lambda *_: None, threads=1)


@pytest.fixture(scope="module", autouse=True)
def _library():
    from onnxqat.errors import OpLibraryError

    try:
        from onnxqat.ops.library import library_path

        library_path()
    except (OpLibraryError, ImportError) as exc:
        pytest.skip(f"quantizer op library not available: {exc}")


def _inits(model):
    return {i.name: numpy_helper.to_array(i) for i in model.graph.initializer}


@pytest.fixture
def lenet():
    from onnxqat.models.lenet import build_lenet

    return build_lenet(0)


pytestmark = pytest.mark.skipif(not FASHION.is_dir(), reason="dataset-fashion-mnist not installed")
DATA = dict(limit_train=1200, limit_test=400, validation=0.1, batch_size=64)


def test_lsq_trains_steps_with_their_own_lr(tmp_path, lenet):
    from onnxqat.passes.insert import insert

    qat = insert(lenet, "lsq4")
    start = _inits(qat)
    res = train(qat, "fashion-mnist", epochs=2, out=tmp_path / "a", lr=0.02, quantizer_lr=0.0,
                init_quantizers=False, **DATA, **QUIET)
    t = _inits(onnx.load(str(res.model_path)))
    steps = [n for n in t if n.endswith(".step")]
    assert len(steps) == 9  # 5 weight + 4 activation quantizers
    for n in steps:  # quantizer lr 0: steps frozen, everything else trains
        np.testing.assert_array_equal(t[n], start[n])
    assert not np.allclose(t["conv1.weight"], start["conv1.weight"])
    assert res.test_top1 > 40.0
    res2 = train(qat, "fashion-mnist", epochs=1, out=tmp_path / "b", lr=0.02, quantizer_lr=0.02, **DATA, **QUIET)
    t2 = _inits(onnx.load(str(res2.model_path)))
    assert any(not np.allclose(t2[n], start[n]) for n in steps)


def test_two_stage_recipe_and_init_from(tmp_path, lenet):
    said = []
    # sat4: SatActQuant replaces the Relus before the MaxPools (ORT needs the quantizer outputs' shapes there)
    res = train(lenet, "fashion-mnist", recipe="sat4", epochs=1, out=tmp_path / "two", **DATA,
                **{**QUIET, "log": said.append})
    assert (tmp_path / "two" / "stage1" / "model.onnx").is_file() and len(res.stages) == 1
    assert any(s.startswith("stage 2: recipe sat4 ") for s in said)
    s1 = _inits(onnx.load(str(tmp_path / "two" / "stage1" / "model.onnx")))
    m2 = onnx.load(str(res.model_path))
    modes = {n.name: int(v) for n, v in ((i, numpy_helper.to_array(i)) for i in m2.graph.initializer)
             if n.name.endswith("_wquant.mode")}
    assert set(modes.values()) == {1}  # phase two quantizes the weights
    s1_modes = {k: int(v) for k, v in s1.items() if k.endswith("_wquant.mode")}
    assert set(s1_modes.values()) == {0}  # phase one clamps
    alphas = [k for k in _inits(m2) if k.endswith("_aquant.alpha")]
    assert len(alphas) == 4 and not any(k.endswith("_aquant.alpha") for k in s1)
    assert any(float(_inits(m2)[k].reshape(-1)[0]) != 6.0 for k in alphas)  # alpha trained from its 6.0 start
    np.testing.assert_array_equal(_inits(m2)["conv1.weight"].shape, s1["conv1.weight"].shape)
    # init-from: the phase-two model, started from phase one's weights by name, as a separate command
    from onnxqat.passes.insert import insert

    said.clear()
    r = train(insert(lenet, "sat4-weights"), "fashion-mnist", epochs=1, out=tmp_path / "sep",
              init_from=tmp_path / "two" / "stage1" / "model.onnx", **DATA, **{**QUIET, "log": said.append})
    assert any(s.startswith("initialised") for s in said) and r.test_top1 is not None
    # init-from with a recipe: weights from phase one, the recipe's own quantizer constants (mode 1, not phase one's 0)
    r2 = train(lenet, "fashion-mnist", recipe="sat4", epochs=1, out=tmp_path / "sep2",
               init_from=tmp_path / "two" / "stage1" / "model.onnx", max_iterations=1, **DATA, **QUIET)
    t2 = _inits(onnx.load(str(r2.model_path)))
    assert {int(v) for k, v in t2.items() if k.endswith("_wquant.mode")} == {1}
    assert not (tmp_path / "sep2" / "stage1").exists()  # init-from replaces the first stage
    w0 = s1["fc1.weight"]
    assert np.abs(t2["fc1.weight"] - w0).max() < np.abs(w0).max() * 0.5  # started from phase one (one update)
