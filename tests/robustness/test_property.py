"""Property-based: random recipe tables and random small graphs given to insert / inspect / fuse give a result or an
OnnxqatError (one line at the CLI), never another exception."""

from __future__ import annotations

import json
import math
import warnings

import numpy as np
import onnx
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from onnx import TensorProto, helper, numpy_helper

from onnxqat.errors import OnnxqatError
from onnxqat.recipes import ACTIVATION_KEYS, WEIGHT_KEYS

SETTINGS = settings(max_examples=30, deadline=None, derandomize=True,
                    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])


# ------------------------------------------------------------------ recipes as TOML text

def _toml_value(v) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, float):
        return "nan" if math.isnan(v) else ("inf" if v > 0 else "-inf") if math.isinf(v) else repr(v)
    if isinstance(v, int):
        return str(v)
    if isinstance(v, str):
        return json.dumps(v)
    return "[" + ", ".join(_toml_value(x) for x in v) + "]"


scalars = st.one_of(st.booleans(), st.integers(-3, 70000), st.floats(allow_nan=True, allow_infinity=True, width=32),
                    st.sampled_from(["sat", "lsq", "clamp", "quantize", "symmetric", "paper", "n2d2", "auto", "x"]))
values = st.one_of(scalars, st.lists(scalars, max_size=3))


_VALID = {  # values each key accepts, so that most drawn recipes get past parsing into insert
    "enabled": st.booleans(), "method": st.sampled_from(["sat", "lsq"]), "range": st.integers(1, 65535),
    "mode": st.sampled_from(["clamp", "quantize", "symmetric"]), "apply_scaling": st.booleans(),
    "restore_scale": st.sampled_from([True, False, "auto", "always", "never"]), "per_channel": st.booleans(),
    "step": st.floats(1e-6, 1e3), "step_init": st.sampled_from(["paper", "max", "mse"]), "alpha": st.floats(1e-6, 1e3),
    "percentile": st.floats(0.01, 100), "linear": st.booleans(), "integer_export": st.booleans(),
    "grad_scale": st.sampled_from(["paper", "n2d2"]), "grad_scale_batch": st.integers(0, 1024),
}


def _table(keys):
    key = st.sampled_from(sorted(keys) + ["colour"])  # an unknown key now and then
    pairs = st.lists(key.flatmap(lambda k: st.tuples(st.just(k), st.one_of(_VALID.get(k, values), _VALID.get(k, values),
                                                                          _VALID.get(k, values), values))),
                     max_size=5)
    return pairs.map(dict)


@st.composite
def recipe_text(draw) -> str:
    parts = []
    for name, keys in (("weights", WEIGHT_KEYS), ("activations", ACTIVATION_KEYS)):
        table = draw(_table(keys))
        parts.append(f"[{name}]\n" + "".join(f"{k} = {_toml_value(v)}\n" for k, v in table.items()))
    if draw(st.booleans()):
        parts.append("[op_types.Conv]\n" + "".join(f"{k} = {_toml_value(v)}\n" for k, v in draw(_table(WEIGHT_KEYS))
                                                   .items()))
    return "\n".join(parts)


# ------------------------------------------------------------------ small random CNNs

@st.composite
def small_graph(draw) -> onnx.ModelProto:
    rng = np.random.default_rng(draw(st.integers(0, 2**16)))
    c, hw = draw(st.integers(1, 3)), draw(st.sampled_from([4, 6, 8]))
    c0, hw0 = c, hw
    scale = draw(st.sampled_from([0.0, 1e-3, 0.3, 5.0]))
    nodes, inits, x, k = [], [], "input", 0

    def init(name, arr):
        inits.append(numpy_helper.from_array(arr.astype(np.float32), name))
        return name

    for op in draw(st.lists(st.sampled_from(["Conv", "Relu", "Clip", "Sigmoid", "MaxPool", "BN", "Add"]),
                            min_size=1, max_size=6)):
        k += 1
        y = f"t{k}"
        if op == "Conv":
            co, ks = draw(st.integers(1, 4)), draw(st.sampled_from([1, 3]))
            w = init(f"w{k}", rng.standard_normal((co, c, ks, ks)) * scale)
            nodes.append(helper.make_node("Conv", [x, w], [y], name=f"conv{k}", pads=[ks // 2] * 4))
            c = co
        elif op == "Relu":
            nodes.append(helper.make_node("Relu", [x], [y], name=f"relu{k}"))
        elif op == "Clip":
            lo, hi = init(f"lo{k}", np.array(0.0)), init(f"hi{k}", np.array(6.0))
            nodes.append(helper.make_node("Clip", [x, lo, hi], [y], name=f"clip{k}"))
        elif op == "Sigmoid":
            nodes.append(helper.make_node("Sigmoid", [x], [y], name=f"sig{k}"))
        elif op == "MaxPool":
            if hw < 2:
                continue
            nodes.append(helper.make_node("MaxPool", [x], [y], name=f"pool{k}", kernel_shape=[2, 2], strides=[2, 2]))
            hw //= 2
        elif op == "BN":
            ins = [init(f"bn{k}.{p}", v) for p, v in (("s", rng.uniform(0.5, 1.5, c)), ("b", rng.standard_normal(c)),
                                                     ("m", rng.standard_normal(c)), ("v", rng.uniform(0.5, 2, c)))]
            nodes.append(helper.make_node("BatchNormalization", [x] + ins, [y], name=f"bn{k}"))
        else:
            nodes.append(helper.make_node("Add", [x, x], [y], name=f"add{k}"))
        x = y
    nodes.append(helper.make_node("Flatten", [x], ["flat"], name="flatten"))
    w = init("fc.w", rng.standard_normal((3, c * hw * hw)) * scale)
    nodes.append(helper.make_node("Gemm", ["flat", w], ["logits"], name="fc", transB=1))
    g = helper.make_graph(nodes, "random", [helper.make_tensor_value_info("input", TensorProto.FLOAT,
                                                                          ["N", c0, hw0, hw0])],
                          [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["N", 3])], inits)
    return helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])


def _only_onnxqat_errors(fn, *args, **kwargs):
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return fn(*args, **kwargs)
    except OnnxqatError:
        return None


# ------------------------------------------------------------------ properties

@settings(SETTINGS, max_examples=80)
@given(text=recipe_text())
def test_random_recipe_tables_parse_or_raise_recipe_errors(text):
    from onnxqat.passes.insert import insert
    from onnxqat.recipes import parse_recipe
    from tests.passes.models import resblock

    recipe = _only_onnxqat_errors(parse_recipe, text)
    if recipe is not None:
        _only_onnxqat_errors(insert, resblock(), recipe)


@pytest.mark.parametrize("recipe", ["sat4", "lsq4", "lsq8-int"])
@SETTINGS
@given(model=small_graph())
def test_random_graphs_insert_inspect_fuse(recipe, model):
    from onnxqat.fusion.api import fuse
    from onnxqat.passes.insert import insert
    from onnxqat.passes.inspect import inspect

    onnx.checker.check_model(model, full_check=True)  # the generator makes valid models only
    qat = _only_onnxqat_errors(insert, model, recipe)
    if qat is None:
        return
    _only_onnxqat_errors(inspect, qat)
    _only_onnxqat_errors(fuse, qat, verify_samples=4, report=False)
