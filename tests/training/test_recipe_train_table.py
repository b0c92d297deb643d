"""The free [train] table of a recipe: known keys and N2D2-style aliases reach the trainer, unknown keys are errors."""

import pytest

from onnxqat.errors import RecipeError
from onnxqat.recipes import load_recipe, parse_recipe
from onnxqat.training.run import _recipe_train


def test_shipped_sat4_train_table_maps_to_trainer_settings():
    d = _recipe_train(load_recipe("sat4"))
    assert d["lr"] == pytest.approx(0.05) and d["momentum"] == pytest.approx(0.9)
    assert d["decay"] == pytest.approx(4e-5) and d["iteration_size"] == 2


def test_alias_is_accepted_and_unknown_key_names_file_and_key():
    ok = parse_recipe('[weights]\nrange = 15\n[train]\nlearning_rate = 0.1\n', source="mine.toml")
    assert _recipe_train(ok)["lr"] == pytest.approx(0.1)
    bad = parse_recipe('[weights]\nrange = 15\n[train]\nlearnig_rate = 0.1\n', source="mine.toml")
    with pytest.raises(RecipeError, match=r"mine\.toml: unknown key 'train\.learnig_rate'"):
        _recipe_train(bad)


def test_every_shipped_and_example_recipe_has_a_valid_train_table():
    from pathlib import Path

    from onnxqat.recipes import list_recipes

    recipes = list(list_recipes())
    recipes += [load_recipe(p) for p in Path(__file__).resolve().parents[2].glob("examples/*/*.toml")]
    assert len(recipes) >= 7
    for r in recipes:
        _recipe_train(r)  # raises on an unknown key
