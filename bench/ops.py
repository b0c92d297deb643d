"""Forward+backward throughput of each quantizer op on a 4M-element float32 tensor, as a fraction of
numpy.copyto bandwidth measured in the same run (target >= 0.5).

    python bench/ops.py [--n 4194304] [--repeat 20] [--threads 0] [--clock wall|cpu]

Bandwidth of an op pair = the bytes it must move at least (forward: read x, write y; backward: read dy and x,
write dx: 5 tensors) / (forward time + backward time); copyto moves 2 tensors. Times are the best of --repeat runs; inputs and
outputs are bound with IOBinding to preallocated numpy buffers, so no copy outside the kernels is timed.

SatWeightQuant runs as in training: the forward also writes its optional output dWq_dW (the derivative factor) and
the backward multiplies it by dWq (no tanh). tanh is onnxqat's float32 tanh (common/quant_math.h, bit-equal to
the numpy reference), evaluated once per element in the forward after a plain max|W| pass (M = tanh(max|W|)); with
ApplyScaling the forward stores tanh(W) in the factor's buffer while it sums the level indices, then writes the
outputs. The byte count stays the 5 tensors of the op pair's semantics (the factor adds a write and a read). The
input is N(0, 1), where every block of weights needs both halves of tanh (the polynomial below |w| = 0.55, the exp
form above); the lines marked "weights N(0, 0.05^2)" use trained-weight magnitudes, where blocks take the
polynomial alone. The lines marked "(no factor)" time an inference forward (Wq only) plus the gradient op without
the factor (it recomputes tanh, M and S): for information, not counted in the worst fraction.
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import onnxruntime as ort
from onnx import TensorProto, helper

import onnxqat
from onnxqat.ops.schema import DOMAIN, SAT_MODE_DOREFA

F32, I64 = np.float32, np.int64


CLOCK = time.perf_counter


def best_time(fn, repeat):
    """Fastest of `repeat` runs: on a shared machine the minimum is the figure least disturbed by other load."""
    fn()  # warm-up
    ts = []
    for _ in range(repeat):
        t0 = CLOCK()
        fn()
        ts.append(CLOCK() - t0)
    return float(np.min(ts))


def session(op_type, inputs, n_out, threads):
    names = [f"in{k}" for k in range(len(inputs))]
    outs = [f"out{k}" for k in range(n_out)]
    node = helper.make_node(op_type, names, outs, domain=DOMAIN, name="bench")
    vis = [helper.make_tensor_value_info(n, helper.np_dtype_to_tensor_dtype(a.dtype), list(a.shape))
           for n, a in zip(names, inputs)]
    ovis = [helper.make_tensor_value_info(o, TensorProto.FLOAT, None) for o in outs]
    model = helper.make_model(helper.make_graph([node], "b", vis, ovis),
                              opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid(DOMAIN, 1)],
                              ir_version=9)
    so = onnxqat.session_options()
    so.intra_op_num_threads = threads
    return ort.InferenceSession(model.SerializeToString(), so, providers=["CPUExecutionProvider"])


def bound_runner(sess, inputs, out_shapes):
    io = sess.io_binding()
    for k, a in enumerate(inputs):
        io.bind_cpu_input(f"in{k}", a)
    outs = [np.empty(s, F32) for s in out_shapes]
    for k, o in enumerate(outs):
        io.bind_output(f"out{k}", "cpu", 0, F32, list(o.shape), o.ctypes.data)
    def run():
        sess.run_with_iobinding(io)
        return outs  # keeps the bound buffers alive as long as the runner

    return run


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=4 * 1024 * 1024)
    ap.add_argument("--repeat", type=int, default=20)
    ap.add_argument("--threads", type=int, default=0, help="ORT intra-op threads (0: ORT's default)")
    ap.add_argument("--clock", choices=("wall", "cpu"), default="wall",
                    help="wall clock, or process CPU time (steadier on a loaded machine; use with --threads 1)")
    args = ap.parse_args()
    global CLOCK
    CLOCK = time.process_time if args.clock == "cpu" else time.perf_counter
    n = args.n
    rng = np.random.default_rng(0)
    x = rng.normal(size=(1024, n // 1024)).astype(F32)
    dy = rng.normal(size=x.shape).astype(F32)
    dst = np.empty_like(x)
    t_copy = best_time(lambda: np.copyto(dst, x), args.repeat)
    copy_bw = 2 * x.nbytes / t_copy
    print(f"tensor {x.shape} float32 ({x.nbytes / 2**20:.0f} MiB), ORT intra-op threads: {args.threads or 'default'}, "
          f"{args.clock} time, best of {args.repeat}")
    print(f"library: {onnxqat.library_path()}")
    print(f"numpy.copyto: {t_copy * 1e3:.2f} ms, {copy_bw / 1e9:.2f} GB/s")

    cases = {
        "SatWeightQuant (DoReFa R=15)": (
            "SatWeightQuant", [x, np.array(15, F32), np.array(SAT_MODE_DOREFA, I64), np.array(0, I64)], [()]),
        "SatWeightQuant (DoReFa R=15, ApplyScaling)": (
            "SatWeightQuant", [x, np.array(15, F32), np.array(SAT_MODE_DOREFA, I64), np.array(1024, I64)], [()]),
        "SatActQuant (R=15)": ("SatActQuant", [x, np.array([2.0], F32), np.array(15, F32)], [(1,)]),
        "LsqQuant (R=15 signed, per tensor)": (
            "LsqQuant", [x, np.array(0.1, F32), np.array(15, F32), np.array(1, I64), np.array(1e-3, F32),
                         np.array(0, I64)], [()]),
        "LsqQuant (R=15 signed, per channel axis 0)": (
            "LsqQuant", [x, np.full(1024, 0.1, F32), np.array(15, F32), np.array(1, I64), np.array(1e-3, F32),
                         np.array(0, I64)], [(1024,)]),
        "LsqQuant (R=15 signed, per channel axis 1)": (
            "LsqQuant", [x, np.full(x.shape[1], 0.1, F32), np.array(15, F32), np.array(1, I64), np.array(1e-3, F32),
                         np.array(1, I64)], [(x.shape[1],)]),
    }
    for label in [k for k in cases if k.startswith("SatWeightQuant")]:
        cases[label.replace(")", ", no factor)")] = cases[label]
    xw = (0.05 * x).astype(F32)
    for label in ("SatWeightQuant (DoReFa R=15)", "SatWeightQuant (DoReFa R=15, ApplyScaling)"):
        op, inputs, grad_shapes = cases[label]
        cases[label.replace(")", ", weights N(0, 0.05^2))")] = (op, [xw] + inputs[1:], grad_shapes)
    worst = np.inf
    print(f"{'op':55s} {'fwd ms':>8s} {'bwd ms':>8s} {'GB/s':>7s} {'fraction of copyto':>19s}")
    for label, (op, inputs, grad_shapes) in cases.items():
        if op == "SatWeightQuant":
            factor = "no factor" not in label
            n_out = 2 if factor else 1
            fwd = bound_runner(session(op, inputs, n_out, args.threads), inputs, [x.shape] * n_out)
            g_in = [dy] + inputs + ([fwd()[1]] if factor else [])
            bwd = bound_runner(session(op + "Grad", g_in, 1, args.threads), g_in, [x.shape])
        else:
            factor = True
            fwd = bound_runner(session(op, inputs, 1, args.threads), inputs, [x.shape])
            bwd = bound_runner(session(op + "Grad", [dy] + inputs, 1 + len(grad_shapes), args.threads), [dy] + inputs,
                               [x.shape] + grad_shapes)
        tf = best_time(fwd, args.repeat)
        tb = best_time(bwd, args.repeat)
        bw = 5 * x.nbytes / (tf + tb)
        frac = bw / copy_bw
        if factor:
            worst = min(worst, frac)
        print(f"{label:55s} {tf * 1e3:8.2f} {tb * 1e3:8.2f} {bw / 1e9:7.2f} {frac:19.2f}")
    print(f"worst fraction of copyto bandwidth: {worst:.2f} (target >= 0.5)")


if __name__ == "__main__":
    main()
