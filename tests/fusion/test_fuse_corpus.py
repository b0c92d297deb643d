"""`onnxqat fuse` on the model corpus (tests/corpus), with no options: insert (lsq4), a few training steps by
distillation, then fuse to every format; the fused model against the fake-quantized one on a batch of images.

CI fuses one opset per model (model k of the catalog takes opset (11, 13, 17)[k mod 3], or its highest), so every
architecture and every opset is fused; bench/coverage.py fuses the full matrix. The images are the corpus's own
image-like inputs (those its BatchNorm statistics come from), in the model's layout and value range.
"""

from __future__ import annotations

import numpy as np
import pytest

from tests.corpus import select

OPSETS = (11, 13, 17)
FORMATS = ("int", "ort", "qdq")
SAMPLES = 32


def _matrix():
    names = list(dict.fromkeys(s.name for s, _ in select()))
    rows = []
    for k, name in enumerate(names):
        opsets = {o for _, o in select([name])}
        opset = OPSETS[k % len(OPSETS)]
        rows.append((name, opset if opset in opsets else max(opsets)))
    return rows


MATRIX = _matrix()


def test_matrix_covers_every_architecture_and_opset():
    assert {n for n, _ in MATRIX} == {s.name for s, _ in select()} and {o for _, o in MATRIX} == set(OPSETS)


def _images(m, n: int, seed: int) -> dict:
    """{input name: array} for every input: image-like 8-bit pictures for the image (what a model whose first layer
    reads the image unquantized takes as uint8 codes), uniform values for others."""
    from tests.corpus.inputs import image_like

    rng = np.random.default_rng(seed)
    feeds = {}
    for i in m.inputs:
        lo, hi = i.value_range
        if i.layout in ("NCHW", "NHWC") and len(i.shape) == 4:
            c, h, w = i.shape[1:] if i.layout == "NCHW" else (i.shape[3], i.shape[1], i.shape[2])
            x = np.round(image_like(rng, n, c, h, w) * 255) / 255  # [N, C, H, W] 8-bit pictures in [0, 1]
            x = x if i.layout == "NCHW" else x.transpose(0, 2, 3, 1)
            feeds[i.name] = (lo + (hi - lo) * x).astype(np.float32)
        else:
            feeds[i.name] = rng.uniform(lo, hi, (n, *i.shape[1:])).astype(np.float32)
    return feeds


@pytest.fixture(scope="module")
def trained(corpus_models, tmp_path_factory):
    """name -> (CorpusModel, QAT model after 5 distillation steps)."""
    import warnings

    import onnx

    from onnxqat.passes.insert import insert
    from onnxqat.training.data import Dataset
    from onnxqat.training.run import train

    out = {}
    for name, opset in MATRIX:
        m = corpus_models[f"{name}@{opset}"]
        calib = _images(m, 16, 1)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            qat = insert(str(m.path), "lsq4", calibration_data=calib)
        d = m.data_input
        kw = {}
        if d.layout in ("NCHW", "NHWC"):  # uint8 NHWC pictures, as train takes images, mapped to the value range
            from tests.corpus.inputs import image_like

            c, h, w = d.shape[1:] if d.layout == "NCHW" else (d.shape[3], d.shape[1], d.shape[2])
            x = image_like(np.random.default_rng(2), 40, c, h, w)
            ds = Dataset(np.round(x.transpose(0, 2, 3, 1) * 255).astype(np.uint8), None, m.name)
            lo, hi = d.value_range
            kw = dict(scale=255.0 / (hi - lo), mean=-lo)
        else:
            ds = Dataset(_images(m, 40, 2)[d.name], None, m.name, raw=True)
        r = train(qat, (ds, ds), out=tmp_path_factory.mktemp(name), epochs=1, max_iterations=5, batch_size=8,
                  validation=0.0, eval_test=False, threads=1, progress=False, histograms=False, log=lambda *_: None,
                  solver="adamw", lr=1e-4, quantizer_lr=1e-5, decay=0.0, lr_policy="none", iteration_size=1,
                  distill=True, inputs={i.name: np.zeros(i.shape[1:], np.float32) for i in m.inputs
                                        if i.role != "data"}, **kw)
        out[name] = (m, onnx.load(str(r.model_path)))
    return out


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("name,opset", MATRIX, ids=[f"{n}@{o}" for n, o in MATRIX])
def test_fuses_with_no_options(trained, name, opset, fmt):
    """Fuses with no options but the self-check's images. qdq computes every op in float32 like the fake-quantized
    model: same top-1 on every image, >= 99 % of output codes. int and ort compute the accumulators exactly, which the
    fake-quantized model does not (float32 convolutions, float islands fed by accumulators): a value within float32
    rounding of a tie moves a code, and these random-weight networks after 5 steps amplify one moved code (measured on
    efficientnet_b0: moving 10 biases by <= 1/16 of a code changed the fake-quantized class of 78 % of the images);
    trained models do not (examples/01's LeNet: same class on all 10,000 test images in every format)."""
    from onnxqat.fusion.api import fuse

    m, qat = trained[name]
    res = fuse(qat, format=fmt, verify_data=_images(m, SAMPLES, 3), report=False, min_agreement=0)
    a = res.agreement
    assert a.samples == SAMPLES and res.integer_nodes > 0.5 * res.lowered_nodes, res.summary()
    if fmt == "qdq":
        assert a.top1_agreement == 1.0 and a.code_agreement >= 0.99, a.summary()
        return
    # layer by layer (each layer of the fake-quantized model fed the fused model's codes) only a layer's own
    # rounding differences show: a lowering error cannot hide behind the amplification described above
    assert a.local_agreement >= 0.99 and min(a.local_activations.values(), default=1.0) >= 0.99, a.summary()


CNNS = ("resnet18", "mobilenetv3_small", "efficientnet_b0", "shufflenet_v2", "unet", "yolo", "keras_nhwc",
        "face_detector")


@pytest.mark.parametrize("fmt", ("int", "ort"))
@pytest.mark.parametrize("name", CNNS)
def test_cnns_are_integer_from_first_to_last_quantizer(corpus_models, name, fmt):
    """Recipe lsq4-int (quantizers wherever fuse needs codes), calibrated on the corpus images: no float island in
    any CNN of the corpus, and every layer agrees with the fake-quantized model."""
    import warnings

    from onnxqat.fusion.api import fuse
    from onnxqat.passes.insert import insert

    key = next(k for k in corpus_models if k.startswith(f"{name}@"))
    m = corpus_models[key]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        qat = insert(str(m.path), "lsq4-int", calibration_data=_images(m, 16, 1))
    res = fuse(qat, format=fmt, verify_data=_images(m, 16, 3), report=False, integer_only=fmt == "int")
    assert res.islands == [] and res.integer_nodes == res.lowered_nodes - len(res.head) - len(res.tail), res.summary()
    assert res.agreement.local_agreement >= 0.99, res.agreement.summary()


@pytest.mark.parametrize("recipe,qlinear_convs,float_convs", [("sat4-int", 19, 1), ("sat4", 8, 12)])
def test_resnet18_on_onnxruntime_kernels(corpus_models, recipe, qlinear_convs, float_convs):
    """ResNet-18 (BN folded by the exporter) in the ort format: with sat4-int (signed LSQ quantizers on the residual
    branches) every convolution but the 3-channel first one is a QLinearConv and each of the 8 residual Adds a
    QLinearAdd; with sat4 (N2D2's placement) the 12 convolutions whose output reaches an Add unquantized (second
    conv of each block, downsampling convs, the first conv) run in float. Both agree with the fake-quantized model
    layer by layer."""
    import warnings

    from onnxqat.fusion.api import fuse
    from onnxqat.passes.insert import insert

    key = next(k for k in corpus_models if k.startswith("resnet18@"))
    m = corpus_models[key]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        qat = insert(str(m.path), recipe, calibration_data=_images(m, 16, 1))
    res = fuse(qat, format="ort", verify_data=_images(m, 16, 3), report=False)
    ops = [n.op_type for n in res.model.graph.node]
    assert (ops.count("QLinearConv"), ops.count("Conv")) == (qlinear_convs, float_convs), res.summary()
    assert ops.count("QLinearAdd") == (8 if recipe == "sat4-int" else 0)
    assert res.agreement.local_agreement >= 0.999, res.agreement.summary()
