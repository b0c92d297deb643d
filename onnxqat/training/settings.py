"""Training settings and where each one came from.

Sources, first found wins: the command line (or a `train()` argument), the recipe given to train, the [train] table that
insert recorded in the model's metadata (onnxqat.passes.insert.TRAIN_KEY), then TrainConfig's defaults.
`train` prints each setting with its source (`lr 0.01 (recipe lsq8 [train])`, `batch_size 64 (command line)`,
`epochs 1 (default)`), so a setting that wrecks a pretrained model is never silent.
"""

from __future__ import annotations

import json
import math
from dataclasses import fields

import onnx

from onnxqat.errors import RecipeError
from onnxqat.training.loop import TrainConfig

_TRAIN_KEYS = {f.name for f in fields(TrainConfig)}
_ALIASES = {"learning_rate": "lr", "learning_rate_policy": "lr_policy", "policy": "lr_policy",
            "weight_decay": "decay", "quant_lr": "quantizer_lr", "quant_decay": "quantizer_decay",
            "warmup_epochs": "warmup", "max_epochs": "epochs"}
SHOWN = ("epochs", "batch_size", "iteration_size", "solver", "lr", "momentum", "momentum_form", "decay", "norm_decay",
         "quantizer_lr", "quantizer_decay", "lr_policy", "warmup", "max_iterations", "transforms")


def train_table(table: dict, source: str = "<recipe>") -> dict:
    """A recipe's [train] table with aliases resolved; RecipeError naming file and key for an unknown key."""
    out = {}
    for k, v in dict(table or {}).items():
        key = _ALIASES.get(k, k)
        if key not in _TRAIN_KEYS and key != "transforms":
            known = ", ".join(sorted(_TRAIN_KEYS | set(_ALIASES) | {"transforms"}))
            raise RecipeError(f"{source}: unknown key 'train.{k}' (known: {known})")
        out[key] = v
    return out


def recipe_layer(recipe) -> tuple[str, dict] | None:
    if recipe is None:
        return None
    return (f"recipe {getattr(recipe, 'name', '?')} [train]",
            train_table(getattr(recipe, "train", None) or {}, getattr(recipe, "source", "<recipe>")))


def model_layer(model: onnx.ModelProto) -> tuple[str, dict] | None:
    """The [train] table insert recorded in the model, labelled with the recipe's name."""
    from onnxqat.passes.insert import TRAIN_KEY

    meta = {p.key: p.value for p in model.metadata_props}
    if TRAIN_KEY not in meta:
        return None
    try:
        table = json.loads(meta[TRAIN_KEY])
    except ValueError:
        raise RecipeError(f"model metadata {TRAIN_KEY}: not valid JSON") from None
    name = meta.get("onnxqat.recipe", "?")
    return f"recipe {name} [train], recorded by insert", train_table(table, f"model metadata {TRAIN_KEY}")


def _finite(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def _int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


# setting -> (check, what it must be): every value, from any source, before a run starts
CHECKS = {
    "epochs": (lambda v: _int(v) and v >= 0, "an integer >= 0"),
    "max_iterations": (lambda v: v is None or (_int(v) and v >= 1), "an integer >= 1"),
    "batch_size": (lambda v: _int(v) and v >= 1, "an integer >= 1"),
    "iteration_size": (lambda v: _int(v) and v >= 1, "an integer >= 1"),
    "solver": (lambda v: isinstance(v, str), "a string (sgd, adamw)"),
    "lr": (lambda v: _finite(v) and v >= 0, "a finite number >= 0"),
    "momentum": (lambda v: _finite(v) and 0 <= v < 1, "a number in [0, 1)"),
    "decay": (lambda v: _finite(v) and v >= 0, "a finite number >= 0"),
    "quantizer_lr": (lambda v: v is None or (_finite(v) and v >= 0), "a finite number >= 0"),
    "quantizer_decay": (lambda v: v is None or (_finite(v) and v >= 0), "a finite number >= 0"),
    "norm_decay": (lambda v: v is None or (_finite(v) and v >= 0), "a finite number >= 0"),
    "momentum_form": (lambda v: v in ("n2d2", "pytorch"), "n2d2 or pytorch"),
    "lr_policy": (lambda v: isinstance(v, str), "a string (none, cosine, step)"),
    "warmup": (lambda v: _finite(v) and v >= 0, "a finite number of epochs >= 0"),
    "step_size": (lambda v: v is None or (_finite(v) and v > 0), "a finite number of epochs > 0"),
    "gamma": (lambda v: _finite(v) and v > 0, "a finite number > 0"),
    "seed": (lambda v: _int(v) and v >= 0, "an integer >= 0"),
    "threads": (lambda v: _int(v) and v >= 0, "an integer >= 0 (0: onnxruntime's default)"),
    "eval_test": (lambda v: isinstance(v, bool), "true or false"),
}


def check_settings(values: dict, sources: dict) -> None:
    """RecipeError naming the setting, its value and where it came from, for a value out of its range or type."""
    for k, v in values.items():
        check = CHECKS.get(k)
        if check is not None and not check[0](v):
            raise RecipeError(f"train setting {k} = {v!r} ({sources.get(k, 'default')}): must be {check[1]}")
    t = values.get("transforms")
    if t is not None and not (isinstance(t, list) and all(isinstance(x, str) for x in t)):
        raise RecipeError(f"train setting transforms = {t!r} ({sources.get('transforms')}): must be a list of "
                          "strings")


def resolve(explicit: dict, explicit_source: str, layers: list) -> tuple[TrainConfig, object, dict[str, str]]:
    """(TrainConfig, transforms spec or None, {setting: source}) from explicit values (None = not given) and the
    (label, table) layers in order of precedence."""
    values, sources = {}, {}
    for k, v in explicit.items():
        if v is not None:
            values[k], sources[k] = v, explicit_source
    for layer in layers:
        if layer is None:
            continue
        label, table = layer
        for k, v in table.items():
            if k not in values:
                values[k], sources[k] = v, label
    check_settings(values, sources)
    tspec = values.pop("transforms", None)
    try:
        cfg = TrainConfig(**values)
    except TypeError as exc:
        raise RecipeError(f"train settings: {exc}") from None
    for f in fields(TrainConfig):
        sources.setdefault(f.name, "default")
    sources.setdefault("transforms", "default")
    return cfg, tspec, sources


def describe(cfg: TrainConfig, sources: dict[str, str], transforms_text: str) -> list[str]:
    """One line per setting: `lr 0.01 (recipe lsq8 [train])`."""
    lines = []
    for k in SHOWN:
        if k == "transforms":
            lines.append(f"transforms {transforms_text} ({sources['transforms']})")
            continue
        v = getattr(cfg, k)
        if k == "max_iterations" and v is None:
            continue
        if v is None and k in ("quantizer_lr", "quantizer_decay", "norm_decay"):
            v = f"= {'lr' if k == 'quantizer_lr' else 'decay'}"
        elif isinstance(v, float):
            v = f"{v:g}"
        lines.append(f"{k} {v} ({sources[k]})")
    return lines
