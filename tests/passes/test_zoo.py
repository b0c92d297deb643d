"""Every shipped recipe on the onnx wheel's light model zoo: valid output, quantizer counts derived independently
from the original graph, and a run in onnxruntime with the op library (one 224x224 image each).

The light models hold every weight as ConstantOfShape (the same value everywhere), so these tests check structure
and execution, not accuracy; numerics are checked on the small models of test_insert.py."""

from __future__ import annotations

import warnings
from collections import Counter
from functools import lru_cache
from pathlib import Path

import numpy as np
import onnx
import pytest

from onnxqat.passes.insert import insert
from onnxqat.recipes import list_recipes, load_recipe

LIGHT = Path(onnx.__file__).parent / "backend" / "test" / "data" / "light"
MODELS = ["resnet50", "inception_v1", "inception_v2", "densenet121", "squeezenet", "shufflenet", "vgg19",
          "bvlc_alexnet", "zfnet512"]
RECIPES = [r.name for r in list_recipes()]
# ORT runs: every recipe on the models that run in well under a second; on the three with huge fully-connected
# layers (vgg19: a 102M-weight fc6, ~20 s a run on 2 busy cores; alexnet, zfnet512) one recipe each, SAT or LSQ;
# the recipes differ in constants only and use the same kernels, which the other models run with every recipe.
HEAVY_RECIPES = {"vgg19": "lsq4", "bvlc_alexnet": "sat4", "zfnet512": "lsq8"}
WEIGHTED = {"Conv", "ConvTranspose", "Gemm", "MatMul"}
DOMAIN = "com.onnxqat"


@lru_cache(maxsize=None)
def original(name: str) -> onnx.ModelProto:
    path = LIGHT / f"light_{name}.onnx"
    if not path.is_file():
        pytest.skip(f"{path} is not in this onnx wheel")
    return onnx.load(str(path))


def expected_counts(m: onnx.ModelProto) -> tuple[int, int, int]:
    """(weighted layers, activations feeding them, activations in all) counted on the original graph, going
    *forward* from each Relu through ops that keep the quantization grid (the passes walk backward)."""
    weighted = sum(1 for n in m.graph.node if n.op_type in WEIGHTED)
    consumers: dict[str, list[onnx.NodeProto]] = {}
    for n in m.graph.node:
        for i in n.input:
            consumers.setdefault(i, []).append(n)
    through = {"MaxPool", "AveragePool", "GlobalAveragePool", "Concat", "Sum", "Add", "Reshape", "Flatten",
               "Transpose", "Dropout"}

    def feeds_weighted(tensor: str, seen: set) -> bool:
        for c in consumers.get(tensor, []):
            if c.op_type in WEIGHTED:
                return True
            if c.op_type in through and c.output[0] not in seen:
                seen.add(c.output[0])
                if feeds_weighted(c.output[0], seen):
                    return True
        return False

    relus = [n for n in m.graph.node if n.op_type == "Relu"]
    feeding = sum(1 for n in relus if feeds_weighted(n.output[0], set()))
    return weighted, feeding, len(relus)


def quantize(name: str, recipe: str) -> onnx.ModelProto:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # LRN (alexnet, zfnet, inception_v1), BN-fed convs (shufflenet)
        return insert(original(name), recipe)


@pytest.mark.parametrize("recipe", RECIPES)
@pytest.mark.parametrize("name", MODELS)
def test_zoo_valid_output_and_counts(name, recipe):
    m = original(name)
    q = quantize(name, recipe)
    onnx.checker.check_model(q, full_check=True)
    # strict shape inference runs through the quantizers (their outputs carry value_info) to the network output
    inferred = onnx.shape_inference.infer_shapes(q, strict_mode=True)
    known = {vi.name for vi in inferred.graph.value_info}
    assert all(n.output[0] in known for n in q.graph.node if n.domain == DOMAIN)
    r = load_recipe(recipe)
    weighted, feeding, relus = expected_counts(m)
    ops = Counter((n.domain, n.op_type) for n in q.graph.node)
    if r.weights.method == "sat":
        assert ops[(DOMAIN, "SatWeightQuant")] == weighted
        # a restore_scale Mul on every Conv whose output no BatchNormalization reads ("auto"; Gemm/MatMul have
        # ApplyScaling instead)
        bn_in = {n.input[0] for n in m.graph.node if n.op_type == "BatchNormalization"}
        want = sum(1 for n in m.graph.node if n.op_type in ("Conv", "ConvTranspose") and n.output[0] not in bn_in)
        restores = [n for n in q.graph.node if n.op_type == "Mul" and n.name.endswith("_wquant_restore")]
        assert len(restores) == want
        ops[("", "Mul")] -= len(restores)
    else:
        assert sum(1 for n in q.graph.node if n.op_type == "LsqQuant" and n.name.endswith("_wquant")) == weighted
    n_act = feeding if r.activations.enabled else 0
    if r.activations.method == "sat":
        assert ops[(DOMAIN, "SatActQuant")] == n_act
        assert ops[("", "Relu")] == relus - n_act  # SAT replaces the Relus it quantizes
    else:
        relu_out = {n.output[0] for n in m.graph.node if n.op_type == "Relu"}
        lsq_acts = [n for n in q.graph.node if n.op_type == "LsqQuant" and "_aquant" in n.name]
        assert sum(1 for n in lsq_acts if n.input[0] in relu_out) == n_act
        assert ops[("", "Relu")] == relus
        if r.activations.linear:
            assert_every_weighted_input_quantized(q)
    # the original ops are all still there (BatchNormalization kept for training)
    for (domain, op), k in Counter((n.domain, n.op_type) for n in m.graph.node).items():
        if op != "Relu":
            assert ops[(domain, op)] == k, op


def assert_every_weighted_input_quantized(q: onnx.ModelProto) -> None:
    """With activations.linear, every path back from a weighted layer's data input through ops that move or combine
    values ends at a quantizer output or a network input."""
    producer = {o: n for n in q.graph.node for o in n.output}
    inits = {t.name for t in q.graph.initializer}
    inputs = {i.name for i in q.graph.input} - inits
    through = {"MaxPool", "AveragePool", "GlobalAveragePool", "Concat", "Sum", "Add", "Reshape", "Flatten",
               "Transpose", "Dropout"}
    for n in q.graph.node:
        if n.op_type not in WEIGHTED:
            continue
        stack = [n.input[0]]
        while stack:
            t = stack.pop()
            p = producer.get(t)
            if t in inputs or t in inits or (p is not None and p.domain == DOMAIN):
                continue
            where = p.op_type if p is not None else t
            assert p is not None and p.op_type in through, f"input of {n.name} reaches {where} unquantized"
            stack.extend(i for i in p.input[:1 if p.op_type in ("Reshape", "Dropout") else None] if i not in inits)


HAND_COUNTS = {  # (weighted layers, activations feeding them) read off the models by hand
    "resnet50": (54, 49), "vgg19": (19, 18), "squeezenet": (26, 25), "bvlc_alexnet": (8, 5), "zfnet512": (8, 5),
}


@pytest.mark.parametrize("name", sorted(HAND_COUNTS))
def test_counting_rule_matches_hand_counts(name):
    weighted, feeding, _ = expected_counts(original(name))
    # alexnet/zfnet512: two of the 7 Relus reach a conv only through LRN, which is not quantizable
    assert (weighted, feeding) == HAND_COUNTS[name]


def _session_options():
    from onnxqat.errors import OpLibraryError
    from onnxqat.ops import library

    try:
        so = library.session_options()
    except OpLibraryError as exc:
        pytest.skip(f"op library not built, ORT cannot run com.onnxqat ops: {exc}")
    so.log_severity_level = 3
    return so


ORT_CASES = [(n, r) for n in MODELS for r in RECIPES if HEAVY_RECIPES.get(n, r) == r]


@pytest.mark.parametrize("name,recipe", ORT_CASES)
def test_zoo_runs_in_onnxruntime(name, recipe):
    import onnxruntime as ort

    so = _session_options()
    q = quantize(name, recipe)
    sess = ort.InferenceSession(q.SerializeToString(), so, providers=["CPUExecutionProvider"])
    rng = np.random.default_rng(0)
    feeds = {i.name: rng.random([d if isinstance(d, int) else 1 for d in i.shape], dtype=np.float32)
             for i in sess.get_inputs()}
    out = sess.run(None, feeds)[0]
    if load_recipe(recipe).activations.enabled:
        # activations clipped to [0, alpha] keep every value finite; with float activations the light models'
        # all-equal weights (tanh-normalised to 1 by SAT) overflow float32 over 50 layers, by construction
        assert np.isfinite(out).all()
    expected = onnx.numpy_helper.to_array(
        onnx.load_tensor(str(LIGHT / f"light_{name}_output_0.pb"))
    ) if (LIGHT / f"light_{name}_output_0.pb").is_file() else None
    if expected is not None:
        assert out.shape == expected.shape


def test_inspect_weight_memory_resnet50_sat4():
    """Memory at the recipe's bits, recomputed from the original graph: conv/fc weights at 4 bits except the first
    conv and the fc (8 bits); fc bias and BatchNorm parameters as float32."""
    from onnxqat.passes.inspect import inspect

    m = original("resnet50")
    inferred = onnx.shape_inference.infer_shapes(m, data_prop=True)
    shapes = {vi.name: [d.dim_value for d in vi.type.tensor_type.shape.dim] for vi in inferred.graph.value_info}
    shapes.update({t.name: list(t.dims) for t in m.graph.initializer})
    weighted = [n for n in m.graph.node if n.op_type in WEIGHTED]
    sizes = [int(np.prod(shapes[n.input[1]])) for n in weighted]
    bits = [8 if k in (0, len(weighted) - 1) else 4 for k in range(len(weighted))]
    other = sum(int(np.prod(shapes[i])) for n in weighted for i in n.input[2:])
    bns = [n for n in m.graph.node if n.op_type == "BatchNormalization"]
    other += sum(int(np.prod(shapes[i])) for n in bns for i in n.input[1:])
    report = inspect(quantize("resnet50", "sat4"))
    assert len(report.rows) == 54 + 49
    assert report.total_params == sum(sizes) + other
    assert report.memory_bytes == (sum(s * b for s, b in zip(sizes, bits)) + 32 * other) / 8
    assert report.float_memory_bytes == 4 * (sum(sizes) + other)
    text = report.format()
    assert "54 weight quantizers, 49 activation quantizers" in text
