"""`onnxqat.train(...)`: data + recipe stages + the loop; what the `onnxqat train` command calls.

Stages:
- `recipe` with a `previous_stage` (the two-phase SAT procedure): the quantizers of the previous stage's recipe are
  inserted on the float model (after stripping any quantizers it has), trained into `<out>/stage1`; its trained float
  weights (and BN statistics) are copied by name onto the float model, this recipe is inserted, and that model is
  trained into `<out>`. Both stages run `epochs` epochs.
- `recipe` without previous_stage: insert, then train.
- `init_from`: a trained model whose initializers are copied by name (and size) onto the model about to be trained
  (the second phase as a separate command); with a two-stage recipe it replaces the first stage.
- no recipe: the model is trained as given (a float model, or one that `onnxqat insert` already quantized).

Solver settings: explicit arguments, else the recipe's `train` table, else the defaults of TrainConfig.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field, fields
from pathlib import Path

import onnx

from onnxqat.errors import ModelError, RecipeError
from onnxqat.files import atomic_write_text
from onnxqat.ops.schema import is_quantizer
from onnxqat.training import artifacts as art
from onnxqat.training.data import Batches, check_labels, resolve_data, validation_split
from onnxqat.training.loop import FitResult, TrainConfig, fit
from onnxqat.training.transforms import Compose, build_transforms, default_transforms


@dataclass
class TrainResult:
    model_path: Path
    best_model_path: Path | None
    out_dir: Path
    metrics: list[dict] = field(default_factory=list)
    test_top1: float | None = None
    test_loss: float | None = None
    best_metric: float | None = None
    stages: list["TrainResult"] = field(default_factory=list)

    def __repr__(self) -> str:
        return (f"TrainResult(model_path={str(self.model_path)!r}, test_top1={self.test_top1}, "
                f"epochs={len(self.metrics)}, stages={len(self.stages)})")


def _load_model(model) -> onnx.ModelProto:
    if isinstance(model, onnx.ModelProto):
        return model
    p = Path(model)
    if not p.is_file():
        raise ModelError(f"model not found: {p}")
    try:
        return onnx.load(str(p))
    except Exception as exc:
        raise ModelError(f"{p}: not a readable ONNX model ({exc.__class__.__name__})") from None


def has_quantizers(model: onnx.ModelProto) -> bool:
    return any(is_quantizer(n) for n in model.graph.node)


_TRAIN_KEYS = {f.name for f in fields(TrainConfig)}
_ALIASES = {"learning_rate": "lr", "learning_rate_policy": "lr_policy", "policy": "lr_policy",
            "weight_decay": "decay", "quant_lr": "quantizer_lr", "quant_decay": "quantizer_decay",
            "warmup_epochs": "warmup", "max_epochs": "epochs"}


def _recipe_train(recipe) -> dict:
    if recipe is None:
        return {}
    t = dict(getattr(recipe, "train", None) or {})
    out = {}
    for k, v in t.items():
        key = _ALIASES.get(k, k)
        if key not in _TRAIN_KEYS and key != "transforms":
            known = ", ".join(sorted(_TRAIN_KEYS | set(_ALIASES) | {"transforms"}))
            raise RecipeError(f"{getattr(recipe, 'source', '<recipe>')}: unknown key 'train.{k}' (known: {known})")
        out[key] = v
    return out


def _load_recipe(recipe):
    if recipe is None:
        return None
    if not isinstance(recipe, (str, os.PathLike)):
        return recipe
    from onnxqat.recipes import load_recipe

    return load_recipe(recipe)


def _strip(model: onnx.ModelProto) -> onnx.ModelProto:
    from onnxqat.passes.strip import strip_quantizers

    return strip_quantizers(model) if has_quantizers(model) else model


def _insert(model: onnx.ModelProto, recipe) -> onnx.ModelProto:
    from onnxqat.passes.insert import insert

    return insert(_strip(model), recipe)


def _prepare_data(data, limit_train, limit_test, validation, seed, num_classes):
    train_ds, test_ds = resolve_data(data, seed=seed)
    train_ds, test_ds = train_ds.limit(limit_train), test_ds.limit(limit_test)
    train_ds, val_ds = validation_split(train_ds, validation, seed)
    k = num_classes or int(max(train_ds.labels.max(), test_ds.labels.max())) + 1
    for ds in (train_ds, val_ds, test_ds):
        if ds is not None:
            check_labels(ds, k)
    return train_ds, val_ds, test_ds


def train(model, data="fashion-mnist", *, epochs: int | None = None, out: str | os.PathLike = "runs/train",
          recipe=None, batch_size: int | None = None, lr: float | None = None, momentum: float | None = None,
          decay: float | None = None, lr_policy: str | None = None, warmup: float | None = None,
          iteration_size: int | None = None, quantizer_lr: float | None = None, quantizer_decay: float | None = None,
          solver: str | None = None, max_iterations: int | None = None, limit_train: int | None = None,
          limit_test: int | None = None, validation: float = 0.1, transforms=None, resume: bool = False,
          init_from=None, seed: int = 0, threads: int = 0, progress: bool = True, histograms: bool = True,
          eval_test: bool = True, log=print) -> TrainResult:
    """Trains `model` (path or ModelProto) on `data`; returns paths and metrics. See the module doc for stages."""
    base = _load_model(model)
    rec = _load_recipe(recipe)
    out = Path(out)
    explicit = {"epochs": epochs, "batch_size": batch_size, "lr": lr, "momentum": momentum, "decay": decay,
                "lr_policy": lr_policy, "warmup": warmup, "iteration_size": iteration_size,
                "quantizer_lr": quantizer_lr, "quantizer_decay": quantizer_decay, "solver": solver,
                "max_iterations": max_iterations, "seed": seed, "threads": threads, "eval_test": eval_test}

    def config_for(r) -> tuple[TrainConfig, Compose]:
        d = _recipe_train(r)
        tspec = d.pop("transforms", None)
        d.update({k: v for k, v in explicit.items() if v is not None})
        try:
            cfg = TrainConfig(**d)
        except TypeError as exc:
            raise RecipeError(f"train settings: {exc}") from None
        if transforms is not None:
            tf = transforms if isinstance(transforms, Compose) else build_transforms(transforms)
        elif tspec:
            tf = build_transforms(tspec)
        else:
            tf = default_transforms()
        return cfg, tf

    init_model = _load_model(init_from) if init_from is not None else None
    num_classes = art.plan_training(base).num_classes
    train_ds, val_ds, test_ds = _prepare_data(data, limit_train, limit_test, validation, seed, num_classes)

    def run_stage(m: onnx.ModelProto, r, stage_out: Path) -> TrainResult:
        cfg, tf = config_for(r)
        tb = Batches(train_ds, cfg.batch_size, tf, train=True, seed=cfg.seed)
        vb = Batches(val_ds, cfg.batch_size, tf, train=False, seed=cfg.seed) if val_ds is not None else None
        eb = Batches(test_ds, cfg.batch_size, tf, train=False, seed=cfg.seed)
        res: FitResult = fit(m, cfg, tb, vb, eb, stage_out, resume=resume, progress=progress, log=log)
        if histograms:
            from onnxqat.report.histograms import write_weight_histograms

            write_weight_histograms(res.model_path, stage_out / "histograms")
        atomic_write_text(stage_out / "done.json", json.dumps({"epochs": len(res.metrics), "test_top1": res.test_top1}))
        return TrainResult(res.model_path, res.best_model_path, stage_out, res.metrics, res.test_top1, res.test_loss,
                           res.best_metric)

    stages: list[TrainResult] = []
    copied: set[str] = set()
    if rec is None:
        m = base
        if init_model is not None:
            m, c = art.copy_initializers(m, init_model)
            copied.update(c)
    else:
        prev = getattr(rec, "previous_stage", None)
        float_model = _strip(base)
        if init_model is not None:
            # weights first, so that insert's data-dependent initialisation (LSQ steps) sees the trained ones
            float_model, c = art.copy_initializers(float_model, init_model)
            copied.update(c)
        elif prev is not None:
            prev_rec = _load_recipe(prev)
            s1_out = out / "stage1"
            if resume and (s1_out / "done.json").is_file() and (s1_out / "model.onnx").is_file():
                log(f"stage 1 ({getattr(prev_rec, 'name', prev)}) already done in {s1_out}")
                s1_model = onnx.load(str(s1_out / "model.onnx"))
                s1 = TrainResult(s1_out / "model.onnx", None, s1_out)
            else:
                log(f"stage 1: recipe {getattr(prev_rec, 'name', prev)}")
                s1 = run_stage(_insert(float_model, prev_rec), prev_rec, s1_out)
                s1_model = onnx.load(str(s1.model_path))
            stages.append(s1)
            float_model, c = art.copy_initializers(float_model, s1_model)
            log(f"stage 2: recipe {getattr(rec, 'name', recipe)} from stage 1's weights ({len(c)} tensors)")
        m = _insert(float_model, rec)
        if init_model is not None:
            # learnable quantizer parameters (alpha/step) of a model quantized with the same names; never the
            # constants (mode, range...), which belong to this recipe (a clamp-phase model has mode 0)
            m, c = art.copy_initializers(m, init_model, only=set(art.plan_training(m).quantizer_params))
            copied.update(c)
    if init_model is not None:
        if not copied:
            raise ModelError("--init-from: no initializer of that model matches this one by name and size")
        src = init_from if not isinstance(init_from, onnx.ModelProto) else "model"
        log(f"initialised {len(copied)} tensors from {src}")
    final = run_stage(m, rec, out)
    final.stages = stages
    return final
