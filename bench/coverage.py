"""How much of the model corpus (tests/corpus) onnxqat handles: one table row per model and opset.

    .venv/bin/python bench/coverage.py [--models resnet18,vit] [--opsets 13] [--recipes sat4,lsq4,lsq8]
                                       [--steps 20] [--train-all-recipes] [--tier ci|pypi|all]
                                       [--json out.json] [--work DIR]

For each corpus model: `onnxqat.insert` with every recipe of --recipes; then, with the first of them, 20 training
steps through the public `onnxqat.train` (labels: a few hundred Fashion-MNIST images resized and replicated to the
model's data input, for classifiers; distillation from the float model, for every model) and `onnxqat.fuse` of the
trained model (of the inserted one when training failed) to the integer and the QDQ format. Nothing stops the run:
a failing step leaves its cells at FAIL and the first line of its error in `messages`.

Columns: "train" is "labels / distillation" ("-": not a classifier); distillation calls
`onnxqat.train(qat, data, teacher=<float model path>)`; both with the settings insert recorded from the recipe, and
the training images as test set, so "loss before->after" compares the loss on the same images before the first
update and after the last ("(up)": it rose). "training graph": what train changed in its training copy (opset
conversion, rewrites of ops without an ORT gradient, docs/training-ops.md). "train other recipes": with
--train-all-recipes, the same runs with the other recipes of --recipes (the full matrix). "steps/s": optimizer
steps over train's own epoch seconds (--threads onnxruntime threads). "integer nodes %" and "float islands": nodes of
the integer-format model with no float tensor in or out, between the boundary conversions (`integer_share`).
"agreement": fuse's self-check, fused vs fake-quantized model on --verify-samples Fashion-MNIST images in the
model's layout, size and value range. "size": float model file -> fused integer model.

Adding a column is one function: decorate `def my_column(case: Case) -> str` with `@column("header")` (columns
print in definition order; "{recipes}" in a header becomes the --recipes list). A column reads the shared, cached
steps of the row (`case.qat(recipe)`, `case.trained("labels")`, `case.fused("int")`, `case.real_images()`, ...),
each run at most once per row whatever the number of columns that use it; a new step is a `Case` method that
wraps its work in `self.step(key, fn)`.
"""

from __future__ import annotations

import argparse
import contextlib
import inspect
import io
import json
import os
import shutil
import sys
import tempfile
import time
import warnings
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
import onnx

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import onnxqat  # noqa: E402
from tests.corpus import CorpusModel, build_corpus  # noqa: E402

FAIL = "FAIL"


def first_line(exc: BaseException) -> str:
    """The error's first line; when that is an onnxruntime C++ location (no op named), the end of the chained
    cause too, which names the op and node ("... has not been registered: HardSigmoid for node ...")."""
    text = str(exc).strip().splitlines()
    line = f"{type(exc).__name__}: {text[0] if text else ''}"
    cause = exc.__cause__
    if "onnxruntime_src" in line and cause is not None:
        line = line.split("/onnxruntime_src")[0] + "... " + " ".join(str(cause).split())[-110:]
    return line[:400]


# ------------------------------------------------------------------------------------------------ data

_FASHION = None


def fashion_mnist():
    """(train, test) Fashion-MNIST as onnxqat.training.data.Dataset, loaded once."""
    global _FASHION
    if _FASHION is None:
        from onnxqat.training.data import resolve_data

        _FASHION = resolve_data("fashion-mnist")
    return _FASHION


def images_for(m: CorpusModel, n_train: int, n_test: int):
    """Fashion-MNIST resized (bilinear) to the data input's height and width, grey replicated to its channels,
    as uint8 [N, H, W, C] Datasets the way onnxqat.train takes them; labels modulo num_classes."""
    from PIL import Image

    from onnxqat.training.data import Dataset

    spec = m.data_input
    if len(spec.shape) != 4 or spec.layout not in ("NCHW", "NHWC"):
        raise ValueError(f"data input {spec.name} {spec.shape} is not an image")
    c, h, w = spec.shape[1:] if spec.layout == "NCHW" else (spec.shape[3], spec.shape[1], spec.shape[2])
    out = []
    for ds, n in zip(fashion_mnist(), (n_train, n_test)):
        n = max(n, 1)
        imgs = [np.asarray(Image.fromarray(x[..., 0]).resize((w, h), Image.BILINEAR)) for x in ds.images[:n]]
        x = np.repeat(np.stack(imgs)[..., None], c, axis=3)
        k = m.num_classes or 10
        out.append(Dataset(x, (ds.labels[:n] % k).astype(np.int64), f"fashion-mnist@{h}x{w}x{c}"))
    return tuple(out)


def range_transform(m: CorpusModel) -> list[dict]:
    """uint8 pixels -> the data input's value range (onnxqat.train's transform spec)."""
    lo, hi = m.value_range
    return [{"type": "RangeAffine", "first_operator": "Multiplies", "first_value": (hi - lo) / 255.0,
             "second_operator": "Plus", "second_value": lo}]


# ------------------------------------------------------------------------------------------------ one row

@dataclass
class Case:
    """One corpus model in one run: its steps run lazily, at most once, failures recorded in `messages`."""

    model: CorpusModel
    args: argparse.Namespace
    work: Path
    messages: list[str] = field(default_factory=list)
    _done: dict = field(default_factory=dict)
    train_log: dict = field(default_factory=dict)

    def step(self, key: str, fn: Callable):
        """fn() once per key; an exception becomes None and the message '<key>: <Type>: <first line>'."""
        if key not in self._done:
            out = io.StringIO()
            t0 = time.perf_counter()
            try:
                with warnings.catch_warnings(), contextlib.redirect_stdout(out):
                    warnings.simplefilter("ignore")
                    self._done[key] = (fn(), time.perf_counter() - t0)
            except Exception as exc:  # noqa: BLE001 -- the table records every failure
                self.messages.append(f"{key}: {first_line(exc)}")
                self._done[key] = (None, time.perf_counter() - t0)
        return self._done[key][0]

    def result(self, key: str):
        """What step `key` returned, None when it failed or has not run."""
        return self._done.get(key, (None, None))[0]

    def seconds(self, key: str) -> float | None:
        return self._done.get(key, (None, None))[1]

    def steps(self) -> dict[str, tuple]:
        """step key -> (result or None, seconds), in the order they ran."""
        return dict(self._done)

    @property
    def recipe(self) -> str:
        return self.args.recipes[0]

    def qat(self, recipe: str) -> Path | None:
        def run():
            path = self.work / f"{self.model.key.replace('@', '.op')}.{recipe}.qat.onnx"
            onnx.save(onnxqat.insert(str(self.model.path), recipe), str(path))
            return path
        return self.step(f"insert {recipe}", run)

    def trained(self, mode: str, recipe: str | None = None):
        """mode "labels" (classifiers) or "distillation"; returns onnxqat's TrainResult. Settings: the recipe's [train]
        table that insert recorded (what a user gets), --steps updates of --batch images; the test set is the
        training images, so TrainResult.initial["loss"] and .test_loss are the loss before and after on the same
        images. The run's log lines go to self.train_log[(mode, recipe)]."""
        recipe = recipe or self.recipe
        qat = self.qat(recipe)
        if qat is None:
            return None
        log = self.train_log.setdefault((mode, recipe), [])
        others = {i.name: np.zeros(i.shape[1:], np.float32) for i in self.model.inputs if i.role != "data"}
        kw = dict(out=self.work / f"{self.model.key}.{recipe}.{mode}", max_iterations=self.args.steps, epochs=1,
                  batch_size=self.args.batch, validation=0.0, eval_test=False, histograms=False, progress=False,
                  threads=self.args.threads, transforms=range_transform(self.model), log=log.append, inputs=others)
        n_train = self.args.steps * self.args.batch
        key = f"train {mode}" if recipe == self.recipe else f"train {mode} {recipe}"

        def run():
            train, _ = images_for(self.model, n_train, self.args.batch)
            data = (train, train)
            if mode == "labels":
                return onnxqat.train(str(qat), data=data, **kw)
            params = inspect.signature(onnxqat.train).parameters
            if "teacher" not in params:
                raise NotImplementedError("onnxqat.train has no distillation option (no 'teacher' parameter)")
            return onnxqat.train(str(qat), data=data, teacher=str(self.model.path), **kw)
        return self.step(key, run)

    def real_images(self) -> np.ndarray | None:
        """A batch of Fashion-MNIST images as the data input takes them (layout, size, value range), float32."""
        def run():
            _, test = images_for(self.model, 0, self.args.verify_samples)
            lo, hi = self.model.value_range
            x = lo + (hi - lo) * test.images.astype(np.float32) / 255.0
            return x if self.model.data_input.layout == "NHWC" else np.ascontiguousarray(x.transpose(0, 3, 1, 2))
        return self.step("real images", run)

    def fused(self, fmt: str):
        """onnxqat.fuse of the labels-trained model, else the distilled one, else the inserted one, with no
        options but its self-check on a batch of real images."""
        def run():
            src = None
            for mode in ("labels", "distillation"):
                r = self.result(f"train {mode}")
                if r is not None:
                    src = r.model_path
                    break
            src = src or self.qat(self.recipe)
            if src is None:
                raise RuntimeError(f"no QAT model ({self.recipe} insert failed)")
            out = self.work / f"{self.model.key}.{fmt}.onnx"
            lo, hi = self.model.value_range  # one code per pixel step: 1/255 for 0..1 images, 1 for 0..255
            return onnxqat.fuse(str(src), str(out), format=fmt, verify_engine="onnxruntime",
                                verify_data=self.real_images(), verify_samples=self.args.verify_samples,
                                input_scale=(hi - lo) / 255 if lo == 0 else 1 / 255)
        return self.step(f"fuse {fmt}", run)


# ------------------------------------------------------------------------------------------------ columns

COLUMNS: list[tuple[str, Callable[[Case], str]]] = []


def column(header: str):
    def register(fn):
        COLUMNS.append((header, fn))
        return fn
    return register


def ok(value) -> str:
    return FAIL if value is None else "ok"


@column("model")
def col_model(case: Case) -> str:
    return case.model.name


@column("opset")
def col_opset(case: Case) -> str:
    return str(case.model.opset)


@column("insert {recipes}")
def col_insert(case: Case) -> str:
    return "/".join(ok(case.qat(r)) for r in case.args.recipes)


@column("train (labels / distillation)")
def col_train(case: Case) -> str:
    labels = "-" if not case.model.num_classes else ok(case.trained("labels"))
    return f"{labels} / {ok(case.trained('distillation'))}"


def loss_change(r) -> str:
    """'before -> after' of a TrainResult, on the same images (trained() makes them so)."""
    if r is None or not r.initial or r.test_loss is None:
        return FAIL if r is None else "?"
    a, b = r.initial["loss"], r.test_loss
    return f"{a:.3g}->{b:.3g}" + ("" if b < a else " (up)")


@column("loss before->after (labels / distillation)")
def col_loss(case: Case) -> str:
    labels = "-" if not case.model.num_classes else loss_change(case.trained("labels"))
    return f"{labels} / {loss_change(case.trained('distillation'))}"


@column("training graph")
def col_training_graph(case: Case) -> str:
    """What train changed in its training copy (opset conversion, op rewrites), from the run's log."""
    said = []
    for (_, recipe), lines in case.train_log.items():
        if recipe != case.recipe:
            continue
        for line in lines:
            if line.startswith("training graph converted from opset"):
                said.append("opset " + line.split("from opset ")[1].split(" (")[0].replace(" to ", "->"))
            elif line.startswith("training graph: "):
                said.append("rewritten: " + line.split("differentiate them (")[-1].split(";")[0])
    return "; ".join(dict.fromkeys(said)) or "-"


@column("train other recipes (labels / distillation)")
def col_train_all(case: Case) -> str:
    """--train-all-recipes: the same two runs with every other recipe of --recipes (the full matrix)."""
    if not case.args.train_all_recipes:
        return "-"
    cells = []
    for r in case.args.recipes[1:]:
        labels = "-" if not case.model.num_classes else ok(case.trained("labels", r))
        cells.append(f"{r} {labels}/{ok(case.trained('distillation', r))}")
    return ", ".join(cells) or "-"


@column("steps/s")
def col_steps(case: Case) -> str:
    """Optimizer steps per second of the labels run (else the distillation run), from train's own metrics."""
    for mode in ("labels", "distillation"):
        r = case.result(f"train {mode}")
        if r is not None and r.metrics:
            row = r.metrics[-1]
            secs = sum(m.get("epoch_seconds") or 0 for m in r.metrics)
            return f"{row['iterations'] / secs:.2f}" if secs else "?"
    return "-"


@column("fuse int / qdq")
def col_fuse(case: Case) -> str:
    return f"{ok(case.fused('int'))} / {ok(case.fused('qdq'))}"


def integer_share(model: onnx.ModelProto) -> tuple[int, int, Counter]:
    """(integer nodes, nodes, op types of the float ones) between the graph's inputs and outputs: a node is float
    when one of its inputs or outputs is a float tensor. Constant nodes and the boundary conversions (nodes that
    read a graph input or write a graph output) are left out of both counts."""
    from onnx import shape_inference

    g = shape_inference.infer_shapes(model).graph
    elem = {v.name: v.type.tensor_type.elem_type for v in list(g.value_info) + list(g.input) + list(g.output)}
    elem.update({t.name: t.data_type for t in g.initializer})
    floats = {onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT16, onnx.TensorProto.DOUBLE, onnx.TensorProto.BFLOAT16}
    ins, outs = {i.name for i in g.input}, {o.name for o in g.output}
    integer, total, islands = 0, 0, Counter()
    for n in g.node:
        if n.op_type == "Constant" or set(n.input) & ins or set(n.output) & outs:
            continue
        total += 1
        if any(elem.get(t) in floats for t in list(n.input) + list(n.output) if t):
            islands[n.op_type] += 1
        else:
            integer += 1
    return integer, total, islands


@column("integer nodes %")
def col_integer(case: Case) -> str:
    r = case.fused("int")
    if r is None:
        return "-"
    i, t, _ = integer_share(r.model)
    return f"{100 * i / t:.1f} ({i}/{t})" if t else "-"


@column("float islands")
def col_islands(case: Case) -> str:
    r = case.fused("int")
    if r is None:
        return "-"
    _, _, islands = integer_share(r.model)
    return " ".join(f"{op}:{k}" for op, k in islands.most_common()) or "none"


@column("agreement with fake-quant")
def col_agreement(case: Case) -> str:
    r = case.fused("int")
    if r is None or r.agreement is None:
        return "-"
    a = r.agreement
    return (f"layer by layer {100 * a.local_agreement:.2f}%; end to end codes {100 * a.code_agreement:.2f}%, "
            f"top-1 {100 * a.top1_agreement:.0f}%")


@column("size")
def col_size(case: Case) -> str:
    r = case.fused("int")
    src = os.path.getsize(case.model.path)
    return f"{src / 1e3:.0f} kB" + ("" if r is None else f" -> {r.size / 1e3:.0f} kB")


@column("messages")
def col_messages(case: Case) -> str:
    return "; ".join(case.messages)


# ------------------------------------------------------------------------------------------------ main

def markdown(headers: list[str], rows: list[list[str]], width: int = 240) -> str:
    def cell(s: str) -> str:
        s = s.replace("|", "\\|")
        return s if len(s) <= width else s[: width - 3] + "..."
    lines = ["| " + " | ".join(headers) + " |", "|" + "|".join("---" for _ in headers) + "|"]
    lines += ["| " + " | ".join(cell(c) for c in r) + " |" for r in rows]
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--models", help="comma-separated corpus model names (default: all of the tier)")
    ap.add_argument("--opsets", help="comma-separated opsets (default: 11,13,17)")
    ap.add_argument("--recipes", default="sat4,lsq4,lsq8", help="recipes to insert; the first one is trained and fused")
    ap.add_argument("--steps", type=int, default=20, help="training steps per run")
    ap.add_argument("--train-all-recipes", action="store_true",
                    help="train with every recipe of --recipes, not only the first (the full matrix)")
    ap.add_argument("--batch", type=int, default=16, help="training batch size")
    ap.add_argument("--threads", type=int, default=1, help="onnxruntime threads for training")
    ap.add_argument("--verify-samples", type=int, default=16, help="real images for fuse's self-check")
    ap.add_argument("--tier", default="ci", help="corpus tier: ci, pypi or all")
    ap.add_argument("--json", help="write the rows (and full messages) to this JSON file")
    ap.add_argument("--work", help="keep the QAT, trained and fused models in this folder (default: a temp folder)")
    args = ap.parse_args(argv)
    args.recipes = [r.strip() for r in args.recipes.split(",") if r.strip()]
    names = args.models.split(",") if args.models else None
    opsets = [int(o) for o in args.opsets.split(",")] if args.opsets else None

    models = build_corpus(names, opsets, tier=args.tier, log=lambda *a: print(*a, file=sys.stderr))
    headers = [h.format(recipes="/".join(args.recipes)) for h, _ in COLUMNS]
    work = Path(args.work) if args.work else Path(tempfile.mkdtemp(prefix="onnxqat-coverage-"))
    work.mkdir(parents=True, exist_ok=True)
    rows, records = [], []
    t0 = time.perf_counter()
    try:
        for m in models:
            case = Case(m, args, work)
            row = [fn(case) for _, fn in COLUMNS]
            rows.append(row)
            records.append({**dict(zip(headers, row)), "messages": list(case.messages),
                            "seconds": {k: round(v[1], 2) for k, v in case.steps().items()}})
            print(f"coverage: {m.key} done ({time.perf_counter() - t0:.0f} s)", file=sys.stderr, flush=True)
    finally:
        if not args.work:
            shutil.rmtree(work, ignore_errors=True)
    print(markdown(headers, rows))
    print("\nmessages in full:")
    for r in records:
        for msg in r["messages"]:
            print(f"- {r['model']}@{r['opset']}: {msg}")
    steps: dict[str, list[int]] = {}
    for r in records:
        for key, secs in r["seconds"].items():
            failed = any(msg.startswith(key + ":") for msg in r["messages"])
            steps.setdefault(key, [0, 0])[0] += not failed
            steps[key][1] += 1
    print("\nsucceeded: " + ", ".join(f"{k} {ok_}/{n}" for k, (ok_, n) in steps.items()))
    if args.json:
        Path(args.json).write_text(json.dumps({"headers": headers, "rows": records, "args": vars(args)}, indent=1,
                                              default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
