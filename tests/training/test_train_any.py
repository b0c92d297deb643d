"""`onnxqat train` on models shaped like the ones people bring (issue 11), end to end on small hand-made models:
opset 11, several inputs and outputs, ops without an ORT gradient, NHWC, image folders of other sizes, no labels
(distillation), settings with their source, the evaluation before training and the warning after epoch 1,
quantizers initialised from data, LSQ weight step inits."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from any_models import keras_nhwc, two_in_three_out
from onnxqat.errors import DataError
from onnxqat.training.run import train

ROOT = Path(__file__).resolve().parents[2]
QUIET = dict(progress=False, histograms=False, threads=1)


@pytest.fixture(scope="module", autouse=True)
def _library():
    from onnxqat.errors import OpLibraryError

    try:
        from onnxqat.ops.library import library_path

        library_path()
    except (OpLibraryError, ImportError) as exc:
        pytest.skip(f"quantizer op library not available: {exc}")


def _inits(m):
    return {i.name: numpy_helper.to_array(i) for i in m.graph.initializer}


@pytest.fixture(scope="module")
def two_npz(tmp_path_factory):
    rng = np.random.default_rng(0)
    p = tmp_path_factory.mktemp("d") / "two.npz"
    np.savez(p, x=rng.uniform(0, 1, (160, 3, 8, 8)).astype(np.float32),
             state=rng.standard_normal((160, 4)).astype(np.float32))
    return p


def test_opset11_two_inputs_three_outputs_by_distillation(tmp_path, two_npz):
    from onnxqat.passes.insert import insert

    qat = insert(two_in_three_out(opset=11), "sat4-weights")
    given = qat.SerializeToString()
    said = []
    # SAT's restore_scale starts the quantized model close to the float one (loss 0.137, 7.17 without): AdamW, whose
    # steps do not grow with that model's gradients, takes it lower in 3 epochs (SGD momentum 0.9 at 0.01 overshoots)
    r = train(qat, two_npz, epochs=3, max_iterations=60, batch_size=8, solver="adamw", lr=1e-3, decay=0.0,
              out=tmp_path, log=said.append, **QUIET)
    assert qat.SerializeToString() == given  # the user's model is not edited
    assert "training graph converted from opset 11 to 13 (the model file keeps opset 11)" in said
    assert any(s.startswith("training graph: 2 node(s) changed so that ORT can differentiate them (HardSigmoid, "
                            "Resize;") for s in said)
    assert "loss: logits: MSE to the teacher + map: MSE to the teacher + state_out: MSE to the teacher" in said
    # the loss falls (same validation set before and after) and the parameters change
    assert r.metrics[-1]["val_loss"] < 0.95 * r.initial["loss"]
    out = onnx.load(str(r.model_path))
    assert out.opset_import[0].version == 11 and [n.op_type for n in out.graph.node] == \
        [n.op_type for n in qat.graph.node]
    before, after = _inits(qat), _inits(out)
    for name in ("c1.w", "c2.w", "fc.w", "m.w"):
        assert not np.allclose(before[name], after[name]), name


def test_user_given_teacher_and_constant_input(tmp_path, two_npz):
    """The teacher as a float ONNX file, and the state input as a constant instead of the .npz array."""
    from onnxqat.passes.insert import insert

    float_path = tmp_path / "float.onnx"
    onnx.save(two_in_three_out(), str(float_path))
    z = dict(np.load(two_npz))
    np.savez(tmp_path / "x_only.npz", x=z["x"])
    said = []
    r = train(insert(two_in_three_out(), "lsq8"), tmp_path / "x_only.npz", teacher=float_path, loss="l1",
              loss_outputs=("map", "logits:0.5"), inputs={"state": np.full(4, 0.5, np.float32)}, epochs=1,
              max_iterations=3, batch_size=16, out=tmp_path / "r", log=said.append, **QUIET)
    assert "loss: map: L1 to the teacher + logits: L1 to the teacher x 0.5" in said
    assert r.model_path.is_file()
    with pytest.raises(DataError, match=r"^model input state gets nothing: give it an array in the \.npz \(named "
                                        r"state\) or a constant \(--input state=VALUE\)$"):
        train(insert(two_in_three_out(), "lsq8"), tmp_path / "x_only.npz", distill=True, epochs=1, batch_size=16,
              out=tmp_path / "r2", log=lambda *_: None, **QUIET)


def _write_folder(root: Path, n_per_class: int, classes: int, size: int, labelled: bool = True):
    from PIL import Image

    rng = np.random.default_rng(1)
    for c in range(classes):
        d = root / f"class{c}" if labelled else root
        d.mkdir(parents=True, exist_ok=True)
        for k in range(n_per_class):
            a = rng.integers(0, 256, (size, size), dtype=np.uint8)
            Image.fromarray(a, mode="L").save(d / f"{c}_{k}.png")


def test_nhwc_model_from_a_folder_of_gray_images_of_another_size(tmp_path):
    """Keras-style NHWC input 12x12x3 with PReLU, bilinear Resize, trailing Softmax; 20x20 gray images in class
    folders: resized and made RGB on load, batches transposed to NHWC, cross-entropy on the Softmax's input."""
    from onnxqat.passes.insert import insert

    _write_folder(tmp_path / "imgs", 12, 4, 20)
    said = []
    r = train(insert(keras_nhwc(), "lsq8"), tmp_path / "imgs", epochs=1, batch_size=8, out=tmp_path / "r",
              log=said.append, **QUIET)
    assert "output probs is a Softmax: the loss takes its input logits (the logits)" in said
    assert "loss: probs (on its logits logits): cross-entropy with labels" in said
    assert r.test_top1 is not None and r.initial["top1"] is not None
    # unlabeled images (a flat folder): distillation without being asked
    _write_folder(tmp_path / "flat", 6, 4, 12, labelled=False)
    said.clear()
    r = train(insert(keras_nhwc(), "lsq8"), tmp_path / "flat", epochs=1, batch_size=8, out=tmp_path / "u",
              log=said.append, **QUIET)
    assert "loss: probs: MSE to the teacher" in said and r.test_top1 is None and r.test_loss is not None


def test_feeder_gives_nhwc_inputs_the_batch_transposed():
    from onnxqat.training import artifacts as art
    from onnxqat.training.feeds import Feeder
    from onnxqat.training.objective import Objective, resolve

    m = keras_nhwc()
    plan = art.plan_training(m, resolve(m, Objective()))
    x = np.arange(2 * 3 * 12 * 12, dtype=np.float32).reshape(2, 3, 12, 12)
    np.testing.assert_array_equal(Feeder(plan).model_inputs(x)["input"], x.transpose(0, 2, 3, 1))


def test_settings_sources_initial_evaluation_and_first_epoch_warning(tmp_path):
    from onnxqat.passes.insert import TRAIN_KEY, insert
    from onnxqat.recipes import load_recipe

    qat = insert(keras_nhwc(), "sat4")
    meta = {p.key: p.value for p in qat.metadata_props}
    assert json.loads(meta[TRAIN_KEY]) == json.loads(json.dumps(dict(load_recipe("sat4").train)))
    _write_folder(tmp_path / "imgs", 12, 4, 12)
    said = []
    train(qat, tmp_path / "imgs", batch_size=8, lr=200.0, out=tmp_path / "r", log=said.append, **QUIET)
    lines = "\n".join(said).splitlines()
    assert "  lr 200 (argument)" in lines and "  batch_size 8 (argument)" in lines
    assert "  momentum 0.9 (recipe sat4 [train], recorded by insert)" in lines
    assert "  iteration_size 2 (recipe sat4 [train], recorded by insert)" in lines
    assert "  epochs 1 (default)" in lines and "  transforms x /255 (default)" in lines
    before = next(k for k, s in enumerate(lines) if s.startswith("before training: val loss "))
    first = next(k for k, s in enumerate(lines) if s.startswith("epoch 1/1"))
    warn = next(k for k, s in enumerate(lines) if s.startswith("warning: after epoch 1 the model is far worse than "
                                                                 "before training on the val set ("))
    assert before < warn < first and "the learning rate (200) is likely too high" in lines[warn]


def test_first_epoch_warning_thresholds():
    from onnxqat.training.loop import first_epoch_warning

    init = {"set": "val", "loss": 1.0, "top1": 80.0}
    assert first_epoch_warning(init, 1.4, 76.0, 0.1) is None
    assert "top-1 80.00% -> 74.00%" in first_epoch_warning(init, 1.0, 74.0, 0.1)
    assert "loss 1 -> 1.6" in first_epoch_warning(init, 1.6, None, 0.1)


def _scaled_input_model():
    """input [N, 1, 6, 6] in 0..255 -> Mul 1 (a linear source: LSQ with activations.linear quantizes it, signed)
    -> Conv -> Relu -> Flatten -> Gemm 3."""
    rng = np.random.default_rng(0)
    inits = [numpy_helper.from_array(np.array(1.0, np.float32), "one"),
             numpy_helper.from_array((rng.standard_normal((4, 1, 3, 3)) * 0.01).astype(np.float32), "conv.w"),
             numpy_helper.from_array((rng.standard_normal((3, 64)) * 0.1).astype(np.float32), "fc.w")]
    n = helper.make_node
    nodes = [n("Mul", ["input", "one"], ["s"], name="pre"), n("Conv", ["s", "conv.w"], ["c"], name="conv"),
             n("Relu", ["c"], ["r"], name="relu"), n("Flatten", ["r"], ["f"], name="flat"),
             n("Gemm", ["f", "fc.w"], ["logits"], name="fc", transB=1)]
    g = helper.make_graph(nodes, "m", [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["N", 1, 6, 6])],
                          [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["N", 3])], inits)
    return helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])


def test_uncalibrated_quantizers_start_from_the_first_batches(tmp_path):
    import onnxruntime as ort

    from onnxqat.ops.library import session_options
    from onnxqat.passes.insert import UNCALIBRATED_KEY, insert
    from onnxqat.passes.strip import strip_quantizers
    from onnxqat.training.quantizer_init import init_from_data

    qat = insert(_scaled_input_model(), "lsq8")
    names = json.loads({p.key: p.value for p in qat.metadata_props}[UNCALIBRATED_KEY])
    assert names == ["relu_aquant", "pre_aquant"]
    x = np.random.default_rng(3).integers(0, 256, (64, 1, 6, 6)).astype(np.float32)
    said = []
    m, messages = init_from_data(qat, {"input": x})
    steps = _inits(m)
    assert steps["pre_aquant.step"][0] == pytest.approx(2 * np.abs(x).mean() / np.sqrt(127), rel=1e-6)
    float_relu = np.maximum(0, strip_quantizers(qat).graph.node and _conv_relu(x, _inits(qat)["conv.w"]))
    assert steps["relu_aquant.step"][0] == pytest.approx(2 * float_relu.mean() / np.sqrt(255), rel=1e-4)
    assert not any(p.key == UNCALIBRATED_KEY for p in m.metadata_props) and len(messages) == 2

    def err(model):
        ref = ort.InferenceSession(strip_quantizers(qat).SerializeToString(), providers=["CPUExecutionProvider"])
        got = ort.InferenceSession(model.SerializeToString(), session_options(), providers=["CPUExecutionProvider"])
        a, b = ref.run(None, {"input": x})[0], got.run(None, {"input": x})[0]
        return float(np.abs(a - b).mean() / np.abs(a).mean())

    # the recipe's step clips 0..255 at +-3.2 (output wrecked); the data's keeps it (LSQ's coarse starting step)
    assert err(qat) > 0.9 and err(m) < 0.1
    # through train(): said in the log, and --no-data-init keeps the recipe's values
    np.savez(tmp_path / "d.npz", x=x, y=np.arange(64) % 3)
    train(qat, tmp_path / "d.npz", epochs=1, max_iterations=1, batch_size=16, lr=0.0, quantizer_lr=0.0,
          out=tmp_path / "a", log=said.append, **QUIET)
    assert any(s.startswith("2 activation quantizer(s) not calibrated at insert, initialised from the first 52 "
                            "training samples: ") for s in said)


def _conv_relu(x, w):
    out = np.zeros((x.shape[0], 4, 4, 4), np.float64)
    for i in range(4):
        for j in range(4):
            out[:, :, i, j] = np.einsum("nchw,ochw->no", x[:, :, i:i + 3, j:j + 3].astype(np.float64), w)
    return out


def test_lsq_weight_step_inits():
    from onnxqat.passes.calibration import lsq_weight_steps

    w = np.random.default_rng(0).standard_normal((4, 50)).astype(np.float32)
    qn, qp = 8.0, 7.0
    np.testing.assert_allclose(lsq_weight_steps(w, qn, qp, None, "max"), [np.abs(w).max() / qp], rtol=1e-6)
    np.testing.assert_allclose(lsq_weight_steps(w, qn, qp, 0, "paper"), 2 * np.abs(w).mean(axis=1) / np.sqrt(qp),
                               rtol=1e-6)

    def mse(step):
        return float(np.mean((np.clip(np.round(w / step), -qn, qp) * step - w) ** 2))

    s_mse = float(lsq_weight_steps(w, qn, qp, None, "mse")[0])
    s_max = float(lsq_weight_steps(w, qn, qp, None, "max")[0])
    assert s_mse < s_max and mse(s_mse) < 0.8 * mse(s_max)  # 4-bit Gaussian: clipping the tails pays
    best = min(mse(s_max * f) for f in np.linspace(0.01, 1.0, 100))  # the search grid, done here by brute force
    assert mse(s_mse) == pytest.approx(best, rel=1e-3)


def test_recipe_step_init_reaches_insert():
    from onnxqat.passes.insert import insert
    from onnxqat.recipes import parse_recipe

    r = parse_recipe('[weights]\nmethod = "lsq"\nrange = 255\nstep_init = "max"\n[activations]\nenabled = false\n')
    m = insert(_scaled_input_model(), r)
    inits = _inits(m)
    assert inits["conv_wquant.step"][0] == pytest.approx(np.abs(inits["conv.w"]).max() / 127, rel=1e-6)


def test_data_smaller_than_a_batch_and_cli_ambiguity_are_one_line(tmp_path, two_npz):
    from onnxqat.passes.insert import insert

    z = dict(np.load(two_npz))
    np.savez(tmp_path / "few.npz", x=z["x"][:20], state=z["state"][:20])
    with pytest.raises(DataError, match=r"^the training set has 16 samples, fewer than one batch \(32\): lower the "
                                        r"batch size or give more data$"):
        train(insert(two_in_three_out(), "lsq8"), tmp_path / "few.npz", batch_size=32, out=tmp_path / "r",
              log=lambda *_: None, **QUIET)
    onnx.save(two_in_three_out(), str(tmp_path / "m.onnx"))
    np.savez(tmp_path / "lab.npz", x=z["x"], state=z["state"], y=np.arange(160) % 5)
    env = {**os.environ, "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    cmd = [sys.executable, "-m", "onnxqat", "train", str(tmp_path / "m.onnx"), "--data", str(tmp_path / "lab.npz"),
           "--out", str(tmp_path / "cli"), "--no-progress"]
    r = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=120)
    assert r.returncode == 1 and "Traceback" not in r.stderr
    assert r.stderr.strip().splitlines()[-1] == (
        "onnxqat: error: the model has 3 outputs (logits [?, 5], map [?, 1, 8, 8], state_out [?, 4]): say which one "
        "the cross-entropy reads (--loss-output NAME[:WEIGHT], repeatable)")
    r = subprocess.run(cmd + ["--loss-output", "logits", "--max-iterations", "2", "--batch-size", "16", "--input",
                              "state=0.5", "--threads", "1"], env=env, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr[-2000:]
    assert "  batch_size 16 (command line)" in r.stderr.splitlines()
