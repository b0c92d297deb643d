"""Training-step time of a 784-512-256-10 MLP (batch 128) with 4-bit LSQ on every weight and activation, divided
by the same MLP without quantizers, both through onnxruntime-training artifacts in the same run (target <= 1.3).

    python bench/mlp_step.py [--steps 60] [--threads 0]

A step is module(x, labels) (forward + backward) + optimizer.step() (SGD) + lazy_reset_grad(); times are medians.
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


def step_time(model, params, directory: Path, steps: int, threads: int, rng) -> float:
    directory.mkdir(parents=True, exist_ok=True)
    artifacts.generate_artifacts(model, requires_grad=params, loss=artifacts.LossType.CrossEntropyLoss,
                                 optimizer=artifacts.OptimType.SGD, artifact_directory=str(directory),
                                 custom_op_library=onnxqat.library_path())
    so = onnxqat.session_options()
    so.intra_op_num_threads = threads
    state = CheckpointState.load_checkpoint(str(directory / "checkpoint"))
    module = Module(str(directory / "training_model.onnx"), state, str(directory / "eval_model.onnx"),
                    session_options=so)
    opt = Optimizer(str(directory / "optimizer_model.onnx"), module)
    opt.set_learning_rate(0.01)
    module.train()
    x = rng.uniform(0, 1, size=(BATCH, 784)).astype(F32)
    y = rng.integers(0, 10, size=BATCH).astype(I64)
    times = []
    for k in range(steps + 5):
        t0 = time.perf_counter()
        module(x, y)
        opt.step()
        module.lazy_reset_grad()
        if k >= 5:  # warm-up
            times.append(time.perf_counter() - t0)
    return float(np.median(times))


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=60)
    ap.add_argument("--threads", type=int, default=0, help="ORT intra-op threads (0: ORT's default)")
    ap.add_argument("--rounds", type=int, default=3, help="alternate float/quantized timings this many times")
    ap.add_argument("--quantize-input", action="store_true", help="also an LsqQuant on the network input")
    args = ap.parse_args()
    ort.set_default_logger_severity(3)
    register_gradients()
    rng = np.random.default_rng(0)
    f_model, f_params = build_mlp(False, rng)
    q_model, q_params = build_mlp(True, np.random.default_rng(0), args.quantize_input)
    tf, tq = [], []
    with tempfile.TemporaryDirectory() as tmp:
        for r in range(args.rounds):  # alternate, so that load changes on a shared machine hit both alike
            tf.append(step_time(f_model, f_params, Path(tmp) / f"f{r}", args.steps, args.threads, rng))
            tq.append(step_time(q_model, q_params, Path(tmp) / f"q{r}", args.steps, args.threads, rng))
    f_ms, q_ms = 1e3 * min(tf), 1e3 * min(tq)
    print(f"MLP {'-'.join(map(str, SIZES))}, batch {BATCH}, SGD, ORT intra-op threads: {args.threads or 'default'}")
    print(f"float step:          {f_ms:.3f} ms   (rounds: {', '.join(f'{1e3 * t:.3f}' for t in tf)})")
    label = "4-bit LSQ step" + (" (+input)" if args.quantize_input else "") + ":"
    print(f"{label:21s}{q_ms:.3f} ms   (rounds: {', '.join(f'{1e3 * t:.3f}' for t in tq)})")
    print(f"ratio quantized / float: {q_ms / f_ms:.3f} (target <= 1.3)")


if __name__ == "__main__":
    main()
