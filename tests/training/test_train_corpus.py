"""`onnxqat train` on the model corpus (tests/corpus): insert, then 20 training steps by distillation from the float
model (every model) and with labels (classifiers); the loss falls and the parameters change, with no manual step.

The full matrix (every CI model x opsets 11/13/17 x recipes sat4/lsq4/lsq8) is bench/coverage.py's job
(`--train-all-recipes`). CI runs one opset and one recipe per model, chosen so that every architecture, every opset
and every recipe is trained, and every (opset, recipe) pair occurs: the models in catalog order walk through the
9 (opset, recipe) pairs in order (model k gets pair k mod 9).
"""

from __future__ import annotations

import itertools

import numpy as np
import onnx
import pytest
from onnx import numpy_helper

from tests.corpus import select
from train_helpers import FASHION

OPSETS = (11, 13, 17)
RECIPES = ("sat4", "lsq4", "lsq8")
PAIRS = list(itertools.product(OPSETS, RECIPES))
STEPS, BATCH = 20, 8


def _matrix():
    specs = list(dict.fromkeys(s.name for s, _ in select()))
    rows = []
    for k, name in enumerate(specs):
        opsets = {o for s, o in select([name])}
        opset, recipe = PAIRS[k % len(PAIRS)]
        if opset not in opsets:  # a model exported at fewer opsets: its highest
            opset = max(opsets)
        rows.append((name, opset, recipe))
    return rows


MATRIX = _matrix()


def test_matrix_covers_every_architecture_opset_and_recipe():
    assert {n for n, _, _ in MATRIX} == {s.name for s, _ in select()}
    assert {o for _, o, _ in MATRIX} == set(OPSETS) and {r for _, _, r in MATRIX} == set(RECIPES)


@pytest.fixture(scope="module", autouse=True)
def _library():
    from onnxqat.errors import OpLibraryError

    try:
        from onnxqat.ops.library import library_path

        library_path()
    except (OpLibraryError, ImportError) as exc:
        pytest.skip(f"quantizer op library not available: {exc}")


def _data(m, n: int, mode: str):
    """n images for the data input as uint8 [N, H, W, C], or raw arrays for a non-image input. Labels: Fashion-MNIST
    when installed (train resizes the images and makes them RGB), labels modulo the classes. Distillation: the
    corpus's own image-like inputs, those its BatchNorm statistics were measured on (on other images the statistics
    adapt in training while the teacher's stay: the loss would measure that drift, not the training)."""
    from onnxqat.training.data import Dataset, load_idx_dir
    from tests.corpus.inputs import image_like

    d = m.data_input
    if d.layout not in ("NCHW", "NHWC"):
        x = np.random.default_rng(0).uniform(*d.value_range, (n, *d.shape[1:])).astype(np.float32)
        return Dataset(x, None, m.name, raw=True)
    if mode == "distillation":
        c, h, w = d.shape[1:] if d.layout == "NCHW" else (d.shape[3], d.shape[1], d.shape[2])
        x = image_like(np.random.default_rng(0), n, c, h, w)
        return Dataset(np.round(x.transpose(0, 2, 3, 1) * 255).astype(np.uint8), None, m.name)
    if FASHION.is_dir():
        ds, _ = load_idx_dir(FASHION)
        x, y = ds.images[:n], ds.labels[:n]
    else:
        rng = np.random.default_rng(0)
        x, y = rng.integers(0, 256, (n, 28, 28, 1), dtype=np.uint8), rng.integers(0, 10, n)
    return Dataset(x, (y % m.num_classes) if m.num_classes else None, m.name)


@pytest.mark.parametrize("name,opset,recipe", MATRIX, ids=[f"{n}@{o}-{r}" for n, o, r in MATRIX])
def test_corpus_model_trains(corpus_models, tmp_path, name, opset, recipe):
    from onnxqat.passes.insert import insert
    from onnxqat.training.run import train

    m = corpus_models[f"{name}@{opset}"]
    qat = insert(str(m.path), recipe)
    lo, hi = m.data_input.value_range
    kw = dict(epochs=1, max_iterations=STEPS, batch_size=BATCH, validation=0.0, eval_test=False, threads=1,
              progress=False, histograms=False, log=lambda *_: None,
              inputs={i.name: np.zeros(i.shape[1:], np.float32) for i in m.inputs if i.role != "data"})
    modes = ["distillation"] + (["labels"] if m.num_classes else [])
    start = {i.name: numpy_helper.to_array(i) for i in qat.graph.initializer}
    for mode in modes:
        ds = _data(m, STEPS * BATCH, mode)
        if not ds.raw:
            kw.update(scale=255.0 / (hi - lo), mean=-lo)
        # AdamW: one learning rate that suits every architecture's scale (the recipes' SGD settings are tuned for
        # long runs, not for 20 steps from random weights)
        extra = dict(solver="adamw", lr=1e-4, quantizer_lr=1e-5, decay=0.0, lr_policy="none", iteration_size=1,
                     distill=mode == "distillation")
        # the training set is also the test set: the loss before and after is measured on the same images
        r = train(qat, (ds, ds), out=tmp_path / mode, **kw, **extra)
        assert r.test_loss < r.initial["loss"], (mode, r.initial, r.test_loss)
        trained = {i.name: numpy_helper.to_array(i) for i in onnx.load(str(r.model_path)).graph.initializer}
        weights = [n for n in start if (n.endswith(("weight", ".w")) or n in trained and start[n].ndim == 4)
                   and not n.endswith(".restore_scale")]  # SAT's restore_scale: constants by design
        changed = sum(not np.array_equal(start[n], trained[n]) for n in weights if n in trained)
        assert changed >= 0.5 * len(weights) > 0, (mode, changed, len(weights))
