"""Training-step time of a 784-512-256-10 MLP (batch 128) with 4-bit LSQ on every weight and activation, divided
by the same MLP without quantizers, both through onnxruntime-training artifacts in the same run (target <= 1.3).

    python bench/mlp_step.py [--steps 200] [--threads 0] [--clock wall|cpu] [--quantize-input]

A step is module(x, labels) (forward + backward) + optimizer.step() (SGD) + lazy_reset_grad(). Float and quantized
steps alternate, so that a shared machine's load falls on both alike; medians and minima are printed.
Quantized: LsqQuant (R=15) on the three weights (signed) and on the two hidden ReLU outputs (unsigned), as
onnxqat's insert pass places them (activation quantizers follow the activations; the network input is data, not an
activation), per-tensor steps, g = 1/sqrt(N Qp). --quantize-input adds one on the input as well (its learnable
step then needs the gradient of the first Gemm's input, one more 128x512x784 matrix product a step).
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
import types
from pathlib import Path

import numpy as np
from onnx import TensorProto, helper, numpy_helper

sys.modules.setdefault("onnxruntime.training.optim", types.ModuleType("onnxruntime.training.optim"))

import onnxruntime as ort  # noqa: E402
from onnxruntime.training import artifacts  # noqa: E402
from onnxruntime.training.api import CheckpointState, Module, Optimizer  # noqa: E402

import onnxqat  # noqa: E402
from onnxqat.ops.gradients import register_gradients  # noqa: E402
from onnxqat.ops.schema import DOMAIN  # noqa: E402

F32, I64 = np.float32, np.int64
SIZES = (784, 512, 256, 10)
BATCH = 128


def build_mlp(quantized: bool, rng, quantize_input: bool = False):
    inits, nodes, params = [], [], []

    def const(name, value):
        inits.append(numpy_helper.from_array(np.asarray(value), name))

    def lsq(src, name, signed, n_features, init_step):
        qp = 7 if signed else 15
        const(f"{name}.step", np.array(init_step, F32))
        params.append(f"{name}.step")
        const(f"{name}.range", np.array(15, F32))
        const(f"{name}.signed", np.array(int(signed), I64))
        const(f"{name}.grad_scale", np.array(1 / np.sqrt(n_features * qp), F32))
        const(f"{name}.axis", np.array(0, I64))
        out = f"{src}_q"
        nodes.append(helper.make_node("LsqQuant", [src, f"{name}.step", f"{name}.range", f"{name}.signed",
                                                   f"{name}.grad_scale", f"{name}.axis"], [out], domain=DOMAIN,
                                      name=name))
        return out

    h = "x"
    if quantized and quantize_input:
        h = lsq(h, "x_aquant", False, SIZES[0], 2 * 0.5 / np.sqrt(15))
    for k, (n_in, n_out) in enumerate(zip(SIZES[:-1], SIZES[1:])):
        w = (rng.normal(size=(n_in, n_out)) * np.sqrt(2 / n_in)).astype(F32)
        const(f"W{k}", w)
        const(f"B{k}", np.zeros(n_out, F32))
        params += [f"W{k}", f"B{k}"]
        wq = lsq(f"W{k}", f"fc{k}_wquant", True, w.size, 2 * np.abs(w).mean() / np.sqrt(7)) if quantized else f"W{k}"
        nodes.append(helper.make_node("Gemm", [h, wq, f"B{k}"], [f"z{k}"], name=f"fc{k}"))
        h = f"z{k}"
        if k < len(SIZES) - 2:
            nodes.append(helper.make_node("Relu", [h], [f"r{k}"], name=f"relu{k}"))
            h = f"r{k}"
            if quantized:
                h = lsq(h, f"relu{k}_aquant", False, n_out, 2 * 0.5 / np.sqrt(15))
    nodes.append(helper.make_node("Identity", [h], ["logits"], name="out"))
    graph = helper.make_graph(nodes, "mlp", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [BATCH, 784])],
                              [helper.make_tensor_value_info("logits", TensorProto.FLOAT, [BATCH, 10])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid(DOMAIN, 1)],
                              ir_version=9)
    return model, params


class Trainer:
    """A model's training artifacts, Module and Optimizer, ready to time one step at a time."""

    def __init__(self, model, params, directory: Path, threads: int, rng):
        directory.mkdir(parents=True, exist_ok=True)
        artifacts.generate_artifacts(model, requires_grad=params, loss=artifacts.LossType.CrossEntropyLoss,
                                     optimizer=artifacts.OptimType.SGD, artifact_directory=str(directory),
                                     custom_op_library=onnxqat.library_path())
        so = onnxqat.session_options()
        so.intra_op_num_threads = threads
        self.state = CheckpointState.load_checkpoint(str(directory / "checkpoint"))
        self.module = Module(str(directory / "training_model.onnx"), self.state, str(directory / "eval_model.onnx"),
                             session_options=so)
        self.opt = Optimizer(str(directory / "optimizer_model.onnx"), self.module)
        self.opt.set_learning_rate(0.01)
        self.module.train()
        self.x = rng.uniform(0, 1, size=(BATCH, 784)).astype(F32)
        self.y = rng.integers(0, 10, size=BATCH).astype(I64)

    def step(self, clock) -> float:
        t0 = clock()
        self.module(self.x, self.y)
        self.opt.step()
        self.module.lazy_reset_grad()
        return clock() - t0


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=200)
    ap.add_argument("--threads", type=int, default=0, help="ORT intra-op threads (0: ORT's default)")
    ap.add_argument("--clock", choices=("wall", "cpu"), default="wall",
                    help="wall clock, or process CPU time (steadier on a loaded machine; use with --threads 1)")
    ap.add_argument("--quantize-input", action="store_true", help="also an LsqQuant on the network input")
    args = ap.parse_args()
    ort.set_default_logger_severity(3)
    register_gradients()
    f_model, f_params = build_mlp(False, np.random.default_rng(0))
    q_model, q_params = build_mlp(True, np.random.default_rng(0), args.quantize_input)
    clock = time.process_time if args.clock == "cpu" else time.perf_counter
    with tempfile.TemporaryDirectory() as tmp:
        fl = Trainer(f_model, f_params, Path(tmp) / "float", args.threads, np.random.default_rng(1))
        qu = Trainer(q_model, q_params, Path(tmp) / "quant", args.threads, np.random.default_rng(1))
        for _ in range(5):  # warm-up
            fl.step(clock)
            qu.step(clock)
        # interleaved, so that the load of a shared machine falls on both alike
        tf, tq = [], []
        for _ in range(args.steps):
            tf.append(fl.step(clock))
            tq.append(qu.step(clock))
    tf, tq = np.array(tf), np.array(tq)
    f_ms, q_ms = 1e3 * np.median(tf), 1e3 * np.median(tq)
    pair_ratio = float(np.median(tq / tf))
    print(f"library: {onnxqat.library_path()}")
    print(f"MLP {'-'.join(map(str, SIZES))}, batch {BATCH}, SGD, ORT intra-op threads: {args.threads or 'default'}, "
          f"{args.clock} time, {args.steps} interleaved steps")
    label = "4-bit LSQ step" + (" (+input LSQ)" if args.quantize_input else "")
    print(f"{'float step':26s} median {f_ms:7.3f} ms  min {1e3 * tf.min():7.3f} ms")
    print(f"{label:26s} median {q_ms:7.3f} ms  min {1e3 * tq.min():7.3f} ms")
    print(f"ratio quantized / float: {q_ms / f_ms:.3f} (medians), {tq.min() / tf.min():.3f} (minima), "
          f"{pair_ratio:.3f} (median of step pairs); target <= 1.3")


if __name__ == "__main__":
    main()
