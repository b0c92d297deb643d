"""Recipe files (recipes/*.toml) validated into frozen dataclasses.

A recipe says which quantizer goes on the weights of each weighted layer and on
the activations that feed them, with what range and initial parameters. The
schema is documented in recipes/README.md; every key is checked here (unknown
key, wrong type, value out of range -> RecipeError naming the key and the file).

    recipe = load_recipe("sat4")            # a shipped recipe, by name
    recipe = load_recipe("my/recipe.toml")  # or a file
    ws = recipe.weight_settings("Conv", "conv0", first=True, last=False)
"""

from __future__ import annotations

import dataclasses
import os
import sys
from dataclasses import dataclass, field
from pathlib import Path
from types import MappingProxyType
from typing import Any, Mapping

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

from onnxqat.errors import RecipeError

METHODS = ("sat", "lsq")
SAT_MODES = ("clamp", "quantize", "symmetric", "fullrange", "asymmetric", "asymmetric-clamp")
RESTORE_SCALE_MODES = ("always", "auto", "never")
WEIGHTED_OP_TYPES = ("Conv", "ConvTranspose", "Gemm", "MatMul")
MAX_RANGE = 65535  # 16 bits


@dataclass(frozen=True)
class WeightSettings:
    """How the weights of one weighted layer are quantized."""

    enabled: bool = True
    method: str = "sat"
    range: int = 15  # R = 2^bits - 1
    mode: str = "quantize"  # SAT: clamp | quantize | symmetric | fullrange | asymmetric | asymmetric-clamp (N2D2)
    apply_scaling: bool = False  # SAT ApplyScaling (fan-out from the layer)
    # SAT without ApplyScaling: the quantized weights times a constant per output channel (least squares on the float
    # weights), so that each layer keeps its scale: "auto" (only where no BatchNormalization follows: BN folded by the
    # exporter, whose scale DoReFa's [-1, 1] levels would lose), "always", "never" (N2D2's graph); true = "always",
    # false = "never"
    restore_scale: str | bool = "auto"
    # SAT, N2D2's QWeight.Mode=Integer: the layer reads integer-valued weights (the quantized levels times R, or
    # floor(R/2) in the (a)symmetric modes: odd integers in [-R, R], or [-h, h]), the factor is left to the
    # BatchNormalization after the layer (and to fuse); layers without one keep fake-quantized weights (a warning says
    # which); replaces restore_scale; needs apply_scaling = false
    integer: bool = False
    per_channel: bool = False  # LSQ: one step per output channel
    step: float | None = None  # LSQ initial step; None = from the weights, as step_init says
    step_init: str = "paper"  # LSQ step from the weights: paper 2*mean|W|/sqrt(Qp), max max|W|/Qp, mse least error

    @property
    def restore_scale_mode(self) -> str:
        if isinstance(self.restore_scale, bool):
            return "always" if self.restore_scale else "never"
        return self.restore_scale


@dataclass(frozen=True)
class ActivationSettings:
    """How the activations feeding weighted layers are quantized."""

    enabled: bool = True
    method: str = "sat"
    range: int = 15
    alpha: float = 1.0  # SAT initial alpha without calibration data (N2D2 code default)
    step: float = 0.05  # LSQ initial step without calibration data
    percentile: float = 99.99  # SAT alpha from calibration: this percentile of the activation
    # also quantize (signed) inputs no ReLU produced (BatchNorm outputs, residual sums ...); with method "sat" these
    # get signed LSQ quantizers (SAT's CG-PACT includes a ReLU)
    linear: bool = False
    # for integer export (fuse): also quantize the inputs of elementwise functions (Sigmoid, HardSwish ...: lookup
    # tables) and of Add/Mul/Concat of activations (residual branches, gates), as TFLite places its quantizers
    integer_export: bool = False
    # LSQ gradient scale g = 1/sqrt(N Qp): "paper" N = features of one sample (LSQ paper, Sec. 2.2), "n2d2" N = the
    # whole batch tensor (N2D2's LSQQuantizerActivation: batch x features, a factor sqrt(batch) smaller)
    grad_scale: str = "paper"
    grad_scale_batch: int = 0  # "n2d2": the batch size it assumes (0: the recipe's [train] batch_size, else 128)


MAX_PARAMETER = 1e30  # alpha / step above this overflow float32 once multiplied by a range (up to 65535) or squared


def _positive(v) -> bool:
    return 0 < v <= MAX_PARAMETER  # False for NaN and inf


def _in_range(v) -> bool:
    return 1 <= v <= MAX_RANGE


# key -> (accepted python types, check, description of the check)
_COMMON_KEYS: dict[str, tuple[tuple[type, ...], Any, str]] = {
    "enabled": ((bool,), None, ""),
    "method": ((str,), lambda v: v in METHODS, f"one of {', '.join(METHODS)}"),
    "range": ((int,), _in_range, f"an integer in [1, {MAX_RANGE}]"),
}
WEIGHT_KEYS = {
    **_COMMON_KEYS,
    "mode": ((str,), lambda v: v in SAT_MODES, f"one of {', '.join(SAT_MODES)}"),
    "apply_scaling": ((bool,), None, ""),
    "restore_scale": ((str, bool), lambda v: isinstance(v, bool) or v in RESTORE_SCALE_MODES,
                      f"true, false or one of {', '.join(RESTORE_SCALE_MODES)}"),
    "integer": ((bool,), None, ""),
    "per_channel": ((bool,), None, ""),
    "step": ((int, float), _positive, "finite, > 0 and <= 1e30"),
    "step_init": ((str,), lambda v: v in ("paper", "max", "mse"), "one of paper, max, mse"),
}
ACTIVATION_KEYS = {
    **_COMMON_KEYS,
    "alpha": ((int, float), _positive, "finite, > 0 and <= 1e30"),
    "step": ((int, float), _positive, "finite, > 0 and <= 1e30"),
    "percentile": ((int, float), lambda v: 0 < v <= 100, "in (0, 100]"),
    "linear": ((bool,), None, ""),
    "integer_export": ((bool,), None, ""),
    "grad_scale": ((str,), lambda v: v in ("paper", "n2d2"), "one of paper, n2d2"),
    "grad_scale_batch": ((int,), lambda v: v >= 0, ">= 0"),
}
NODE_KEYS = {**WEIGHT_KEYS, **ACTIVATION_KEYS}
TOP_KEYS = (
    "name", "description", "previous_stage", "weights", "activations",
    "op_types", "first_layer", "last_layer", "nodes", "train",
)


@dataclass(frozen=True)
class Recipe:
    name: str
    description: str
    weights: WeightSettings
    activations: ActivationSettings
    previous_stage: str | None = None
    # partial overrides, applied in this order: op type, first/last layer, node name
    op_types: Mapping[str, Mapping[str, Any]] = field(default_factory=lambda: MappingProxyType({}))
    first_layer: Mapping[str, Any] = field(default_factory=lambda: MappingProxyType({}))
    last_layer: Mapping[str, Any] = field(default_factory=lambda: MappingProxyType({}))
    nodes: Mapping[str, Mapping[str, Any]] = field(default_factory=lambda: MappingProxyType({}))
    train: Mapping[str, Any] = field(default_factory=lambda: MappingProxyType({}))
    source: str = "<memory>"
    toml_text: str = ""

    def weight_settings(self, op_type: str, node: str, first: bool = False, last: bool = False) -> WeightSettings:
        ws = self.weights
        layers = [self.op_types.get(op_type, {})]
        if first:
            layers.append(self.first_layer)
        if last:
            layers.append(self.last_layer)
        node_over = self.nodes.get(node, {})
        bad = sorted(set(node_over) - set(WEIGHT_KEYS))
        if bad:
            raise RecipeError(
                f"{self.source}: key 'nodes.\"{node}\".{bad[0]}' is an activation setting "
                f"but {node} is a weighted layer"
            )
        layers.append(node_over)
        for over in layers:
            if over:
                ws = dataclasses.replace(ws, **dict(over))
        return ws

    def activation_settings(self, node: str) -> ActivationSettings:
        acts = self.activations
        node_over = self.nodes.get(node, {})
        bad = sorted(set(node_over) - set(ACTIVATION_KEYS))
        if bad:
            raise RecipeError(
                f"{self.source}: key 'nodes.\"{node}\".{bad[0]}' is a weight setting but {node} is an activation"
            )
        if node_over:
            acts = dataclasses.replace(acts, **dict(node_over))
        return acts


# ------------------------------------------------------------------ loading

def recipe_dirs() -> list[Path]:
    """Where shipped recipes live: the repository's recipes/ (development), the installed onnxqat/recipes."""
    here = Path(__file__).resolve().parent
    dirs = [here / "recipes"]  # installed: the build copies recipes/ there
    if (here.parent / "pyproject.toml").is_file():  # a source checkout
        dirs.insert(0, here.parent / "recipes")
    return [d for d in dirs if d.is_dir()]


def _shipped() -> dict[str, Path]:
    found: dict[str, Path] = {}
    for d in recipe_dirs():
        for p in sorted(d.glob("*.toml")):
            found.setdefault(p.stem, p)
    return found


def list_recipes() -> list[Recipe]:
    """The shipped recipes, sorted by name."""
    return [load_recipe(p) for _, p in sorted(_shipped().items())]


def load_recipe(name_or_path: str | Path | Recipe) -> Recipe:
    """A Recipe from a shipped recipe's name or a TOML file's path."""
    if isinstance(name_or_path, Recipe):
        return name_or_path
    text_arg = str(name_or_path)
    path = Path(text_arg)
    looks_like_path = (
        isinstance(name_or_path, Path) or text_arg.endswith(".toml") or "/" in text_arg or os.sep in text_arg
    )
    if not looks_like_path:  # a shipped recipe's name first, then a file of that name
        shipped = _shipped()
        if text_arg in shipped:
            path = shipped[text_arg]
        elif not path.is_file():
            raise RecipeError(
                f"unknown recipe '{text_arg}' (shipped: {', '.join(sorted(shipped)) or 'none'}; or give a .toml path)"
            )
    if not path.is_file():
        raise RecipeError(f"recipe file not found: {path}")
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise RecipeError(f"{path}: cannot read recipe ({exc})") from None
    return parse_recipe(text, source=str(path), default_name=path.stem)


def parse_recipe(text: str, source: str = "<string>", default_name: str = "recipe") -> Recipe:
    """A Recipe from TOML text; `source` names the file in error messages."""
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise RecipeError(f"{source}: not valid TOML ({exc})") from None

    def fail(key: str, problem: str) -> RecipeError:
        return RecipeError(f"{source}: key '{key}' {problem}")

    def check_table(value, key: str, allowed: dict) -> dict:
        if not isinstance(value, dict):
            raise fail(key, f"must be a table, got {type(value).__name__}")
        out = {}
        for k, v in value.items():
            full = f"{key}.{k}"
            if k not in allowed:
                raise fail(full, f"is unknown (expected one of: {', '.join(allowed)})")
            types, check, what = allowed[k]
            if isinstance(v, bool) and bool not in types or not isinstance(v, types):
                names = " or ".join("float" if t is float else t.__name__ for t in types)
                raise fail(full, f"must be {names}, got {type(v).__name__} {v!r}")
            if check is not None and not check(v):
                raise fail(full, f"must be {what}, got {v!r}")
            out[k] = float(v) if float in types and not isinstance(v, bool) else v
        return out

    def check_str(key: str, required: bool = False) -> str | None:
        v = data.get(key)
        if v is None:
            if required:
                raise fail(key, "is missing")
            return None
        if not isinstance(v, str):
            raise fail(key, f"must be a string, got {type(v).__name__} {v!r}")
        return v

    for k in data:
        if k not in TOP_KEYS:
            raise fail(k, f"is unknown (expected one of: {', '.join(TOP_KEYS)})")
    name = check_str("name") or default_name
    description = check_str("description") or ""
    previous_stage = check_str("previous_stage")

    weights = WeightSettings(**check_table(data.get("weights", {}), "weights", WEIGHT_KEYS))
    activations = ActivationSettings(**check_table(data.get("activations", {}), "activations", ACTIVATION_KEYS))
    if activations.integer_export and not activations.linear:
        raise fail("activations.integer_export", "needs linear = true (its quantizers are signed)")

    op_types_raw = data.get("op_types", {})
    if not isinstance(op_types_raw, dict):
        raise fail("op_types", "must be a table")
    op_types = {}
    for op, table in op_types_raw.items():
        if op not in WEIGHTED_OP_TYPES:
            raise fail(f"op_types.{op}", f"is unknown (weighted op types: {', '.join(WEIGHTED_OP_TYPES)})")
        op_types[op] = MappingProxyType(check_table(table, f"op_types.{op}", WEIGHT_KEYS))
    first = check_table(data.get("first_layer", {}), "first_layer", WEIGHT_KEYS)
    last = check_table(data.get("last_layer", {}), "last_layer", WEIGHT_KEYS)

    nodes_raw = data.get("nodes", {})
    if not isinstance(nodes_raw, dict):
        raise fail("nodes", "must be a table")
    nodes = {
        n: MappingProxyType(check_table(t, f'nodes."{n}"', NODE_KEYS)) for n, t in nodes_raw.items()
    }
    train = data.get("train", {})
    if not isinstance(train, dict):
        raise fail("train", "must be a table")

    return Recipe(
        name=name,
        description=description,
        weights=weights,
        activations=activations,
        previous_stage=previous_stage,
        op_types=MappingProxyType(op_types),
        first_layer=MappingProxyType(first),
        last_layer=MappingProxyType(last),
        nodes=MappingProxyType(nodes),
        train=MappingProxyType(dict(train)),
        source=source,
        toml_text=text,
    )
