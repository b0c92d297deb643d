"""Latency of the fused integer model vs the FP32 model on onnxruntime CPU (batch 1 and 64, same run), and file sizes.

    .venv/bin/python bench/fused_latency.py [--model QAT.onnx] [--threads 1] [--runtime stock|local] [--repeat 30]

Without --model it builds two hand-made QAT graphs (LeNet-like 1x28x28 and a small ResNet-like 3x32x32, SAT 4-bit and
8-bit, random weights). The FP32 model is the same graph with the quantizers taken out (weights as trained floats,
SatActQuant -> Clip(0, alpha), LsqQuant on activations -> nothing). Timings run in one child process on the latest
stock onnxruntime (.venv-stock; --runtime local uses this env's onnxruntime 1.19.2), interleaving the models.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
import onnx
from onnx import helper, numpy_helper

REPO = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(REPO), str(REPO / "tests" / "fusion")]

from onnxqat.fusion.api import fuse  # noqa: E402
from onnxqat.fusion.graph import QatGraph  # noqa: E402
from onnxqat.ops.schema import DOMAIN  # noqa: E402

_TIMER = r"""
import json, sys, time, numpy as np, onnxruntime as ort
spec = json.loads(sys.argv[1])
res = {"version": ort.__version__, "rows": []}
sessions = {}
for name, path in spec["models"].items():
    so = ort.SessionOptions(); so.intra_op_num_threads = spec["threads"]; so.inter_op_num_threads = 1
    so.log_severity_level = 3
    sessions[name] = ort.InferenceSession(path, so, providers=["CPUExecutionProvider"])
for batch in spec["batches"]:
    times = {n: [] for n in sessions}
    feeds = {}
    for n, s in sessions.items():
        i = s.get_inputs()[0]
        shape = [batch] + [d for d in i.shape[1:]]
        codes = np.random.default_rng(0).integers(0, 256, size=shape, dtype=np.uint8)
        feeds[n] = {i.name: codes if i.type == "tensor(uint8)" else (codes / np.float32(255)).astype(np.float32)}
        for _ in range(3):
            s.run(None, feeds[n])
    for _ in range(spec["repeat"]):  # interleaved: load changes hit every model alike
        for n, s in sessions.items():
            t = time.perf_counter(); s.run(None, feeds[n]); times[n].append(time.perf_counter() - t)
    for n in sessions:
        res["rows"].append({"model": n, "batch": batch, "ms": 1e3 * float(np.median(times[n]))})
print(json.dumps(res))
"""


def float_model(qat: onnx.ModelProto) -> onnx.ModelProto:
    """The QAT graph with its quantizers taken out: what the FP32 deployment of the same network runs."""
    from onnxqat.ops.reference import sat_weight_forward  # noqa: F401  (weights stay the float originals)

    g = QatGraph(qat)
    nodes, inits = [], list(qat.graph.initializer)
    for n in qat.graph.node:
        if n.domain != DOMAIN:
            nodes.append(n)
        elif n.input[0] in g.consts:  # weight quantizer: consumer reads the float weight
            nodes.append(helper.make_node("Identity", [n.input[0]], [n.output[0]], name=n.name))
        elif n.op_type == "SatActQuant":
            alpha = abs(float(g.consts[n.input[1]].reshape(-1)[0]))
            lo, hi = f"{n.name}.lo", f"{n.name}.hi"
            inits += [numpy_helper.from_array(np.array(0, np.float32), lo), numpy_helper.from_array(np.array(alpha, np.float32), hi)]
            nodes.append(helper.make_node("Clip", [n.input[0], lo, hi], [n.output[0]], name=n.name))
        else:
            nodes.append(helper.make_node("Identity", [n.input[0]], [n.output[0]], name=n.name))
    graph = helper.make_graph(nodes, "fp32", list(qat.graph.input), list(qat.graph.output), inits)
    m = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=9)
    return onnx.shape_inference.infer_shapes(m)


def lenet(r: int) -> onnx.ModelProto:
    import qat_models as qm

    b = qm.QatBuilder(21)
    x = b.sat_act("relu1", b.bn("bn1", b.conv("conv1", "input", 1, 6, k=5, pad=0, r=r), 6, False), "relu1_out", 2.3, r)
    x = b.op("MaxPool", [x], "pool1", kernel_shape=[2, 2], strides=[2, 2])
    x = b.sat_act("relu2", b.bn("bn2", b.conv("conv2", x, 6, 16, k=5, pad=0, r=r), 16, False), "relu2_out", 2.7, r)
    x = b.op("MaxPool", [x], "pool2", kernel_shape=[2, 2], strides=[2, 2])
    x = b.op("Flatten", [x], "flat", axis=1)
    x = b.sat_act("relu3", b.gemm("fc1", x, 16 * 4 * 4, 120, r=r, fan_out=120), "relu3_out", 3.1, r)
    x = b.sat_act("relu4", b.gemm("fc2", x, 120, 84, r=r, fan_out=84), "relu4_out", 3.3, r)
    return b.model(["N", 1, 28, 28], b.gemm("fc3", x, 84, 10, r=r, fan_out=10), ["N", 10])


def resnet_small(r: int) -> onnx.ModelProto:
    import qat_models as qm

    b = qm.QatBuilder(22)
    x = b.sat_act("stem", b.bn("bn0", b.conv("conv0", "input", 3, 32, r=r), 32, False), "stem_out", 2.1, r)
    c = 32
    for i, (cout, stride) in enumerate([(32, 1), (64, 2), (64, 1), (128, 2)]):
        h = b.sat_act(f"b{i}a", b.bn(f"bn{i}a", b.conv(f"conv{i}a", x, c, cout, stride=stride, r=r), cout, False),
                      f"b{i}a_out", 2.2, r)
        h = b.bn(f"bn{i}b", b.conv(f"conv{i}b", h, cout, cout, r=r), cout, False)
        skip = x if (c == cout and stride == 1) else b.bn(f"bn{i}s", b.conv(f"conv{i}s", x, c, cout, k=1, pad=0,
                                                                               stride=stride, r=r), cout, False)
        x = b.sat_act(f"b{i}", b.op("Add", [h, skip], f"add{i}"), f"b{i}_out", 2.9, r)
        c = cout
    x = b.op("Flatten", [b.op("MaxPool", [x], "pool", kernel_shape=[8, 8], strides=[8, 8])], "flat", axis=1)
    return b.model(["N", 3, 32, 32], b.gemm("fc", x, 128, 10, r=r, fan_out=10), ["N", 10])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", help="a trained QAT model instead of the built-in ones")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--repeat", type=int, default=30)
    ap.add_argument("--runtime", choices=["stock", "local"], default="stock")
    args = ap.parse_args()
    qats = {}
    if args.model:
        p = Path(args.model)
        qats[p.stem if p.stem != "model" else f"{p.parent.name}/{p.stem}"] = onnx.load(args.model)
    else:
        for r, bits in ((15, 4), (255, 8)):
            qats[f"lenet-sat{bits}"] = lenet(r)
            qats[f"resnet-small-sat{bits}"] = resnet_small(r)
    with tempfile.TemporaryDirectory(prefix="onnxqat-bench-") as d:
        models, sizes = {}, {}
        for name, qat in qats.items():
            res = fuse(qat, os.path.join(d, f"{name}.int.onnx"), check=False)
            models[f"{name}/int"] = res.path
            models[f"{name}/int-float-rescale"] = fuse(qat, os.path.join(d, f"{name}.intf.onnx"), rescale="float",
                                                      check=False).path
            models[f"{name}/qdq"] = fuse(qat, os.path.join(d, f"{name}.qdq.onnx"), format="qdq", check=False).path
            fp = os.path.join(d, f"{name}.fp32.onnx")
            onnx.save(float_model(qat), fp)
            models[f"{name}/fp32"] = fp
            sizes[name] = (os.path.getsize(fp), res.size, res.weight_params)
        if args.runtime == "stock":
            from onnxqat.fusion.stock import stock_python

            py = str(stock_python())
        else:
            py = sys.executable
        spec = {"models": models, "threads": args.threads, "batches": [1, 64], "repeat": args.repeat}
        out = subprocess.run([py, "-c", _TIMER, json.dumps(spec)], capture_output=True, text=True)
        if out.returncode != 0:
            sys.exit(f"timing failed: {out.stderr.strip().splitlines()[-1]}")
        res = json.loads(out.stdout)
    ms = {(r["model"], r["batch"]): r["ms"] for r in res["rows"]}
    print(f"onnxruntime {res['version']} CPU, {args.threads} thread(s), median of {args.repeat} runs, same process")
    print("int: integer-only, fixed-point rescale; int-f: float-multiply rescale (N2D2's default); qdq: --format qdq")
    print(f"{'model':24} {'batch':>5} {'fp32 ms':>9} {'int ms':>9} {'int/fp32':>9} {'int-f/fp32':>10} {'qdq/fp32':>9}")
    for name in qats:
        for batch in (1, 64):
            f, i = ms[(f"{name}/fp32", batch)], ms[(f"{name}/int", batch)]
            j, q = ms[(f"{name}/int-float-rescale", batch)], ms[(f"{name}/qdq", batch)]
            print(f"{name:24} {batch:5d} {f:9.3f} {i:9.3f} {i / f:9.2f} {j / f:10.2f} {q / f:9.2f}")
    print(f"{'model':24} {'params':>8} {'fp32 bytes':>11} {'int bytes':>10} {'ratio':>6}")
    for name, (f, i, p) in sizes.items():
        print(f"{name:24} {p:8d} {f:11d} {i:10d} {i / f:6.3f}")


if __name__ == "__main__":
    main()
