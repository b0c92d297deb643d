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

Settings (settings.py): explicit arguments, else the recipe's [train] table, else the one insert recorded in the model,
else TrainConfig's defaults; each is printed with its source. Before the first update the model is evaluated as it is,
and after epoch 1 a model far worse than that is a warning (loop.first_epoch_warning).

Models of any shape (objective.py, feeds.py): the data goes to one input (any rank; images in NCHW or NHWC, resized
and converted to the input's size and channels), other inputs take per-input .npz arrays or constants, the loss is
cross-entropy with labels or distillation from the float model (MSE, L1, KL) over one or several outputs.
Activation quantizers insert left uncalibrated are initialised from the first training batches (quantizer_init.py).
"""

from __future__ import annotations

import functools
import json
import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import onnx

from onnxqat.errors import DataError, ModelError, RecipeError
from onnxqat.files import atomic_write_text
from onnxqat.ops.schema import is_quantizer
from onnxqat.training import artifacts as art
from onnxqat.training import settings as st
from onnxqat.training.data import Batches, check_labels, resolve_data, validation_split
from onnxqat.training.distributed import default_threads, fail_fast, world
from onnxqat.training.feeds import Feeder, image_size, input_layout
from onnxqat.training.loop import FitResult, fit
from onnxqat.training.objective import Objective, resolve
from onnxqat.training.transforms import ColorSpace, Compose, RangeAffine, Rescale, build_transforms


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
    initial: dict | None = None  # evaluation before the first update: {"set", "loss", "top1"}
    trained: onnx.ModelProto | None = field(default=None, repr=False)  # the trained model, in memory

    def __repr__(self) -> str:
        return (f"TrainResult(model_path={str(self.model_path)!r}, test_top1={self.test_top1}, "
                f"epochs={len(self.metrics)}, stages={len(self.stages)})")


def _load_model(model) -> onnx.ModelProto:
    """The model (not copied when given as a ModelProto: train never edits it), its tensors and quantizer nodes
    checked (graph.load_model)."""
    from onnxqat.graph import check_quantizer_nodes, check_tensor_sizes, load_model

    if isinstance(model, onnx.ModelProto):
        check_tensor_sizes(model)
        check_quantizer_nodes(model)
        return model
    if not isinstance(model, (str, os.PathLike)):
        raise ModelError(f"model must be a path or an onnx.ModelProto, got {type(model).__name__}")
    if not Path(model).is_file():
        raise ModelError(f"model not found: {Path(model)}")
    return load_model(model)


def has_quantizers(model: onnx.ModelProto) -> bool:
    return any(is_quantizer(n) for n in model.graph.node)


def _recipe_train(recipe) -> dict:
    """A recipe's [train] table with aliases resolved (RecipeError for an unknown key)."""
    layer = st.recipe_layer(recipe)
    return layer[1] if layer else {}


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


def _insert(model: onnx.ModelProto, recipe, calibration_data=None) -> onnx.ModelProto:
    from onnxqat.passes.insert import insert

    return insert(_strip(model), recipe, calibration_data=calibration_data)


def _normalisation(scale, mean, std, dtype) -> list:
    """The user's normalisation: x / scale (default 255 for 8-bit data, else 1), then (x - mean) / std."""
    if scale is None:
        scale = 255.0 if dtype == np.uint8 else 1.0
    out = [] if float(scale) == 1.0 else [RangeAffine("Divides", float(scale))]
    if mean is not None or std is not None:
        out.append(RangeAffine("Minus", mean if mean is not None else 0.0, "Divides", std if std is not None else 1.0))
    return out


def _adapt_to_input(tf: Compose, ds, dims: tuple) -> tuple[Compose, str | None]:
    """Appends the Rescale / ColorSpace that bring the data's images to the model input's size and channels."""
    c_want, h_want, w_want = image_size(dims)
    x = tf(ds.images[:1], np.random.default_rng(0), False)
    _, h, w, c = x.shape
    extra, said = [], []
    if c_want and c != c_want:
        if c_want == 3 and c == 1:
            extra.append(ColorSpace("RGB"))
        elif c_want == 1 and c in (3, 4):
            extra.append(ColorSpace("Gray"))
        else:
            raise DataError(f"the data has {c} channel(s), the model input expects {c_want}")
        said.append(f"{c} -> {c_want} channels")
    if (h_want and h != h_want) or (w_want and w != w_want):
        extra.append(Rescale(w_want or w, h_want or h))
        said.append(f"{h}x{w} -> {h_want or h}x{w_want or w}")
    if not extra:
        return tf, None
    return Compose(tf.transforms + extra), ", ".join(said)


def _train(model, data="fashion-mnist", *, epochs: int | None = None, out: str | os.PathLike = "runs/train",
          recipe=None, batch_size: int | None = None, lr: float | None = None, momentum: float | None = None,
          decay: float | None = None, lr_policy: str | None = None, warmup: float | None = None,
          iteration_size: int | None = None, quantizer_lr: float | None = None, quantizer_decay: float | None = None,
          norm_decay: float | None = None, momentum_form: str | None = None, calibration_data=None,
          solver: str | None = None, max_iterations: int | None = None, limit_train: int | None = None,
          limit_test: int | None = None, validation: float = 0.1, transforms=None, resume: bool = False,
          init_from=None, seed: int = 0, threads: int = 0, progress: bool = True, histograms: bool = True,
          eval_test: bool = True, log=print, loss: str | None = None, loss_outputs=(), distill: bool = False,
          teacher=None, temperature: float = 1.0, data_input: str | None = None, inputs: dict | None = None,
          scale: float | None = None, mean=None, std=None, init_quantizers: bool = True,
          settings_source: str = "argument") -> TrainResult:
    """Trains `model` (path or ModelProto) on `data`; returns paths and metrics. See the module doc.

    loss: ce | mse | l1 | kl (default: ce with labels, mse distillation without); loss_outputs: "name" or
    "name:weight" of the outputs the loss reads; distill / teacher (a float ONNX; default the model without its
    quantizers): targets from the float model; data_input: the input that takes the data; inputs: {name: value}
    for the other inputs; scale, mean, std: the input normalisation (x / scale - mean) / std; init_quantizers:
    initialise uncalibrated activation quantizers from the first batches. calibration_data: with `recipe`, insert's
    calibration data (.npz/.npy or {input: array}) for the quantizers it inserts; norm_decay: weight decay of
    BatchNorm/LayerNorm scale and shift (None: decay); momentum_form: "n2d2" (lr inside the momentum buffer) or
    "pytorch"."""
    comm = world()
    if not comm.is_root:  # rank 0 speaks for the job
        log, progress = (lambda *_a, **_k: None), False
    import math

    if not (isinstance(validation, (int, float)) and math.isfinite(validation) and 0 <= validation < 1):
        raise DataError(f"validation must be a fraction in [0, 1), got {validation!r}")
    for key, v in (("limit_train", limit_train), ("limit_test", limit_test)):
        if v is not None and not (isinstance(v, int) and not isinstance(v, bool) and v >= 1):
            raise DataError(f"{key} must be a number of samples >= 1, got {v!r}")
    if comm.size > 1 and not threads:
        threads = default_threads(comm)
    base = _load_model(model)
    rec = _load_recipe(recipe)
    out = Path(out)
    explicit = {"epochs": epochs, "batch_size": batch_size, "lr": lr, "momentum": momentum, "decay": decay,
                "lr_policy": lr_policy, "warmup": warmup, "iteration_size": iteration_size,
                "quantizer_lr": quantizer_lr, "quantizer_decay": quantizer_decay, "norm_decay": norm_decay,
                "momentum_form": momentum_form, "solver": solver,
                "max_iterations": max_iterations, "seed": seed, "threads": threads, "eval_test": eval_test}
    teacher_model = _load_model(teacher) if teacher is not None else None
    objective = Objective(loss, tuple(loss_outputs or ()), bool(distill or teacher is not None), temperature,
                          data_input)

    # the model's inputs decide how the data is read
    from onnxqat.training.objective import choose_data_input, graph_inputs

    d_in = choose_data_input(base, data_input)
    dims = next(art._dims(i) for i in graph_inputs(base) if i.name == d_in)
    image_input = len(dims) == 4
    c_want, h_want, w_want = image_size(dims) if image_input else (None, None, None)
    train_ds, test_ds = resolve_data(data, seed=seed, image_input=image_input,
                                     input_names=tuple(i.name for i in graph_inputs(base)), data_input=d_in,
                                     size=(h_want, w_want) if image_input else None, channels=c_want)
    train_ds, test_ds = train_ds.limit(limit_train), test_ds.limit(limit_test)
    train_ds, val_ds = validation_split(train_ds, validation, seed)
    if val_ds is None:
        log("warning: no validation set (--validation 0): model_best.onnx is chosen on the test set, so its test "
            "accuracy is optimistic; hold out a fraction with --validation to choose on data the figure does not use")
    has_labels = train_ds.labels is not None
    io = resolve(base, objective, has_labels)
    num_classes = art.plan_training(base, io).num_classes
    if io.uses_labels:
        k = num_classes or int(max(train_ds.labels.max(), test_ds.labels.max())) + 1
        for ds in (train_ds, val_ds, test_ds):
            if ds is not None:
                check_labels(ds, k)

    def config_for(r, m: onnx.ModelProto):
        layers = [st.recipe_layer(r), st.model_layer(m)]
        cfg, tspec, sources = st.resolve(explicit, settings_source, layers)
        if transforms is not None:
            tf = transforms if isinstance(transforms, Compose) else build_transforms(transforms)
            sources["transforms"], text = settings_source, "given"
        elif tspec:
            tf, text = build_transforms(tspec), "from the recipe"
        else:
            tf = Compose(_normalisation(scale, mean, std, train_ds.images.dtype))
            if scale is not None or mean is not None or std is not None:
                sources["transforms"] = settings_source
            text = _describe_normalisation(tf)
        note = None
        if image_input and not train_ds.raw:
            tf, note = _adapt_to_input(tf, train_ds, dims)
        return cfg, tf, sources, text, note

    def run_stage(m: onnx.ModelProto, r, stage_out: Path) -> TrainResult:
        cfg, tf, sources, ttext, note = config_for(r, m)
        log("settings:\n" + "\n".join(f"  {line}" for line in st.describe(cfg, sources, ttext)))
        if note:
            log(f"data: images converted to the model input {d_in} ({input_layout(dims)}): {note}")
        tb = Batches(train_ds, cfg.batch_size, tf, train=True, seed=cfg.seed)
        vb = Batches(val_ds, cfg.batch_size, tf, train=False, seed=cfg.seed) if val_ds is not None else None
        eb = Batches(test_ds, cfg.batch_size, tf, train=False, seed=cfg.seed)
        if init_quantizers:
            m = _init_quantizers(m, io, tb, inputs, log)
        res: FitResult = fit(m, cfg, tb, vb, eb, stage_out, resume=resume, progress=progress, log=log, io=io,
                             constants=inputs, teacher_model=teacher_model, comm=comm)
        if comm.is_root:
            if histograms:
                from onnxqat.report.histograms import write_weight_histograms

                write_weight_histograms(res.model_path, stage_out / "histograms")
            atomic_write_text(stage_out / "done.json", json.dumps({"epochs": len(res.metrics),
                                                                   "test_top1": res.test_top1}))
        comm.barrier()
        result = TrainResult(res.model_path, res.best_model_path, stage_out, res.metrics, res.test_top1,
                             res.test_loss, res.best_metric, initial=res.initial)
        result.trained = art.write_back(m, res.params)  # the next stage's start, on every rank without a file read
        return result

    init_model = _load_model(init_from) if init_from is not None else None
    stages: list[TrainResult] = []
    copied: set[str] = set()
    if rec is None:
        if calibration_data is not None:
            raise RecipeError("calibration_data (--calibration-data) is for the quantizers train inserts with a recipe "
                              "(--recipe); this model is trained as it is")
        m = base
        if init_model is not None:
            m, c = art.copy_initializers(m, init_model)
            copied.update(c)
    else:
        prev = getattr(rec, "previous_stage", None)
        float_model = _strip(base)
        if prev is not None and init_model is not None:
            log(f"--init-from given: recipe {getattr(rec, 'name', recipe)}'s first stage ({prev}) is skipped; "
                "training starts from that model's weights")
        elif prev is not None:
            log(f"recipe {getattr(rec, 'name', recipe)} trains in two stages ({prev}, then "
                f"{getattr(rec, 'name', recipe)}): the epochs setting applies to each stage")
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
                s1 = run_stage(_insert(float_model, prev_rec, calibration_data), prev_rec, s1_out)
                s1_model = s1.trained
            stages.append(s1)
            float_model, c = art.copy_initializers(float_model, s1_model)
            log(f"stage 2: recipe {getattr(rec, 'name', recipe)} from stage 1's weights ({len(c)} tensors)")
        m = _insert(float_model, rec, calibration_data)
        if init_model is not None:
            # learnable quantizer parameters (alpha/step) of a model quantized with the same names; never the
            # constants (mode, range...), which belong to this recipe (a clamp-phase model has mode 0)
            m, c = art.copy_initializers(m, init_model, only=set(art.plan_training(m, io).quantizer_params))
            copied.update(c)
    if init_model is not None:
        if not copied:
            raise ModelError("--init-from: no initializer of that model matches this one by name and size")
        src = init_from if not isinstance(init_from, onnx.ModelProto) else "model"
        log(f"initialised {len(copied)} tensors from {src}")
        from onnxqat.training.quantizer_init import forget

        m = forget(m, [n.name for n in m.graph.node if is_quantizer(n) and len(n.input) > 1 and n.input[1] in copied])
    final = run_stage(m, rec, out)
    final.stages = stages
    return final


@fail_fast
@functools.wraps(_train)
def train(model, data="fashion-mnist", **kwargs) -> TrainResult:
    # the output folder belongs to this run while it lasts (a second training into it would mix checkpoints);
    # under MPI rank 0 holds it for the job
    from contextlib import nullcontext

    from onnxqat.files import FolderLock

    out = kwargs.get("out", "runs/train")
    lock = FolderLock(out, "another training") if world().is_root else nullcontext()
    with lock:
        if getattr(lock, "stale", None):
            kwargs.get("log", print)(f"{out}: took over the lock of a run that ended without releasing it "
                                     f"({lock.stale}); its temporary files were removed")
        return _train(model, data, **kwargs)


def _describe_normalisation(tf: Compose) -> str:
    parts = []
    for t in tf.transforms:
        for op, v in t.ops:
            vals = ",".join(f"{x:g}" for x in v)
            parts.append({"divides": "/", "minus": "-", "plus": "+", "multiplies": "*"}[op] + vals)
    return "x " + " ".join(parts) if parts else "none"


def _init_quantizers(m: onnx.ModelProto, io, batches: Batches, constants, log) -> onnx.ModelProto:
    """Uncalibrated activation quantizers from the first training batches (up to 256 samples, in order)."""
    from onnxqat.training.quantizer_init import init_from_data, uncalibrated

    if not uncalibrated(m):
        return m
    plan = art.plan_training(m, io)
    feeder = Feeder(plan, constants)
    ordered = Batches(batches.ds, batches.batch_size, batches.transforms, train=False, seed=batches.seed)
    chunks = []
    for _, x, _, extras in ordered.epoch_extras(0):
        chunks.append(feeder.model_inputs(x, extras))
        if sum(len(next(iter(c.values()))) for c in chunks) >= 256:
            break
    feeds = {k: np.concatenate([c[k] for c in chunks]) for k in chunks[0]}
    m, messages = init_from_data(m, feeds)
    if messages:
        n = len(next(iter(feeds.values())))
        log(f"{len(messages)} activation quantizer(s) not calibrated at insert, initialised from the first {n} "
            "training samples: " + "; ".join(messages))
    return m
