"""Recipe files -> Recipe objects: the shipped recipes, resolution order, and every kind of bad input."""

from __future__ import annotations

import dataclasses

import pytest

from onnxqat.errors import RecipeError
from onnxqat.recipes import list_recipes, load_recipe, parse_recipe


def test_shipped_recipes():
    recipes = {r.name: r for r in list_recipes()}
    assert {"sat4", "sat8", "sat4-clamp", "sat4-weights", "lsq4", "lsq8"} <= set(recipes)
    sat4 = recipes["sat4"]
    assert sat4.previous_stage == "sat4-clamp"
    assert (sat4.weights.method, sat4.weights.range, sat4.weights.mode) == ("sat", 15, "quantize")
    assert (sat4.activations.enabled, sat4.activations.method, sat4.activations.range) == (True, "sat", 15)
    # N2D2: ApplyScaling 0 for Conv, 1 for Fc; first/last layer weights 8-bit
    assert not sat4.weight_settings("Conv", "c").apply_scaling
    assert sat4.weight_settings("Gemm", "fc").apply_scaling and sat4.weight_settings("MatMul", "mm").apply_scaling
    assert sat4.weight_settings("Conv", "c", first=True).range == 255
    assert sat4.weight_settings("Gemm", "fc", last=True).range == 255
    assert dict(sat4.train) == {"lr": 0.05, "momentum": 0.9, "decay": 4e-5, "lr_policy": "CosineDecay",
                                "iteration_size": 2, "quantizer_lr": 0.05}
    assert recipes["sat4-clamp"].weights.mode == "clamp" and not recipes["sat4-clamp"].activations.enabled
    assert recipes["sat4-weights"].weights.mode == "quantize" and not recipes["sat4-weights"].activations.enabled
    assert recipes["sat8"].weights.range == 255 and recipes["sat8"].activations.range == 255
    for name, r in (("lsq4", 15), ("lsq8", 255)):
        assert recipes[name].weights.method == "lsq" and recipes[name].weights.range == r
        assert recipes[name].activations.linear
        assert recipes[name].activations.method == "lsq" and recipes[name].activations.range == r
    assert "[weights]" in sat4.toml_text


def test_load_by_path_and_recipe_passthrough(tmp_path):
    p = tmp_path / "mine.toml"
    p.write_text('[weights]\nmethod = "lsq"\nrange = 7\nper_channel = true\n[train]\nanything = [1, 2]\n')
    r = load_recipe(p)
    assert r.name == "mine" and r.weights.per_channel and r.weights.range == 7
    assert dict(r.train) == {"anything": [1, 2]}
    assert load_recipe(r) is r
    assert load_recipe(str(p)).source == str(p)


def test_frozen():
    r = load_recipe("sat4")
    with pytest.raises(dataclasses.FrozenInstanceError):
        r.name = "x"
    with pytest.raises(TypeError):
        r.op_types["Conv"] = {}


def test_resolution_order_op_type_then_first_last_then_node():
    r = parse_recipe(
        "[weights]\nrange = 15\n[op_types.Conv]\nrange = 31\n[first_layer]\nrange = 63\n"
        '[nodes."c0"]\nrange = 127\n'
    )
    assert r.weight_settings("Conv", "cx").range == 31
    assert r.weight_settings("Gemm", "fx").range == 15
    assert r.weight_settings("Conv", "cx", first=True).range == 63
    assert r.weight_settings("Conv", "c0", first=True).range == 127


@pytest.mark.parametrize(
    "text,message",
    [
        ("nmae = 'x'\n", "key 'nmae' is unknown"),
        ("[weights]\nrnge = 4\n", "key 'weights.rnge' is unknown"),
        ('[weights]\nrange = "15"\n', "key 'weights.range' must be int, got str"),
        ("[weights]\nrange = 15.0\n", "key 'weights.range' must be int, got float"),
        ("[weights]\nrange = true\n", "key 'weights.range' must be int, got bool"),
        ("[weights]\nrange = 0\n", "key 'weights.range' must be an integer in [1, 65535], got 0"),
        ("[weights]\nrange = 70000\n", "key 'weights.range' must be an integer in [1, 65535]"),
        ('[weights]\nmethod = "dorefa"\n', "key 'weights.method' must be one of sat, lsq"),
        ('[weights]\nmode = "round"\n', "key 'weights.mode' must be one of clamp, quantize, symmetric"),
        ("[weights]\napply_scaling = 1\n", "key 'weights.apply_scaling' must be bool, got int"),
        ("[activations]\nalpha = -1.0\n", "key 'activations.alpha' must be finite, > 0 and <= 1e30"),
        ("[activations]\nmode = 'clamp'\n", "key 'activations.mode' is unknown"),
        ("[activations]\npercentile = 101\n", "key 'activations.percentile' must be in (0, 100]"),
        ("[op_types.Relu]\nrange = 3\n", "key 'op_types.Relu' is unknown"),
        ('[nodes."c0"]\nbits = 3\n', "key 'nodes.\"c0\".bits' is unknown"),
        ("weights = 3\n", "key 'weights' must be a table"),
        ("train = 3\n", "key 'train' must be a table"),
        ("name = 3\n", "key 'name' must be a string"),
        ("[weights\n", "not valid TOML"),
        ("[activations]\ninteger_export = true\n", "key 'activations.integer_export' needs linear = true"),
    ],
)
def test_bad_recipes_name_key_and_file(text, message):
    with pytest.raises(RecipeError) as exc:
        parse_recipe(text, source="bad.toml")
    assert str(exc.value).startswith("bad.toml: ")
    assert message in str(exc.value)


def test_unknown_recipe_and_missing_file(tmp_path):
    with pytest.raises(RecipeError, match="unknown recipe 'sat5'.*sat4"):
        load_recipe("sat5")
    with pytest.raises(RecipeError, match="recipe file not found"):
        load_recipe(tmp_path / "nothere.toml")
