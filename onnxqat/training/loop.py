"""The training loop over ONNX Runtime training's Module: steps, accumulation, evaluation, checkpoints, metrics."""

from __future__ import annotations

import csv
import hashlib
import io
import json
import math
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import numpy as np
import onnx

from onnxqat.errors import DataError, TrainingError
from onnxqat.files import atomic_write_bytes, atomic_write_text
from onnxqat.training import artifacts as art
from onnxqat.training.checkpoint import load_checkpoint, save_checkpoint
from onnxqat.training.data import Batches
from onnxqat.training.distributed import Single, world
from onnxqat.training.feeds import Feeder
from onnxqat.training.objective import IOPlan
from onnxqat.training.solver import LRSchedule, Solver, quantizer_floor


@dataclass
class TrainConfig:
    epochs: int = 1
    max_iterations: int | None = None  # optimizer updates; stops early when reached
    batch_size: int = 128
    iteration_size: int = 1
    solver: str = "sgd"
    lr: float = 0.05
    momentum: float = 0.9
    decay: float = 0.0
    quantizer_lr: float | None = None  # None: same as lr
    quantizer_decay: float | None = None  # None: same as decay
    norm_decay: float | None = None  # BatchNorm/LayerNorm scale and shift; None: same as decay
    momentum_form: str = "n2d2"  # "n2d2": lr inside the momentum buffer (Caffe); "pytorch": outside (torch SGD)
    lr_policy: str = "none"
    warmup: float = 0.0  # epochs (fractions allowed) of linear warmup
    step_size: float | None = None  # epochs between step decays (policy step); None: a third of the run
    gamma: float = 0.1
    seed: int = 0
    threads: int = 0  # ORT intra-op threads; 0 = ORT's default
    eval_test: bool = True  # evaluate the test set every epoch (else only at the end)

    def signature(self) -> dict:
        d = asdict(self)
        d.pop("threads")
        d.pop("eval_test")
        d.pop("epochs")  # a resumed run may ask for more epochs
        for k, default in (("norm_decay", None), ("momentum_form", "n2d2")):  # runs from before these settings
            if d[k] == default:
                d.pop(k)
        return d


class Engine:
    """One ORT training Module over a model, with the trainable parameters as one flat float32 vector."""

    def __init__(self, model: onnx.ModelProto, workdir: str | Path, threads: int = 0,
                 plan: art.TrainingPlan | None = None):
        self.model = model
        self.plan = plan or art.plan_training(model)
        paths = art.generate(model, Path(workdir), self.plan)
        ort, _, Module, CheckpointState = art.import_ort_training()
        if self.plan.uses_custom_ops:
            from onnxqat.ops.library import session_options

            so = session_options()
        else:
            so = ort.SessionOptions()
        if threads:
            so.intra_op_num_threads = int(threads)
        so.use_deterministic_compute = True
        self._OrtValue = ort.OrtValue
        self.state = CheckpointState.load_checkpoint(str(paths["checkpoint"]))
        try:
            self.module = Module(str(paths["train"]), self.state, str(paths["eval"]), session_options=so)
        except Exception as exc:  # e.g. a gradient op without a CPU kernel: one line, not a C++ signature
            raise TrainingError(f"ONNX Runtime could not start training: {art.ort_error_line(exc)}") from None
        self.module.train()
        self.train_inputs = list(self.module.input_names())
        self.module.eval()
        self.eval_inputs = list(self.module.input_names())
        self.module.train()
        self.all_params = list(self.state._state.parameter_names())
        self._probe_layout()
        qset, nset = set(self.plan.quantizer_params), set(self.plan.norm_params)
        self.quant_mask = np.zeros(self.size, bool)
        self.norm_mask = np.zeros(self.size, bool)
        for name, off, n, _ in self.layout:
            if name in qset:
                self.quant_mask[off:off + n] = True
            if name in nset:
                self.norm_mask[off:off + n] = True

    def _probe_layout(self) -> None:
        """Finds each trainable parameter's place in ORT's contiguous buffer (its order is ORT's own)."""
        names = [n for n in self.plan.trainable + self.plan.quantizer_params if n in self.all_params]
        saved = {n: self.state.parameters[n].data.copy() for n in names}
        for k, n in enumerate(names):
            self.state.parameters[n].data = np.full(saved[n].shape, k + 1, np.float32)
        buf = self.module.get_contiguous_parameters(trainable_only=True).numpy()
        layout = []
        for k, n in enumerate(names):
            idx = np.nonzero(buf == k + 1)[0]
            if idx.size != saved[n].size or (idx.size and idx[-1] - idx[0] + 1 != idx.size):
                raise TrainingError(f"cannot locate parameter {n} in ORT's parameter buffer")
            layout.append((n, int(idx[0]) if idx.size else 0, int(saved[n].size), saved[n].shape))
        if sum(x[2] for x in layout) != buf.size:
            raise TrainingError("ORT's trainable parameter buffer holds parameters the plan does not know")
        for n in names:
            self.state.parameters[n].data = saved[n]
        self.layout = sorted(layout, key=lambda x: x[1])
        self.size = int(buf.size)

    # ---------------------------------------------------------------- parameters
    def get_flat(self) -> np.ndarray:
        return np.array(self.module.get_contiguous_parameters(trainable_only=True).numpy(), np.float32)

    def set_flat(self, flat: np.ndarray) -> None:
        self.module.copy_buffer_to_parameters(self._OrtValue.ortvalue_from_numpy(flat)._ortvalue, trainable_only=True)

    def grad_flat(self) -> np.ndarray:
        p = self.state.parameters
        return np.concatenate([p[n].grad.reshape(-1) for n, _, _, _ in self.layout]).astype(np.float32, copy=False)

    def params(self) -> dict[str, np.ndarray]:
        """Every ORT parameter (trainable and BN statistics) by name."""
        return {n: self.state.parameters[n].data.copy() for n in self.all_params}

    def load_params(self, params: dict[str, np.ndarray]) -> None:
        for n in self.all_params:
            if n in params:
                self.state.parameters[n].data = np.asarray(params[n], np.float32).reshape(self.state.parameters[n].data.shape)

    # ---------------------------------------------------------------- steps
    def masks(self, batch: int, rng: np.random.Generator | None) -> dict[str, np.ndarray]:
        out = {}
        for d in self.plan.dropouts:
            if rng is None:
                out[d.mask_input] = np.ones((1, *d.shape), np.float32)
            else:
                keep = rng.random((batch, *d.shape), dtype=np.float32) >= np.float32(d.ratio)
                out[d.mask_input] = keep.astype(np.float32) * np.float32(1.0 / (1.0 - d.ratio))
        return out

    def _run(self, names, feeds: dict, what: str) -> tuple[float, list[np.ndarray]]:
        try:
            out = self.module(*[feeds[n] for n in names])
        except Exception as exc:  # ORT's message names op, node and problem: one line of it, not a C++ trace
            raise TrainingError(f"onnxruntime failed in {what} step: {art.ort_error_line(exc)}") from None
        out = out if isinstance(out, (list, tuple)) else [out]
        return float(out[0]), list(out[1:])

    def train_step(self, feeds: dict, mask_rng) -> tuple[float, list[np.ndarray]]:
        """One forward-backward pass (gradients accumulate in ORT's buffers); (loss, the returned loss tensors)."""
        self.module.train()
        n = next(iter(feeds.values())).shape[0]
        return self._run(self.train_inputs, {**feeds, **self.masks(n, mask_rng)}, "a training")

    def eval_step(self, feeds: dict) -> tuple[float, list[np.ndarray]]:
        self.module.eval()
        n = next(iter(feeds.values())).shape[0]
        return self._run(self.eval_inputs, {**feeds, **self.masks(n, None)}, "an evaluation")

    def correct(self, outputs: list[np.ndarray], y) -> int | None:
        """Top-1 hits of a batch: argmax of the classifier tensor against the labels (None: no labels or classifier)."""
        cls = self.plan.io.classifier
        if y is None or cls is None:
            return None
        logits = outputs[self.plan.returned.index(cls.tensor)]
        return int((np.argmax(logits.reshape(logits.shape[0], -1), axis=1) == y).sum())


def evaluate(engine: Engine, batches: Batches, feeder: Feeder, comm: Single | None = None) -> tuple[float, float | None]:
    """(mean loss, top-1 % or None) over a data set; under MPI each rank evaluates every N-th batch and the sums
    are reduced, so every rank returns the whole set's figures."""
    comm = comm or Single()
    tot_loss, correct, n, has_top1 = 0.0, 0, 0, 1.0
    keep = None if comm.size == 1 else (lambda b: b % comm.size == comm.rank)
    for _, x, y, extras in batches.epoch_extras(0, keep=keep):
        loss, outs = engine.eval_step(feeder(x, y, extras))
        tot_loss += loss * len(x)
        c = engine.correct(outs, y)
        if c is None:
            has_top1 = 0.0
        else:
            correct += c
        n += len(x)
    if comm.size > 1:
        tot_loss, correct, n, ranks_top1 = comm.sum([tot_loss, correct, n, has_top1])
        has_top1 = float(ranks_top1 == comm.size)
    top1 = 100.0 * correct / max(n, 1) if has_top1 else None
    return float(tot_loss / max(n, 1)), top1


def _average_running_stats(engine: Engine, comm: Single) -> None:
    """BatchNormalization running means and variances averaged over the ranks (each saw its own batches)."""
    if comm.size == 1 or not engine.plan.frozen:
        return
    p = engine.state.parameters
    names = [n for n in engine.plan.frozen if n in engine.all_params]
    flat = np.concatenate([p[n].data.reshape(-1) for n in names]).astype(np.float32)
    comm.average_(flat)
    off = 0
    for n in names:
        k = p[n].data.size
        p[n].data = flat[off:off + k].reshape(p[n].data.shape).copy()
        off += k


def model_digest(model: onnx.ModelProto) -> str:
    return hashlib.sha256(model.SerializeToString(deterministic=True)).hexdigest()[:16]


@dataclass
class FitResult:
    out_dir: Path
    model_path: Path
    best_model_path: Path | None
    metrics: list[dict] = field(default_factory=list)
    best_metric: float | None = None
    test_top1: float | None = None
    test_loss: float | None = None
    params: dict | None = None
    initial: dict | None = None  # {"set", "loss", "top1"}: the evaluation before the first update


METRIC_FIELDS = ("epoch", "iterations", "lr", "quantizer_lr", "train_loss", "train_top1", "val_loss", "val_top1",
                 "test_loss", "test_top1", "images_per_s", "epoch_seconds", "cpu_seconds")


def _write_metrics(out: Path, history: list[dict]) -> None:
    atomic_write_text(out / "metrics.json", json.dumps(history, indent=1))
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=METRIC_FIELDS, extrasaction="ignore")
    w.writeheader()
    for row in history:
        w.writerow({k: ("" if row.get(k) is None else row.get(k)) for k in METRIC_FIELDS})
    atomic_write_text(out / "metrics.csv", buf.getvalue())


def _save_model(path: Path, model: onnx.ModelProto, params: dict) -> None:
    atomic_write_bytes(path, art.write_back(model, params).SerializeToString())


def fit(model: onnx.ModelProto, cfg: TrainConfig, train_batches: Batches, val_batches: Batches | None,
        test_batches: Batches | None, out: str | Path, resume: bool = False, progress: bool = True,
        stop_after_batches: int | None = None, log=print, io: IOPlan | None = None, constants: dict | None = None,
        teacher_model: onnx.ModelProto | None = None, comm: Single | None = None) -> FitResult:
    """Trains `model` and writes checkpoints, metrics and the trained model into `out`.

    io: inputs and loss terms (objective.resolve; default cross-entropy on the one output); constants: values of
    other model inputs; teacher_model: the float model distillation matches (default: `model` without quantizers).
    stop_after_batches: (tests) raise KeyboardInterrupt after that many physical batches, like a kill mid-epoch.
    comm: the MPI job (distributed.world() by default): with N ranks, cfg.batch_size is each rank's batch; an update
    reads N x iteration_size consecutive batches of the shuffled epoch (rank r the r-th iteration_size of them), so
    N ranks compute what one process computes with iteration size N x iteration_size. Rank 0 writes every file.
    """
    comm = comm or world()
    root = comm.is_root
    if not root:
        log, progress = (lambda *_a, **_k: None), False
    out = Path(out)
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise TrainingError(f"cannot write {out}: {exc.strerror or exc}") from None
    for name in ("checkpoint_last.npz", "checkpoint_best.npz", "model.onnx", "model_best.onnx", "metrics.json",
                 "metrics.csv"):
        if (out / name).exists() and not (out / name).is_file():
            raise TrainingError(f"{out / name} is not a file (a folder?): remove it or choose another output folder")
    if cfg.iteration_size < 1:
        raise TrainingError(f"iteration size must be >= 1, got {cfg.iteration_size}")
    if cfg.epochs < 1 and not cfg.max_iterations:
        raise TrainingError("nothing to do: epochs must be >= 1 (or give max iterations)")
    n_batches = len(train_batches)
    if n_batches == 0 or len(train_batches.ds) < train_batches.batch_size:
        raise DataError(f"the training set has {len(train_batches.ds)} samples, fewer than one batch "
                        f"({train_batches.batch_size}): lower the batch size or give more data")
    plan = art.plan_training(model, io)
    _check_fixed_batch(plan, [x for x in (train_batches, val_batches, test_batches) if x is not None])
    teacher = None
    if plan.io.needs_teacher:
        from onnxqat.training.teacher import Teacher

        teacher = Teacher(model, [t.tensor for t in plan.io.terms if t.kind != "ce"], teacher_model, cfg.threads)
    feeder = Feeder(plan, constants, teacher)
    _check_shapes(plan, train_batches, feeder)
    plan.io.terms = _normalise_terms(plan, train_batches, feeder)
    for msg in plan.io.messages:
        log(msg)
    log("loss: " + " + ".join(t.describe() for t in plan.io.terms))
    workdir = out / "artifacts"
    if not root:  # each rank generates its own training artifacts (the same files; no two writers of one path)
        import tempfile

        workdir = Path(tempfile.mkdtemp(prefix=f"onnxqat-rank{comm.rank}-"))
    engine = Engine(model, workdir, cfg.threads, plan)
    for msg in plan.messages:
        log(msg)

    group = cfg.iteration_size * comm.size  # batches of one update
    updates_per_epoch = -(-n_batches // group)
    if comm.size > 1:
        log(f"data parallel: {comm.size} ranks x batch {cfg.batch_size}"
            + (f" x iteration size {cfg.iteration_size}" if cfg.iteration_size > 1 else "")
            + f" = global batch {cfg.batch_size * group}; {updates_per_epoch} updates per epoch; "
            + f"{cfg.threads or 'default'} onnxruntime thread(s) per rank")
    total = updates_per_epoch * cfg.epochs
    if cfg.max_iterations:
        total = min(total, cfg.max_iterations) if cfg.epochs >= 1 else cfg.max_iterations
    epochs = cfg.epochs if not cfg.max_iterations else max(cfg.epochs, -(-total // updates_per_epoch))
    warm = int(round(cfg.warmup * updates_per_epoch))
    step_size = int(round(cfg.step_size * updates_per_epoch)) if cfg.step_size else None
    sched = LRSchedule(cfg.lr, cfg.lr_policy, total, warm, step_size, cfg.gamma)
    qsched = LRSchedule(cfg.lr if cfg.quantizer_lr is None else cfg.quantizer_lr, cfg.lr_policy, total, warm,
                        step_size, cfg.gamma)
    # quantizer floors from the model's own initial values (before any resume), so a resumed run clamps alike
    solver = Solver(cfg.solver, engine.size, engine.quant_mask, cfg.momentum, cfg.decay, cfg.quantizer_decay,
                    quant_floor=quantizer_floor(engine.get_flat(), engine.quant_mask), norm_mask=engine.norm_mask,
                    norm_decay=cfg.norm_decay, momentum_form=cfg.momentum_form)

    signature = {"config": cfg.signature(), "model": model_digest(model), "train_size": len(train_batches.ds),
                 "loss": [t.describe() for t in plan.io.terms]}
    last_ckpt, best_ckpt = out / "checkpoint_last.npz", out / "checkpoint_best.npz"
    history: list[dict] = []
    start_epoch, step, best, initial = 0, 0, None, None
    # rank 0 reads the checkpoint and sends it (the other ranks may run on machines without that folder)
    loaded = None
    if root and resume and last_ckpt.is_file():
        try:
            loaded = load_checkpoint(last_ckpt)
        except TrainingError as exc:
            loaded = exc
    loaded = comm.broadcast_object(loaded)
    if isinstance(loaded, Exception):
        raise loaded
    if loaded is not None:
        params, sstate, meta = loaded
        if meta.get("signature") != signature:
            raise TrainingError(f"{last_ckpt}: written by a run with another model, data size or configuration; "
                                "resume needs the same ones (or start without --resume / use another --out)")
        engine.load_params(params)
        solver.load_state_dict(sstate)
        start_epoch, step, best, history = meta["epoch"], meta["step"], meta.get("best"), meta["history"]
        initial = meta.get("initial")
        ranks = meta.get("ranks", 1)
        if ranks != comm.size:  # another global batch: the schedule restarts from this epoch's first update
            step = start_epoch * updates_per_epoch
            log(f"the checkpoint was written by {ranks} rank(s), this run has {comm.size}: the global batch "
                f"changes, the learning-rate schedule continues at update {step}")
        log(f"resuming after epoch {start_epoch} (update {step}) from {last_ckpt}")
    elif resume:
        log(f"no checkpoint in {out}: starting from the beginning")
    if comm.size > 1:  # one model: rank 0's parameters, running statistics and solver state everywhere
        engine.load_params(comm.broadcast_object(engine.params() if root else None))
        solver.load_state_dict(comm.broadcast_object(solver.state_dict() if root else None))
    # the set that shows what an epoch did: validation, else test, else the training set in order
    monitor_name, monitor = next(((n, b) for n, b in (("val", val_batches), ("test", test_batches)) if b is not None),
                                 ("train", Batches(train_batches.ds, train_batches.batch_size,
                                                   train_batches.transforms, train=False, seed=train_batches.seed)))
    if start_epoch == 0 and step == 0:
        loss0, top0 = evaluate(engine, monitor, feeder, comm)
        initial = {"set": monitor_name, "loss": loss0, "top1": top0}
        log(f"before training: {monitor_name} loss {loss0:.4f}" + (f" top-1 {top0:.2f}%" if top0 is not None else "")
            + " (the model as inserted: the cost of quantization before any update)")

    w = engine.get_flat()
    comm.check_same(w, "start")
    seen_batches = 0
    gbuf = np.zeros(engine.size + 1, np.float32)  # the gradient sum and, last, its batch count: one allreduce
    for epoch in range(start_epoch, epochs):
        if step >= total:
            break
        t0, c0 = time.perf_counter(), time.process_time()
        tot_loss, correct, n_seen = 0.0, 0, 0
        accum = 0
        bar = None
        mine = (lambda b: (b % group) // cfg.iteration_size == comm.rank) if comm.size > 1 else None
        n_mine = sum(1 for b in range(n_batches) if mine is None or mine(b))
        if progress:
            from tqdm import tqdm

            bar = tqdm(total=n_mine, desc=f"epoch {epoch + 1}/{epochs}", leave=False, dynamic_ncols=True)
        lr = qlr = None
        done_update = -1  # the last update this rank took part in this epoch

        def update(u: int) -> None:
            """One solver step from this rank's accumulated batches (none: a zero gradient and count 0)."""
            nonlocal accum, step, lr, qlr, done_update
            if accum:
                gbuf[:-1] = engine.grad_flat()
            else:
                gbuf[:-1] = 0.0
            gbuf[-1] = accum
            if comm.size > 1:
                comm.average_(gbuf)  # mean over ranks of sums and counts: their ratio is the global mean
            g = gbuf[:-1] / gbuf[-1] if gbuf[-1] != 1 else gbuf[:-1]
            if not np.all(np.isfinite(g)):
                raise TrainingError(f"gradient is not finite at epoch {epoch + 1}, update {u + 1}: training stopped; "
                                    f"last good checkpoint: {last_ckpt if last_ckpt.is_file() else 'none'}"
                                    f"{diverged_hint(initial, cfg.lr)}")
            lr, qlr = sched(step), qsched(step)
            solver.step(w, g, lr, qlr)  # the solver's update
            engine.set_flat(w)
            step += 1
            accum = 0
            done_update = u
            if comm.size > 1 and step % CHECKSUM_EVERY == 0:
                comm.check_same(w, f"update {step}")

        for b, x, y, extras in train_batches.epoch_extras(epoch, keep=mine):
            u = b // group
            if accum and u != done_update + 1:
                update(done_update + 1)
            while comm.size > 1 and done_update + 1 < u and step < total:  # updates with no batch of this rank
                update(done_update + 1)
            if step >= total:
                break
            if accum == 0:
                engine.module.lazy_reset_grad()
            mask_key = [cfg.seed, epoch, 3, b] if comm.size == 1 else [cfg.seed, epoch, 3, b, comm.rank]
            loss, outs = engine.train_step(feeder(x, y, extras), np.random.default_rng(mask_key))
            if not math.isfinite(loss):
                raise TrainingError(f"loss is {loss} at epoch {epoch + 1}, step {b + 1}: training stopped; last good "
                                    f"checkpoint: {last_ckpt if last_ckpt.is_file() else 'none (first epoch)'}"
                                    f"{bad_input_hint(x) or diverged_hint(initial, cfg.lr)}")
            accum += 1
            if comm.size == 1 and (accum == cfg.iteration_size or b == n_batches - 1):
                update(u)
            tot_loss += loss * len(x)
            c = engine.correct(outs, y)
            correct = None if c is None or correct is None else correct + c
            n_seen += len(x)
            seen_batches += 1
            if bar is not None:
                el = time.perf_counter() - t0
                post = {"loss": f"{tot_loss / n_seen:.4f}", "img_s": f"{comm.size * n_seen / max(el, 1e-9):.0f}"}
                if correct is not None:
                    post["acc"] = f"{100.0 * correct / n_seen:.2f}"
                bar.set_postfix(**post, refresh=False)
                bar.update(1)
            if stop_after_batches is not None and seen_batches >= stop_after_batches:
                if bar is not None:
                    bar.close()
                raise KeyboardInterrupt
            if step >= total:
                break
        if comm.size > 1:  # the updates left: this rank's last batches, then those where it had none
            while done_update + 1 < updates_per_epoch and step < total:
                update(done_update + 1)
        if comm.size > 1:
            has_top1 = float(correct is not None)
            tot_loss, c_sum, n_seen, ranks_top1 = comm.sum([tot_loss, correct or 0, n_seen, has_top1])
            correct = c_sum if ranks_top1 == comm.size else None
            _average_running_stats(engine, comm)
        if bar is not None:
            bar.close()
        train_s, train_cpu = time.perf_counter() - t0, time.process_time() - c0
        row = {"epoch": epoch + 1, "iterations": step, "lr": lr, "quantizer_lr": qlr,
               "train_loss": tot_loss / max(n_seen, 1),
               "train_top1": None if correct is None else 100.0 * correct / max(n_seen, 1),
               "images_per_s": n_seen / max(train_s, 1e-9), "epoch_seconds": train_s,
               "cpu_seconds": train_cpu}
        if val_batches is not None:
            row["val_loss"], row["val_top1"] = evaluate(engine, val_batches, feeder, comm)
        last = epoch == epochs - 1 or step >= total
        if test_batches is not None and (cfg.eval_test or last or (epoch == 0 and monitor_name == "test")):
            row["test_loss"], row["test_top1"] = evaluate(engine, test_batches, feeder, comm)
        if epoch == 0 and initial is not None:
            if monitor_name == "train":
                row["monitor_loss"], row["monitor_top1"] = evaluate(engine, monitor, feeder, comm)
            else:
                row["monitor_loss"], row["monitor_top1"] = row[f"{monitor_name}_loss"], row[f"{monitor_name}_top1"]
            warning = first_epoch_warning(initial, row["monitor_loss"], row["monitor_top1"], cfg.lr)
            if warning:
                log(warning)
        history.append(row)
        metric = next((row[k] for k in ("val_top1", "test_top1", "train_top1") if row.get(k) is not None), None)
        if metric is None:  # no accuracy (distillation, no labels): the lower loss is the better model
            metric = -next(row[k] for k in ("val_loss", "test_loss", "train_loss") if row.get(k) is not None)
        params, solver_state = engine.params(), solver.state_dict()
        improved = best is None or metric > best
        if improved:
            best = metric
        meta = {"epoch": epoch + 1, "step": step, "best": best, "history": history, "signature": signature,
                "initial": initial, "ranks": comm.size}
        comm.check_same(w, f"epoch {epoch + 1}")
        if root:
            if improved:
                save_checkpoint(best_ckpt, params, solver_state, meta)
                _save_model(out / "model_best.onnx", model, params)
            save_checkpoint(last_ckpt, params, solver_state, meta)
            _write_metrics(out, history)
        top = f" top-1 {row['train_top1']:.2f}%" if row["train_top1"] is not None else ""
        msg = (f"epoch {epoch + 1}/{epochs}: loss {row['train_loss']:.4f}{top}"
               + (f" | val {_score(row, 'val')}" if "val_loss" in row else "")
               + (f" | test {_score(row, 'test')}" if "test_loss" in row else "")
               + f" | lr {lr:.4g} | {row['images_per_s']:.0f} img/s")
        log(msg)
    _average_running_stats(engine, comm)
    params = engine.params()
    if root:
        _save_model(out / "model.onnx", model, params)
    final = history[-1] if history else {}
    test_loss, test_top1 = final.get("test_loss"), final.get("test_top1")
    if test_batches is not None and test_loss is None:
        test_loss, test_top1 = evaluate(engine, test_batches, feeder, comm)
    comm.barrier()  # the files exist when any rank returns
    if not root:
        import shutil

        shutil.rmtree(workdir, ignore_errors=True)
    return FitResult(out, out / "model.onnx", out / "model_best.onnx" if (out / "model_best.onnx").is_file() else None,
                     history, best, test_top1, test_loss, params, initial)


def _score(row: dict, split: str) -> str:
    top = row.get(f"{split}_top1")
    return f"{top:.2f}%" if top is not None else f"loss {row[f'{split}_loss']:.4f}"


CHECKSUM_EVERY = 100  # updates between two comparisons of the ranks' parameters (and at every epoch's end)

# after epoch 1, a loss this many times the loss before training, or a top-1 this many points lower, is a warning
WARN_LOSS_RATIO = 1.5
WARN_TOP1_DROP = 5.0


def _check_fixed_batch(plan: art.TrainingPlan, batches: list[Batches]) -> None:
    """An export with a fixed batch dimension (common: 1) runs only batches of that size: said up front, not as
    ORT's "invalid dimensions" in the first step."""
    dims = plan.input_shapes.get(plan.input_name)
    b = dims[0] if dims and isinstance(dims[0], int) and dims[0] > 0 else None
    if b is not None and ({x.batch_size for x in batches} != {b} or any(len(x.ds) % b for x in batches)):
        raise DataError(f"the model's input '{plan.input_name}' has a fixed batch size of {b}: train with "
                        f"--batch-size {b} (and data sets that are whole batches of {b}), or re-export the model "
                        "with a dynamic batch dimension")


def bad_input_hint(x) -> str:
    """After a non-finite loss: NaN/inf in the batch's (float) inputs, which no learning rate explains."""
    x = np.asarray(x)
    if x.dtype.kind == "f" and not np.all(np.isfinite(x)):
        return f" (the batch holds {int(x.size - np.count_nonzero(np.isfinite(x)))} NaN/inf input value(s))"
    return ""


def diverged_hint(initial: dict | None, lr: float) -> str:
    """After a non-finite loss: when the model as inserted had a finite loss, the updates made it diverge, and the
    learning rate is the usual cause (measured: EfficientNet-B0 without BatchNorm, sat4's lr 0.05 from random
    weights, inf at step 10)."""
    if initial and math.isfinite(initial.get("loss", math.nan)):
        return (f" (the model had a finite loss {initial['loss']:.4g} before training: the learning rate {lr:g} is "
                f"likely too high; try a tenth of it)")
    return ""


def first_epoch_warning(initial: dict, loss: float, top1: float | None, lr: float) -> str | None:
    """The warning after epoch 1 when the model got far worse than before training (None when it did not)."""
    worse = []
    if initial.get("top1") is not None and top1 is not None and initial["top1"] - top1 > WARN_TOP1_DROP:
        worse.append(f"top-1 {initial['top1']:.2f}% -> {top1:.2f}%")
    if loss > WARN_LOSS_RATIO * initial["loss"] and loss - initial["loss"] > 1e-6:
        worse.append(f"loss {initial['loss']:.4g} -> {loss:.4g}")
    if not worse:
        return None
    return (f"warning: after epoch 1 the model is far worse than before training on the {initial['set']} set "
            f"({', '.join(worse)}): the learning rate ({lr:g}) is likely too high for this model; try a tenth of it")


def _normalise_terms(plan: art.TrainingPlan, batches: Batches, feeder: Feeder) -> list:
    """Distillation terms divided by the teacher's scale on the first training batch (MSE by mean(t^2), L1 by
    mean|t|), so that outputs of different magnitudes (boxes in pixels, scores in [0, 1]) weigh alike."""
    if not any(t.kind in ("mse", "l1") for t in plan.io.terms):
        return plan.io.terms
    _, x, y, extras = next(iter(batches.epoch_extras(0)))
    feeds = feeder(x, y, extras)
    terms = []
    for t in plan.io.terms:
        if t.kind in ("mse", "l1"):
            v = feeds[t.target].astype(np.float64)
            s = float(np.mean(v * v)) if t.kind == "mse" else float(np.mean(np.abs(v)))
            t = replace(t, scale=float(np.float32(1.0 / s)) if s > 0 else 1.0)
        terms.append(t)
    return terms


def _check_shapes(plan: art.TrainingPlan, batches: Batches, feeder: Feeder) -> None:
    _, x, _, extras = next(iter(batches.epoch_extras(0)))
    got = feeder.model_inputs(x[:1], {k: v[:1] for k, v in extras.items()})
    for name, arr in got.items():
        want = plan.input_shapes[name]
        if len(want) != arr.ndim or any(wd is not None and wd != gd for wd, gd in zip(want[1:], arr.shape[1:])):
            raise DataError(f"input shape mismatch: the data gives {name} samples of shape {list(arr.shape[1:])} "
                            f"after transforms, the model expects {[d if d else '?' for d in want[1:]]}")
