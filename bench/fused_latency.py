"""Fused models vs FP32 and vs onnxruntime's own post-training quantization, on onnxruntime CPU (one run, side by side).

    .venv/bin/python bench/fused_latency.py [--lenet-run runs/ex01-quick] [--threads 1] [--repeat 30] [--runtime stock]

Models: a LeNet (1x28x28) and a small ResNet (3x32x32, 4 residual blocks) with random weights, SAT 4-bit (DoReFa
weights) and 8-bit (symmetric weights, as recipes/sat8.toml: 8-bit DoReFa's odd codes up to +-255 fit no 8-bit
kernel), as hand-made QAT graphs (latency and size only; random weights make deep networks' codes too fragile for
the agreement figure to mean much); the small ResNet once more with a signed quantizer on each residual
branch (the placement of TFLite/ORT PTQ, where every Add input is quantized); and with --lenet-run a trained LeNet from
examples/01 (its fp32/ and sat4/ models), for which every variant's top-1 on the 10,000 Fashion-MNIST test images is
measured too; and real topologies of the test corpus (--corpus: ResNet-18 and MobileNetV3-Small exports, random
weights) with shipped recipes inserted (lsq4-int: every Add and elementwise-function input quantized, as TFLite
and onnxruntime's quantizer place them; sat4: N2D2's placement, residual branches in float; sat4-int: sat4 with signed LSQ quantizers on the branches). Variants: fp32 (the QAT
graph without quantizers, the trained FP32 model, or the corpus export), fused --format ort / int / qdq, and
onnxruntime's documented post-training flow on the FP32 model (quant_pre_process, then quantize_static, QDQ and
QOperator, per channel, uint8 activations, int8 weights; calibrated on 64 inputs); "ort/best PTQ" is the fused ort
model's time over the faster of the two. Timings: one child process on the latest stock onnxruntime
(.venv-stock; --runtime local: this env's 1.19.2), models interleaved, median of --repeat runs of the CPU time of the
calling thread (robust on a shared machine) and of the wall time.
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

FORMATS = ("ort", "int", "qdq")

_TIMER = r"""
import json, sys, time, numpy as np, onnxruntime as ort
spec = json.loads(sys.argv[1])
res = {"version": ort.__version__, "rows": [], "top1": {}}
sessions = {}
for name, path in spec["models"].items():
    so = ort.SessionOptions(); so.intra_op_num_threads = spec["threads"]; so.inter_op_num_threads = 1
    so.log_severity_level = 3
    sessions[name] = ort.InferenceSession(path, so, providers=["CPUExecutionProvider"])

def feed(s, codes):
    i = s.get_inputs()[0]
    return {i.name: codes if i.type == "tensor(uint8)" else (codes / np.float32(255)).astype(np.float32)}

for batch in spec["batches"]:
    cpu = {n: [] for n in sessions}; wall = {n: [] for n in sessions}
    feeds = {}
    for n, s in sessions.items():
        shape = [batch] + list(s.get_inputs()[0].shape[1:])
        feeds[n] = feed(s, np.random.default_rng(0).integers(0, 256, size=shape, dtype=np.uint8))
        for _ in range(3):
            s.run(None, feeds[n])
    for _ in range(spec["repeat"]):  # interleaved: load changes hit every model alike
        for n, s in sessions.items():
            c, w = time.thread_time(), time.perf_counter()
            s.run(None, feeds[n])
            cpu[n].append(time.thread_time() - c); wall[n].append(time.perf_counter() - w)
    for n in sessions:
        res["rows"].append({"model": n, "batch": batch, "cpu_ms": 1e3 * float(np.median(cpu[n])),
                            "wall_ms": 1e3 * float(np.median(wall[n]))})
if spec.get("test"):
    with np.load(spec["test"]) as z:
        x, y = z["x"], z["y"]
    for n, s in sessions.items():
        if n.startswith(spec["test_prefix"]):
            pred = np.concatenate([np.argmax(s.run(None, feed(s, x[i:i + 500]))[0], 1) for i in range(0, len(x), 500)])
            res["top1"][n] = 100 * float(np.mean(pred == y))
print(json.dumps(res))
"""


def float_model(qat: onnx.ModelProto) -> onnx.ModelProto:
    """The QAT graph with its quantizers taken out: what the FP32 deployment of the same network runs."""
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
            inits += [numpy_helper.from_array(np.array(0, np.float32), lo),
                      numpy_helper.from_array(np.array(alpha, np.float32), hi)]
            nodes.append(helper.make_node("Clip", [n.input[0], lo, hi], [n.output[0]], name=n.name))
        else:
            nodes.append(helper.make_node("Identity", [n.input[0]], [n.output[0]], name=n.name))
    graph = helper.make_graph(nodes, "fp32", list(qat.graph.input), list(qat.graph.output), inits)
    m = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=9)
    return onnx.shape_inference.infer_shapes(m)


def _builder(seed: int, r: int):
    import qat_models as qm

    from onnxqat.ops.schema import SAT_MODE_DOREFA, SAT_MODE_SYMMETRIC

    return qm.QatBuilder(seed, SAT_MODE_DOREFA if r < 255 else SAT_MODE_SYMMETRIC)


def lenet(r: int) -> onnx.ModelProto:
    b = _builder(21, r)
    x = b.sat_act("relu1", b.bn("bn1", b.conv("conv1", "input", 1, 6, k=5, pad=0, r=r), 6, False), "relu1_out", 2.3, r)
    x = b.op("MaxPool", [x], "pool1", kernel_shape=[2, 2], strides=[2, 2])
    x = b.sat_act("relu2", b.bn("bn2", b.conv("conv2", x, 6, 16, k=5, pad=0, r=r), 16, False), "relu2_out", 2.7, r)
    x = b.op("MaxPool", [x], "pool2", kernel_shape=[2, 2], strides=[2, 2])
    x = b.op("Flatten", [x], "flat", axis=1)
    x = b.sat_act("relu3", b.gemm("fc1", x, 16 * 4 * 4, 120, r=r, fan_out=120), "relu3_out", 3.1, r)
    x = b.sat_act("relu4", b.gemm("fc2", x, 120, 84, r=r, fan_out=84), "relu4_out", 3.3, r)
    return b.model(["N", 1, 28, 28], b.gemm("fc3", x, 84, 10, r=r, fan_out=10), ["N", 10])


def resnet_small(r: int, branch_quantizers: bool = False) -> onnx.ModelProto:
    """Stem + 4 residual blocks + pooled Gemm; branch_quantizers: a signed LSQ quantizer on each branch before the
    Add (every Add input quantized, as TFLite and onnxruntime's PTQ place them)."""
    b = _builder(22, r)

    def branch_q(name: str, t: str) -> str:
        if not branch_quantizers:
            return t
        b._lsq(f"{name}_aquant", t, f"{t}_q", np.array([3.0 / ((r + 1) // 2)], np.float32), r, 1)
        return f"{t}_q"

    x = b.sat_act("stem", b.bn("bn0", b.conv("conv0", "input", 3, 32, r=r), 32, False), "stem_out", 2.1, r)
    c = 32
    for i, (cout, stride) in enumerate([(32, 1), (64, 2), (64, 1), (128, 2)]):
        h = b.sat_act(f"b{i}a", b.bn(f"bn{i}a", b.conv(f"conv{i}a", x, c, cout, stride=stride, r=r), cout, False),
                      f"b{i}a_out", 2.2, r)
        h = branch_q(f"b{i}h", b.bn(f"bn{i}b", b.conv(f"conv{i}b", h, cout, cout, r=r), cout, False))
        skip = x if (c == cout and stride == 1) else branch_q(f"b{i}s", b.bn(
            f"bn{i}s", b.conv(f"conv{i}s", x, c, cout, k=1, pad=0, stride=stride, r=r), cout, False))
        x = b.sat_act(f"b{i}", b.op("Add", [h, skip], f"add{i}"), f"b{i}_out", 2.9, r)
        c = cout
    x = b.op("Flatten", [b.op("MaxPool", [x], "pool", kernel_shape=[8, 8], strides=[8, 8])], "flat", axis=1)
    return b.model(["N", 3, 32, 32], b.gemm("fc", x, 128, 10, r=r, fan_out=10), ["N", 10])


def corpus_models(name: str, recipes: list[str], fp32s: dict) -> dict[str, onnx.ModelProto]:
    """{"<name>-<recipe>": QAT model} of a corpus architecture; fp32s gets the float model each is compared with."""
    import warnings

    from onnxqat.passes.insert import insert
    from tests.corpus import build_corpus

    (cm,) = build_corpus([name], opsets=[13])
    m = onnx.load(cm.path)
    dims = [d.dim_value for d in m.graph.input[0].type.tensor_type.shape.dim[1:]]
    calib = np.random.default_rng(2).integers(0, 256, size=[16] + dims).astype(np.float32) / np.float32(255)
    out = {}
    for recipe in recipes:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            out[f"{name}-{recipe}"] = insert(m, recipe, calibration_data={m.graph.input[0].name: calib})
        fp32s[f"{name}-{recipe}"] = str(cm.path)
    return out


def ptq(fp32_path: str, out_prefix: str, calib: np.ndarray) -> dict[str, str]:
    """onnxruntime's documented post-training flow on the FP32 model: quant_pre_process (shape inference, graph
    optimisation: BatchNormalization folded into the convolutions), then quantize_static, QDQ and QOperator, per
    channel. (Without the pre-processing BatchNormalization stays a float op between Dequantize and Quantize and the
    ResNet runs ~1.7x slower.)"""
    from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_static
    from onnxruntime.quantization.shape_inference import quant_pre_process

    pre = f"{out_prefix}.ptq-pre.onnx"
    quant_pre_process(fp32_path, pre)
    fp32_path = pre
    name = onnx.load(fp32_path).graph.input[0].name

    class Reader(CalibrationDataReader):
        def __init__(self):
            self.batches = iter([{name: (calib[i:i + 16] / np.float32(255)).astype(np.float32)}
                                 for i in range(0, len(calib), 16)])

        def get_next(self):
            return next(self.batches, None)

    out = {}
    for fmt, tag in ((QuantFormat.QDQ, "ptq-qdq"), (QuantFormat.QOperator, "ptq-qop")):
        path = f"{out_prefix}.{tag}.onnx"
        quantize_static(fp32_path, path, Reader(), quant_format=fmt, per_channel=True,
                        activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8)
        out[tag] = path
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--lenet-run", help="an examples/01 output folder (fp32/model.onnx, sat4/model.onnx): adds the "
                    "trained LeNet with top-1 on the test set")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--repeat", type=int, default=30)
    ap.add_argument("--runtime", choices=["stock", "local"], default="stock")
    ap.add_argument("--no-random", action="store_true", help="only the trained LeNet")
    ap.add_argument("--corpus", default="resnet18:sat4+sat4-int+lsq4-int,mobilenetv3_small:lsq4-int",
                    help="corpus models (tests/corpus, opset 13, random weights) and the recipes inserted on them, "
                         "calibrated on random images; '' for none")
    args = ap.parse_args()
    qats, fp32s = {}, {}
    if not args.no_random:
        for r, bits in ((15, 4), (255, 8)):
            qats[f"lenet-sat{bits}"] = lenet(r)
            qats[f"resnet-sat{bits}"] = resnet_small(r)
        qats["resnet-sat4-branchq"] = resnet_small(15, branch_quantizers=True)
    for name, recipes in (item.split(":") for item in args.corpus.split(",") if item):
        qats.update(corpus_models(name, recipes.split("+"), fp32s))
    test = None
    with tempfile.TemporaryDirectory(prefix="onnxqat-bench-") as d:
        if args.lenet_run:
            run = Path(args.lenet_run)
            qats["lenet-trained-sat4"] = onnx.load(str(run / "sat4" / "model.onnx"))
            fp32s["lenet-trained-sat4"] = str(run / "fp32" / "model.onnx")
            from onnxqat.training.data import resolve_data

            _, ds = resolve_data("fashion-mnist")
            test = os.path.join(d, "test.npz")
            np.savez(test, x=ds.images.reshape(-1, 1, 28, 28), y=ds.labels)
        models, sizes, agree = {}, {}, {}
        for name, qat in qats.items():
            fp = fp32s.get(name) or os.path.join(d, f"{name}.fp32.onnx")
            if name not in fp32s:
                onnx.save(float_model(qat), fp)
            models[f"{name}/fp32"] = fp
            sizes[(name, "fp32")] = os.path.getsize(fp)
            dims = [dd.dim_value for dd in qat.graph.input[0].type.tensor_type.shape.dim[1:]]
            calib = np.random.default_rng(1).integers(0, 256, size=[64] + dims, dtype=np.uint8)
            if test is not None and name == "lenet-trained-sat4":
                with np.load(test) as z:
                    calib = z["x"][:64]
            for fmt in FORMATS:
                res = fuse(qat, os.path.join(d, f"{name}.{fmt}.onnx"), format=fmt, verify_data=calib[:32],
                           min_agreement=0, report=False)
                models[f"{name}/{fmt}"] = res.path
                sizes[(name, fmt)] = res.size
                agree[(name, fmt)] = res.agreement.code_agreement
            for tag, path in ptq(fp, os.path.join(d, name), calib).items():
                models[f"{name}/{tag}"] = path
                sizes[(name, tag)] = os.path.getsize(path)
        py = sys.executable
        if args.runtime == "stock":
            from onnxqat.fusion.stock import stock_python

            py = str(stock_python())
        spec = {"models": models, "threads": args.threads, "batches": [1, 64], "repeat": args.repeat,
                "test": test, "test_prefix": "lenet-trained"}
        out = subprocess.run([py, "-c", _TIMER, json.dumps(spec)], capture_output=True, text=True)
        if out.returncode != 0:
            sys.exit(f"timing failed: {out.stderr.strip().splitlines()[-1]}")
        res = json.loads(out.stdout)
        if test is not None:  # the fake-quantized model itself (op library: this env's onnxruntime)
            from onnxqat.fusion.verify import build_feeds, fake_quant_runner

            with np.load(test) as z:
                x, y = z["x"], z["y"]
            qat = qats["lenet-trained-sat4"]
            run_fq = fake_quant_runner(qat)
            pred = np.concatenate([np.argmax(run_fq(build_feeds(qat, qat, x[i:i + 500], 1 / 255, 0, 0)[0])[0], 1)
                                   for i in range(0, len(x), 500)])
            res["top1"]["lenet-trained-sat4/fake-quant"] = 100 * float(np.mean(pred == y))
    report(res, qats, sizes, agree, args)


def report(res: dict, qats: dict, sizes: dict, agree: dict, args) -> None:
    rows = {(r["model"], r["batch"]): r for r in res["rows"]}
    variants = ["fp32", *FORMATS, "ptq-qdq", "ptq-qop"]
    print(f"onnxruntime {res['version']} CPU, {args.threads} thread(s), median of {args.repeat} interleaved runs; "
          "time relative to fp32 (CPU time of the calling thread; wall time in brackets)")
    print(f"{'model':28} {'batch':>5} {'fp32 ms':>8} " + " ".join(f"{v:>13}" for v in variants[1:])
          + f" {'ort/best PTQ':>13}")
    for name in qats:
        for batch in (1, 64):
            f = rows[(f"{name}/fp32", batch)]
            cells = [f"{rows[(f'{name}/{v}', batch)]['cpu_ms'] / f['cpu_ms']:5.2f} "
                     f"({rows[(f'{name}/{v}', batch)]['wall_ms'] / f['wall_ms']:4.2f})" for v in variants[1:]]
            best_ptq = min(rows[(f"{name}/{v}", batch)]["cpu_ms"] for v in ("ptq-qdq", "ptq-qop"))
            vs_ptq = rows[(f"{name}/ort", batch)]["cpu_ms"] / best_ptq
            print(f"{name:28} {batch:5d} {f['cpu_ms']:8.3f} " + " ".join(f"{c:>13}" for c in cells) + f" {vs_ptq:13.2f}")
    print(f"\n{'model':28} " + " ".join(f"{v:>9}" for v in variants) + "   file bytes / fp32 bytes")
    for name in qats:
        fp = sizes[(name, "fp32")]
        print(f"{name:28} {fp:9d} " + " ".join(f"{sizes[(name, v)] / fp:9.3f}" for v in variants[1:]))
    trained = {k: a for k, a in agree.items() if k[0].startswith("lenet-trained")}
    if trained:
        print("\ntrained LeNet, fused vs (bias-snapped) fake-quant, output codes identical on 32 test images: " +
              ", ".join(f"{f} {100 * a:.2f}%" for (_, f), a in trained.items()))
    if res["top1"]:
        print("\ntrained LeNet, top-1 on the 10,000 test images: " +
              ", ".join(f"{k.split('/')[1]} {v:.2f}%" for k, v in sorted(res["top1"].items())))


if __name__ == "__main__":
    main()
