"""End-to-end training on ORT: SGD against numpy, accumulation, resume, BN statistics, bad input."""

import json

import numpy as np
import onnx
import pytest
from onnx import numpy_helper

from onnxqat.errors import DataError, TrainingError
from onnxqat.training.checkpoint import load_checkpoint
from onnxqat.training.data import Batches, Dataset
from onnxqat.training.loop import TrainConfig, fit
from onnxqat.training.run import train
from train_helpers import FASHION, linear_model, small_cnn, synthetic_npz

QUIET = dict(progress=False, histograms=False, log=lambda *_: None, threads=1)


def _inits(path):
    return {i.name: numpy_helper.to_array(i) for i in onnx.load(str(path)).graph.initializer}


def softmax_regression_grads(X, Y, W, b):
    """Gradients of the mean cross-entropy of softmax(X W^T + b) against one-hot Y, in float64."""
    z = X @ W.T + b
    p = np.exp(z - z.max(1, keepdims=True))
    p /= p.sum(1, keepdims=True)
    d = (p - Y) / len(X)
    return d.T @ X, d.sum(0)


def test_momentum_sgd_matches_numpy(tmp_path):
    """Full-batch steps of momentum SGD with decay on a linear softmax classifier vs closed-form gradients."""
    rng = np.random.default_rng(0)
    n, k = 32, 4
    x = rng.standard_normal((n, 3, 4, 1)).astype(np.float32)
    y = rng.integers(0, k, n)
    model = linear_model(12, k)
    ds = Dataset(x, y, "lin")
    lr, mom, dec, steps = 0.2, 0.9, 0.01, 6
    cfg = TrainConfig(epochs=steps, batch_size=n, lr=lr, momentum=mom, decay=dec, seed=0, threads=1, eval_test=False)
    from onnxqat.training.transforms import Compose

    res = fit(model, cfg, Batches(ds, n, Compose([])), None, None, tmp_path, progress=False, log=lambda *_: None)
    W = numpy_helper.to_array(model.graph.initializer[0]).astype(np.float64)
    b = numpy_helper.to_array(model.graph.initializer[1]).astype(np.float64)
    X = x.reshape(n, -1).astype(np.float64)
    Y = np.eye(k)[y]
    vW, vb = np.zeros_like(W), np.zeros_like(b)
    for _ in range(steps):
        gW, gb = softmax_regression_grads(X, Y, W, b)
        vW = mom * vW + lr * (gW + dec * W)
        vb = mom * vb + lr * (gb + dec * b)
        W, b = W - vW, b - vb
    np.testing.assert_allclose(res.params["fc.weight"], W, rtol=2e-5, atol=2e-6)
    np.testing.assert_allclose(res.params["fc.bias"], b, rtol=2e-5, atol=2e-6)


def test_accumulation_2x64_equals_1x128(tmp_path):
    rng = np.random.default_rng(1)
    ds = Dataset(rng.standard_normal((128, 6, 6, 1)).astype(np.float32), rng.integers(0, 3, 128), "acc")
    from onnxqat.training.transforms import Compose

    out = {}
    for bs, it in ((128, 1), (64, 2)):
        cfg = TrainConfig(epochs=1, batch_size=bs, iteration_size=it, lr=0.5, momentum=0.9, decay=1e-3, threads=1)
        r = fit(small_cnn(0), cfg, Batches(ds, bs, Compose([])), None, None, tmp_path / f"{bs}x{it}",
                progress=False, log=lambda *_: None)
        assert r.metrics[-1]["iterations"] == 1
        out[bs] = r.params
    init = {i.name: numpy_helper.to_array(i) for i in small_cnn(0).graph.initializer}
    for name in ("conv.weight", "conv.bias", "fc.weight", "fc.bias"):
        assert not np.allclose(out[128][name], init[name])  # the step moved the parameters
        np.testing.assert_allclose(out[64][name], out[128][name], rtol=1e-5, atol=1e-7)


@pytest.fixture
def npz(tmp_path):
    return synthetic_npz(tmp_path / "d.npz", 256, seed=0)


def test_loss_falls_accuracy_beats_chance_bn_updates(tmp_path, npz):
    res = train(small_cnn(0, bn=True), npz, epochs=3, out=tmp_path / "run", batch_size=32, lr=0.05,
                validation=0.0, transforms=[], **QUIET)
    losses = [m["train_loss"] for m in res.metrics]
    assert losses[-1] < 0.7 * losses[0]
    assert res.test_top1 > 70.0  # 3 classes: chance is 33%
    trained = _inits(res.model_path)
    assert not np.allclose(trained["bn.mean"], 0.0) and not np.allclose(trained["bn.var"], 1.0)
    assert trained["bn.var"].min() > 0
    rows = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert [r["epoch"] for r in rows] == [1, 2, 3]
    header = (tmp_path / "run" / "metrics.csv").read_text().splitlines()[0]
    assert header.startswith("epoch,iterations,lr") and "images_per_s" in header
    for f in ("checkpoint_best.npz", "checkpoint_last.npz", "model_best.onnx"):
        assert (tmp_path / "run" / f).is_file()


@pytest.mark.skipif(not FASHION.is_dir(), reason="dataset-fashion-mnist not installed")
def test_lenet_fashion_mnist_slice(tmp_path):
    from onnxqat.models.lenet import build_lenet

    res = train(build_lenet(0), "fashion-mnist", epochs=2, out=tmp_path, batch_size=64, lr=0.05, momentum=0.9,
                limit_train=1500, limit_test=500, validation=0.1, histograms=True,
                **{k: v for k, v in QUIET.items() if k != "histograms"})
    assert res.metrics[-1]["train_loss"] < res.metrics[0]["train_loss"]
    assert res.test_top1 > 50.0  # 10 classes
    t = _inits(res.model_path)
    assert not np.allclose(t["bn1.mean"], 0.0) and not np.allclose(t["bn3.var"], 1.0)
    # Dropout stays in the exported model; the exported model runs and agrees with the reported accuracy
    m = onnx.load(str(res.model_path))
    assert [n.op_type for n in m.graph.node].count("Dropout") == 2
    assert len(list((tmp_path / "histograms").glob("*_weights_quant.distrib.png"))) == 5


def test_resume_equals_uninterrupted(tmp_path, npz):
    model = small_cnn(2, bn=True)
    kw = dict(epochs=3, batch_size=32, lr=0.05, momentum=0.9, decay=1e-4, lr_policy="cosine", validation=0.1,
              transforms=[], seed=5, **QUIET)
    full = train(model, npz, out=tmp_path / "full", **kw)
    # interrupted during epoch 2 (as by kill -9 after checkpoint 1), then resumed
    from onnxqat.training import loop

    real_fit = loop.fit
    import onnxqat.training.run as run_mod

    def interrupted_fit(*a, **k):
        return real_fit(*a, stop_after_batches=8 + 3, **k)  # 8 batches an epoch (230 samples / 32)

    run_mod.fit = interrupted_fit
    try:
        with pytest.raises(KeyboardInterrupt):
            train(model, npz, out=tmp_path / "cut", **kw)
    finally:
        run_mod.fit = real_fit
    _, _, meta = load_checkpoint(tmp_path / "cut" / "checkpoint_last.npz")
    assert meta["epoch"] == 1
    said = []
    resumed = train(model, npz, out=tmp_path / "cut", resume=True, **{**kw, "log": said.append})
    assert any(s.startswith("resuming after epoch 1 ") for s in said)
    assert len(resumed.metrics) == 3
    a, b = _inits(full.model_path), _inits(resumed.model_path)
    for name in a:
        np.testing.assert_array_equal(a[name], b[name], err_msg=name)
    assert [r["train_loss"] for r in full.metrics] == [r["train_loss"] for r in resumed.metrics]


def test_resume_refuses_other_config(tmp_path, npz):
    kw = dict(epochs=1, batch_size=32, validation=0.0, transforms=[], **QUIET)
    train(small_cnn(0), npz, out=tmp_path, lr=0.05, **kw)
    with pytest.raises(TrainingError, match="another model, data size or configuration"):
        train(small_cnn(0), npz, out=tmp_path, lr=0.01, resume=True, **kw)


def test_nan_loss_stops_and_keeps_last_good_checkpoint(tmp_path):
    good = synthetic_npz(tmp_path / "good.npz", 64, seed=0)
    z = dict(np.load(good))
    z["x_train"][40:] = np.nan  # 24 of 64 samples: the first shuffled batch of epoch 2 holds some
    np.savez(tmp_path / "bad.npz", **z)
    kw = dict(batch_size=32, validation=0.0, transforms=[], **QUIET)
    train(small_cnn(0), good, epochs=1, out=tmp_path / "r", **kw)
    before = (tmp_path / "r" / "checkpoint_last.npz").read_bytes()
    with pytest.raises(TrainingError, match=r"loss is nan at epoch 2, step 1: .* \(the batch holds \d+ NaN/inf "
                                            r"input value\(s\)\)$"):
        train(small_cnn(0), tmp_path / "bad.npz", epochs=2, out=tmp_path / "r", resume=True, **kw)
    assert (tmp_path / "r" / "checkpoint_last.npz").read_bytes() == before
    _, _, meta = load_checkpoint(tmp_path / "r" / "checkpoint_last.npz")
    assert meta["epoch"] == 1


def test_divergence_names_the_learning_rate(tmp_path, npz):
    """A model with a finite loss before training that reaches a non-finite loss or gradient: the error says the
    learning rate is the likely cause."""
    with pytest.raises(TrainingError, match=r"training stopped; last good checkpoint: .*\(the model had a finite "
                                            r"loss [0-9.]+ before training: the learning rate 1e\+30 is likely too "
                                            r"high; try a tenth of it\)"):
        train(small_cnn(0), npz, epochs=3, batch_size=32, lr=1e30, validation=0.0, transforms=[],
              out=tmp_path / "r", **QUIET)


def test_bad_inputs(tmp_path, npz):
    from onnxqat.models.lenet import build_lenet

    z = dict(np.load(npz))
    np.savez(tmp_path / "two_channels.npz", **{k: np.concatenate([v, v], axis=-1) if k.startswith("x") else v
                                               for k, v in z.items()})
    with pytest.raises(DataError, match=r"the data has 2 channel\(s\), the model input expects 1"):
        train(build_lenet(0), tmp_path / "two_channels.npz", epochs=1, out=tmp_path / "a", transforms=[],
              validation=0.0, **QUIET)
    z["y_train"][5] = 3
    np.savez(tmp_path / "lab.npz", **z)
    with pytest.raises(DataError, match="label 3 of sample 5 is out of range"):
        train(small_cnn(0), tmp_path / "lab.npz", epochs=1, out=tmp_path / "b", validation=0.0, **QUIET)
    m = small_cnn(0)
    frozen = onnx.helper.make_model(onnx.helper.make_graph(
        [onnx.helper.make_node("Flatten", ["input"], ["f"], axis=1),
         onnx.helper.make_node("Slice", ["f", "s", "e"], ["logits"])], "nt", [m.graph.input[0]],
        [onnx.helper.make_tensor_value_info("logits", onnx.TensorProto.FLOAT, ["N", 3])],
        [numpy_helper.from_array(np.array([0], np.int64), "s"), numpy_helper.from_array(np.array([3], np.int64), "e")]),
        opset_imports=[onnx.helper.make_opsetid("", 17)])
    with pytest.raises(TrainingError, match="no trainable parameter"):
        train(frozen, npz, epochs=1, out=tmp_path / "c", transforms=[], validation=0.0, **QUIET)
    from onnxqat.errors import ModelError

    with pytest.raises(ModelError, match="model not found"):
        train(tmp_path / "none.onnx", npz, epochs=1, out=tmp_path / "d", **QUIET)


def test_public_api_callable_after_submodule_import(tmp_path, npz):
    import onnxqat
    import onnxqat.fusion.api  # noqa: F401
    import onnxqat.training.data  # noqa: F401  (a submodule import must not shadow the function onnxqat.train)

    assert callable(onnxqat.train) and callable(onnxqat.fuse)

    res = onnxqat.train(small_cnn(0), npz, epochs=1, out=tmp_path, batch_size=64, validation=0.0, transforms=[],
                        **QUIET)
    assert res.model_path.is_file() and len(res.metrics) == 1


def test_max_iterations_adamw_warmup(tmp_path, npz):
    res = train(small_cnn(0), npz, epochs=5, max_iterations=3, out=tmp_path, batch_size=32, solver="adamw", lr=0.01,
                decay=0.01, warmup=1.0, lr_policy="step", validation=0.0, transforms=[], **QUIET)
    assert len(res.metrics) == 1 and res.metrics[0]["iterations"] == 3
    # warmup over one epoch (8 updates): the third update used lr * 3/8
    assert res.metrics[0]["lr"] == pytest.approx(0.01 * 3 / 8)
    res2 = train(small_cnn(0), npz, epochs=1, out=tmp_path / "it2", batch_size=32, iteration_size=3,
                 validation=0.0, transforms=[], **QUIET)
    assert res2.metrics[0]["iterations"] == 3  # 8 batches in groups of 3: 3 updates (the last one of 2 batches)


def test_pytorch_momentum_form_under_cosine_matches_numpy(tmp_path):
    """momentum_form="pytorch" through the training loop (ORT gradients) with a cosine schedule, against closed-form
    gradients and torch.optim.SGD's update written out in numpy."""
    import math

    rng = np.random.default_rng(0)
    n, k = 32, 4
    x = rng.standard_normal((n, 3, 4, 1)).astype(np.float32)
    y = rng.integers(0, k, n)
    model = linear_model(12, k)
    lr, mom, dec, steps = 0.2, 0.9, 0.01, 6
    cfg = TrainConfig(epochs=steps, batch_size=n, lr=lr, momentum=mom, decay=dec, seed=0, threads=1, eval_test=False,
                      lr_policy="cosine", momentum_form="pytorch")
    from onnxqat.training.transforms import Compose

    res = fit(model, cfg, Batches(Dataset(x, y, "lin"), n, Compose([])), None, None, tmp_path, progress=False,
              log=lambda *_: None)
    W = numpy_helper.to_array(model.graph.initializer[0]).astype(np.float64)
    b = numpy_helper.to_array(model.graph.initializer[1]).astype(np.float64)
    X, Y = x.reshape(n, -1).astype(np.float64), np.eye(k)[y]
    vW, vb = np.zeros_like(W), np.zeros_like(b)
    for t in range(steps):
        gW, gb = softmax_regression_grads(X, Y, W, b)
        lr_t = lr * (1 + math.cos(math.pi * t / steps)) / 2
        vW = mom * vW + (gW + dec * W)
        vb = mom * vb + (gb + dec * b)
        W, b = W - lr_t * vW, b - lr_t * vb
    np.testing.assert_allclose(res.params["fc.weight"], W, rtol=2e-5, atol=2e-6)
    np.testing.assert_allclose(res.params["fc.bias"], b, rtol=2e-5, atol=2e-6)


def test_norm_decay_keeps_decay_off_batchnorm(tmp_path, npz):
    """plan_training lists BatchNorm's scale and B as normalization parameters. Two runs with a large decay, one with
    norm_decay=0: only the other shrinks BN's scale (from 1)."""
    from onnxqat.training import artifacts as art

    plan = art.plan_training(small_cnn(0, bn=True))
    assert plan.norm_params == ["bn.scale", "bn.B"]
    kw = dict(epochs=2, batch_size=32, lr=0.05, momentum=0.0, decay=2.0, validation=0.0, transforms=[], **QUIET)
    off = train(small_cnn(0, bn=True), npz, out=tmp_path / "off", norm_decay=0.0, **kw)
    on = train(small_cnn(0, bn=True), npz, out=tmp_path / "on", **kw)
    s_off = _inits(off.model_path)["bn.scale"]
    s_on = _inits(on.model_path)["bn.scale"]
    # decay 2 at lr 0.05 multiplies a parameter by 0.9 each update, 0.9^16 = 0.19 (2 epochs of 8 updates)
    assert np.all(s_on < 0.5) and np.all(np.abs(s_off - 1.0) < 0.5), (s_on, s_off)


def test_train_recipe_with_calibration_data(tmp_path, npz):
    """train --recipe --calibration-data: the quantizers train inserts start where insert --calibration-data puts
    them (lr 0: the trained model holds the initial values); without a recipe the option is refused."""
    import warnings

    from onnxqat.errors import RecipeError
    from onnxqat.passes.insert import insert

    calib = np.random.default_rng(3).uniform(0, 4, (16, 1, 6, 6)).astype(np.float32)  # unlike the training data
    np.savez(tmp_path / "calib.npz", input=calib)
    r = train(small_cnn(0), npz, recipe="lsq4", calibration_data=tmp_path / "calib.npz", epochs=1, batch_size=32,
              lr=0.0, quantizer_lr=0.0, out=tmp_path / "r", validation=0.0, transforms=[], **QUIET)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        want = insert(small_cnn(0), "lsq4", calibration_data={"input": calib})
        uncalibrated = insert(small_cnn(0), "lsq4")
    got, want, unc = _inits(r.model_path), {t.name: numpy_helper.to_array(t) for t in want.graph.initializer}, \
        {t.name: numpy_helper.to_array(t) for t in uncalibrated.graph.initializer}
    assert got["relu_aquant.step"] == want["relu_aquant.step"] != unc["relu_aquant.step"]
    with pytest.raises(RecipeError, match="calibration_data .* is for the quantizers train inserts with a recipe"):
        train(small_cnn(0), npz, calibration_data=tmp_path / "calib.npz", epochs=1, out=tmp_path / "x", **QUIET)


@pytest.mark.parametrize("mode", ["fullrange", "asymmetric", "asymmetric-clamp"])
def test_n2d2_weight_modes_train(tmp_path, npz, mode):
    """The full-range and asymmetric SAT weight modes through ORT training (their gradient gain included): the
    weights move, the loss stays finite."""
    from onnxqat.passes.insert import insert
    from onnxqat.recipes import parse_recipe

    qat = insert(small_cnn(0, bn=True), parse_recipe(f'[weights]\nmode = "{mode}"\n[activations]\nenabled = false\n'))
    r = train(qat, npz, epochs=1, batch_size=32, lr=0.05, validation=0.0, transforms=[], out=tmp_path / "r", **QUIET)
    assert np.isfinite(r.metrics[-1]["train_loss"])
    assert not np.array_equal(_inits(r.model_path)["conv.weight"],
                              numpy_helper.to_array(next(t for t in qat.graph.initializer if t.name == "conv.weight")))


def test_integer_weights_train(tmp_path, npz):
    """weights.integer (N2D2 QWeight.Mode=Integer): the layer reads integer-valued weights (levels x R); the factor
    stays a constant through training (not a trained parameter), the float weights move, the loss stays finite."""
    from onnxqat.passes.insert import insert
    from onnxqat.recipes import parse_recipe

    qat = insert(small_cnn(0, bn=True), parse_recipe('[weights]\ninteger = true\n[activations]\nenabled = false\n'))
    factor = {t.name: numpy_helper.to_array(t) for t in qat.graph.initializer if t.name == "conv_wquant.restore_scale"}
    assert factor["conv_wquant.restore_scale"].reshape(-1).tolist() == [15.0]  # the conv a BatchNormalization follows
    r = train(qat, npz, epochs=1, batch_size=32, lr=0.05, validation=0.0, transforms=[], out=tmp_path / "r", **QUIET)
    assert np.isfinite(r.metrics[-1]["train_loss"])
    got = _inits(r.model_path)
    assert all(np.array_equal(got[k], v) for k, v in factor.items())
    assert not np.array_equal(got["conv.weight"],
                              numpy_helper.to_array(next(t for t in qat.graph.initializer if t.name == "conv.weight")))
