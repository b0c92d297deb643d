"""Data-parallel training throughput on this machine, allreduce time, and scaling estimates for larger jobs.

    python bench/distributed.py [--epochs 2] [--limit 12000] [--out runs/bench_distributed]

Same run, side by side, for LeNet (Fashion-MNIST, recipe lsq4) and a small ResNet (3x32x32 synthetic images,
recipe lsq4; 3 residual stages, 0.08 M parameters):
- 1 process x 1 thread (the reference for the scaling of either way to use two cores);
- 1 process x 2 ONNX Runtime threads (the default way to use both cores);
- `mpiexec -n 2` x 1 thread (the mpich wheel's launcher, shared memory between the ranks);
with the same global batch (2 x 64 = 128 in both), training images/s of the last epoch (training time only).
Then the measured time of one in-place MPI_Allreduce of a float32 vector of each model's gradient size and of
ResNet-18's (11.7 M parameters), and, from those figures and the textbook ring allreduce cost
(2 (N-1)/N x bytes / bandwidth + 2 (N-1) x latency, no overlap of communication with the backward pass, as in
onnxqat's loop), the expected scaling efficiency step / (step + allreduce) of ResNet-18 at 8 and 64 ranks over
10 and 100 Gb/s networks. The per-rank step time is ResNet-18's training FLOPs (3 x 1.82 GFLOP per 224x224 image,
batch 32) at the FLOP rate this machine reached on the small ResNet with one thread, times the cores of a
typical 32-core node (stated as an assumption in the output).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

RESNET18_PARAMS = 11_689_512
RESNET18_TRAIN_FLOP = 3 * 1.82e9  # forward + backward per 224x224 image
NODE_CORES = 32  # the assumed cores of one rank's machine in the estimate
LATENCY = {10: 20e-6, 100: 5e-6}  # per-message latency assumed for 10 / 100 Gb/s Ethernet (s)


def small_resnet(seed: int = 0):
    """Conv-BN-ReLU stem (3->16), three residual stages (16, 32 /2, 64 /2) of one basic block, GAP, Gemm 10."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(seed)
    inits, nodes = [], []

    def conv_bn(name, x, cin, cout, stride=1, k=3, relu=True):
        w = (rng.standard_normal((cout, cin, k, k)) * np.sqrt(2 / (cin * k * k))).astype(np.float32)
        inits.append(numpy_helper.from_array(w, f"{name}.weight"))
        nodes.append(helper.make_node("Conv", [x, f"{name}.weight"], [f"{name}_c"], name=name, kernel_shape=[k, k],
                                      strides=[stride, stride], pads=[k // 2] * 4))
        for p, v in (("scale", 1), ("B", 0), ("mean", 0), ("var", 1)):
            inits.append(numpy_helper.from_array(np.full(cout, v, np.float32), f"{name}_bn.{p}"))
        nodes.append(helper.make_node("BatchNormalization", [f"{name}_c"] + [f"{name}_bn.{p}" for p in
                                      ("scale", "B", "mean", "var")], [f"{name}_b"], name=f"{name}_bn"))
        if not relu:
            return f"{name}_b"
        nodes.append(helper.make_node("Relu", [f"{name}_b"], [f"{name}_r"], name=f"{name}_relu"))
        return f"{name}_r"

    x = conv_bn("stem", "input", 3, 16)
    cin = 16
    for i, (cout, stride) in enumerate(((16, 1), (32, 2), (64, 2))):
        h = conv_bn(f"s{i}a", x, cin, cout, stride)
        h = conv_bn(f"s{i}b", h, cout, cout, relu=False)
        skip = x if stride == 1 and cin == cout else conv_bn(f"s{i}p", x, cin, cout, stride, k=1, relu=False)
        nodes.append(helper.make_node("Add", [h, skip], [f"s{i}_sum"], name=f"s{i}_add"))
        nodes.append(helper.make_node("Relu", [f"s{i}_sum"], [f"s{i}_out"], name=f"s{i}_relu"))
        x, cin = f"s{i}_out", cout
    nodes.append(helper.make_node("GlobalAveragePool", [x], ["gap"], name="gap"))
    nodes.append(helper.make_node("Flatten", ["gap"], ["flat"], name="flatten", axis=1))
    inits += [numpy_helper.from_array((rng.standard_normal((10, 64)) * 0.1).astype(np.float32), "fc.weight"),
              numpy_helper.from_array(np.zeros(10, np.float32), "fc.bias")]
    nodes.append(helper.make_node("Gemm", ["flat", "fc.weight", "fc.bias"], ["logits"], name="fc", transB=1))
    g = helper.make_graph(nodes, "resnet_small", [helper.make_tensor_value_info("input", TensorProto.FLOAT,
                                                                                ["N", 3, 32, 32])],
                          [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["N", 10])], inits)
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])
    m.ir_version = 8
    return m


def resnet_flop_per_image() -> float:
    """Multiply-adds x 2 of the small ResNet's convolutions and Gemm per 32x32 image, forward."""
    macs = 32 * 32 * 3 * 16 * 9  # stem
    hw, cin = 32 * 32, 16
    for cout, stride in ((16, 1), (32, 2), (64, 2)):
        hw //= stride * stride
        macs += hw * cin * cout * 9 + hw * cout * cout * 9 + (hw * cin * cout if cin != cout else 0)
        cin = cout
    return 2.0 * (macs + 64 * 10)


def worker(args) -> None:
    """One training run (under mpiexec: one rank of it); rank 0 writes {images_per_s, params} to args.result."""
    import onnx

    import onnxqat
    from onnxqat.models.lenet import build_lenet
    from onnxqat.training.distributed import world

    comm = world()
    out = Path(args.out) / f"{args.model}_{args.mode}"
    if args.model == "lenet":
        model, data = build_lenet(seed=0), "fashion-mnist"
    else:
        model = small_resnet(0)
        data = str(Path(args.out) / "synthetic_cifar.npz")
    qat = onnxqat.insert(model, "lsq4")
    res = onnxqat.train(qat, data, out=out, epochs=args.epochs, batch_size=args.batch, threads=args.threads,
                        limit_train=args.limit, limit_test=1000, validation=0.0, progress=False, histograms=False,
                        eval_test=False, lr=0.02, log=lambda *_: None)
    if comm.is_root:
        n_params = sum(int(np.prod(t.dims)) for t in onnx.load(str(res.model_path)).graph.initializer
                       if t.data_type == 1)
        Path(args.result).write_text(json.dumps({"images_per_s": res.metrics[-1]["images_per_s"],
                                                 "cpu_seconds": res.metrics[-1]["cpu_seconds"],
                                                 "params": n_params}))


def allreduce_worker(args) -> None:
    """Median seconds of one in-place float32 Allreduce per size, written by rank 0."""
    from mpi4py import MPI

    comm = MPI.COMM_WORLD
    times = {}
    for n in args.sizes:
        buf = np.ones(int(n), np.float32)
        comm.Allreduce(MPI.IN_PLACE, buf, op=MPI.SUM)  # warm-up
        ts = []
        for _ in range(args.repeat):
            comm.Barrier()
            t0 = time.perf_counter()
            comm.Allreduce(MPI.IN_PLACE, buf, op=MPI.SUM)
            ts.append(time.perf_counter() - t0)
        times[int(n)] = float(np.median(ts))
    if comm.Get_rank() == 0:
        Path(args.result).write_text(json.dumps(times))


def run_case(args, model: str, mode: str) -> dict:
    result = Path(args.out) / f"{model}_{mode}.json"
    cmd = [sys.executable, __file__, "--worker", "--model", model, "--mode", mode, "--result", str(result),
           "--epochs", str(args.epochs), "--limit", str(args.limit), "--out", args.out]
    if mode in ("1x1", "1x2"):
        cmd += ["--threads", mode[-1], "--batch", str(2 * args.batch)]
    else:
        cmd = [mpiexec(), "-n", "2"] + cmd + ["--threads", "1", "--batch", str(args.batch)]
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if proc.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} failed:\n{proc.stderr[-3000:]}")
    return json.loads(result.read_text())


def mpiexec() -> str:
    local = Path(sys.executable).parent / "mpiexec"
    return str(local) if local.exists() else "mpiexec"


def ring_allreduce_s(n_ranks: int, n_bytes: float, gbit: float) -> float:
    return 2 * (n_ranks - 1) / n_ranks * n_bytes / (gbit * 1e9 / 8) + 2 * (n_ranks - 1) * LATENCY[gbit]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--epochs", type=int, default=2)
    ap.add_argument("--limit", type=int, default=12000, help="training images per epoch")
    ap.add_argument("--batch", type=int, default=64, help="per-rank batch (1 process: twice this)")
    ap.add_argument("--out", default="runs/bench_distributed")
    ap.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--allreduce", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--model", default="lenet", help=argparse.SUPPRESS)
    ap.add_argument("--mode", default="1x2", help=argparse.SUPPRESS)
    ap.add_argument("--threads", type=int, default=1, help=argparse.SUPPRESS)
    ap.add_argument("--result", help=argparse.SUPPRESS)
    ap.add_argument("--sizes", type=float, nargs="*", default=[], help=argparse.SUPPRESS)
    ap.add_argument("--repeat", type=int, default=20, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        return worker(args)
    if args.allreduce:
        return allreduce_worker(args)

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    n = args.limit
    np.savez(out / "synthetic_cifar.npz", x_train=rng.integers(0, 256, (n, 32, 32, 3), dtype=np.uint8),
             y_train=rng.integers(0, 10, n), x_test=rng.integers(0, 256, (1000, 32, 32, 3), dtype=np.uint8),
             y_test=rng.integers(0, 10, 1000))
    rows = {}
    for model in ("lenet", "resnet"):
        for mode in ("1x1", "1x2", "2x1"):
            rows[(model, mode)] = run_case(args, model, mode)
            print(f"{model:7s} {mode}: {rows[(model, mode)]['images_per_s']:8.0f} img/s", flush=True)
    sizes = [rows[("lenet", "1x2")]["params"], rows[("resnet", "1x2")]["params"], RESNET18_PARAMS]
    ar_json = out / "allreduce.json"
    subprocess.run([mpiexec(), "-n", "2", sys.executable, __file__, "--allreduce", "--result", str(ar_json),
                    "--sizes", *map(str, sizes)], check=True, env=dict(os.environ, PYTHONPATH=str(ROOT)))
    ar = {int(k): v for k, v in json.loads(ar_json.read_text()).items()}

    print(f"\ntraining images/s, same global batch {2 * args.batch}, {args.epochs} epoch(s) of {args.limit} images, "
          "last epoch, recipe lsq4:")
    print(f"{'model':8s} {'params':>9s} {'1 proc x 1 thr':>15s} {'1 proc x 2 thr':>15s} {'2 proc x 1 thr':>15s} "
          f"{'2x1 / 1x2':>9s} {'allreduce (2 ranks)':>20s}")
    report = {"rows": {}, "allreduce_s": ar}
    for model, size in (("lenet", sizes[0]), ("resnet", sizes[1])):
        one, a, b = (rows[(model, m)]["images_per_s"] for m in ("1x1", "1x2", "2x1"))
        report["rows"][model] = {"params": size, "1x1": one, "1x2": a, "2x1": b, "ratio": b / a}
        print(f"{model:8s} {size:9d} {one:15.0f} {a:15.0f} {b:15.0f} {b / a:9.2f} {1e3 * ar[size]:17.3f} ms")
    print(f"allreduce of ResNet-18's gradient ({RESNET18_PARAMS / 1e6:.1f} M float32, {4 * RESNET18_PARAMS / 1e6:.1f} MB)"
          f" between 2 ranks on this machine (shared memory): {1e3 * ar[RESNET18_PARAMS]:.1f} ms")

    # the estimate: the small ResNet's FLOP rate per thread on this machine, scaled to one NODE_CORES-core rank
    rate_1thread = resnet_flop_per_image() * 3 * rows[("resnet", "2x1")]["images_per_s"] / 2
    step = 32 * RESNET18_TRAIN_FLOP / (rate_1thread * NODE_CORES)
    print(f"\nestimate (on paper): ResNet-18, batch 32 per rank; one rank = a {NODE_CORES}-core node at this machine's "
          f"measured {rate_1thread / 1e9:.1f} GFLOP/s per core (small ResNet, training) -> {step:.2f} s per step; "
          f"ring allreduce of {4 * RESNET18_PARAMS / 1e6:.1f} MB, latency {LATENCY[10] * 1e6:.0f} us (10 Gb/s) / "
          f"{LATENCY[100] * 1e6:.0f} us (100 Gb/s), no overlap with the backward pass")
    print(f"{'ranks':>6s} {'network':>8s} {'allreduce':>10s} {'efficiency':>11s} {'speed-up':>9s}")
    report["estimate"] = {"step_s": step, "rate_per_core": rate_1thread, "rows": []}
    for n_ranks in (8, 64):
        for gbit in (10, 100):
            t = ring_allreduce_s(n_ranks, 4 * RESNET18_PARAMS, gbit)
            eff = step / (step + t)
            report["estimate"]["rows"].append({"ranks": n_ranks, "gbit": gbit, "allreduce_s": t, "efficiency": eff})
            print(f"{n_ranks:6d} {gbit:5d} Gb {1e3 * t:8.1f} ms {100 * eff:10.1f}% {eff * n_ranks:8.1f}x")
    (out / "results.json").write_text(json.dumps(report, indent=1))
    print(f"\ntarget: 2 processes >= 1.3x the images/s of 1 process x 2 threads on LeNet: "
          f"{'met' if report['rows']['lenet']['ratio'] >= 1.3 else 'NOT met'} ({report['rows']['lenet']['ratio']:.2f}x)")


if __name__ == "__main__":
    main()
