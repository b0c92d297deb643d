"""Where the ort format should write a dense convolution as a float Conv on the codes instead of a QLinearConv:
both lowerings of the same layer, timed side by side on onnxruntime CPU, over the number of input channels.

    .venv/bin/python bench/conv_lowering_sweep.py [--channels 4 6 8 16] [--outputs 16 64] [--repeat 15] [--runtime stock]

Model: conv0 (3 -> C) -> BN -> SAT 4-bit, conv1 (C -> C', k x k at H x W) -> BN -> SAT 4-bit, with and without a
2x2 MaxPool after it, GlobalAveragePool, Gemm; random weights. The two columns write both convolutions as float Convs
on the codes or as QLinearConvs (forced through MIN_QLINEAR_CHANNELS in onnxqat/fusion/formats/onnxruntime.py; with
the pool: float Conv, float MaxPool, QuantizeLinear against QLinearConv, uint8 MaxPool, Clip). Printed: median thread
CPU time of the QLinearConv model and float / QLinearConv at batch 1 and 64 (< 1: the float Conv is faster).
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import onnx

REPO = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(REPO), str(REPO / "tests" / "fusion"), str(REPO / "bench")]

import onnxqat.fusion.formats.onnxruntime as ort_format  # noqa: E402
from fused_latency import _TIMER, _builder  # noqa: E402
from onnxqat.fusion.api import fuse  # noqa: E402

SHAPES = ((5, 12), (3, 24), (3, 32))  # (kernel, input size): LeNet's second layer, two small CNN stages


def model(cin: int, cout: int, k: int, hw: int, pooled: bool) -> onnx.ModelProto:
    b = _builder(5, 15)
    x = b.sat_act("r0", b.bn("bn0", b.conv("conv0", "input", 3, cin, r=15), cin, False), "r0_out", 2.0, 15)
    x = b.sat_act("r1", b.bn("bn1", b.conv("conv1", x, cin, cout, k=k, pad=(k - 1) // 2, r=15), cout, False),
                  "r1_out", 2.3, 15)
    if pooled:
        x = b.op("MaxPool", [x], "pool", kernel_shape=[2, 2], strides=[2, 2])
    x = b.op("Flatten", [b.op("GlobalAveragePool", [x], "gap")], "flat", axis=1)
    return b.model(["N", 3, hw, hw], b.gemm("fc", x, cout, 10, r=15, fan_out=10), ["N", 10])


def lowered(qat: onnx.ModelProto, path: str, float_conv1: bool) -> str:
    saved = ort_format.MIN_QLINEAR_CHANNELS
    try:
        ort_format.MIN_QLINEAR_CHANNELS = 10**6 if float_conv1 else 0
        res = fuse(qat, path, format="ort", check=False)
    finally:
        ort_format.MIN_QLINEAR_CHANNELS = saved
    ops = [n.op_type for n in res.model.graph.node]
    assert ops.count("QLinearConv") == (0 if float_conv1 else 2), ops
    return path


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--channels", type=int, nargs="+", default=[4, 6, 8, 16], help="conv1's input channels")
    ap.add_argument("--outputs", type=int, nargs="+", default=[16, 64], help="conv1's output channels")
    ap.add_argument("--repeat", type=int, default=15)
    ap.add_argument("--runtime", choices=["stock", "local"], default="stock")
    args = ap.parse_args()
    py = sys.executable
    if args.runtime == "stock":
        from onnxqat.fusion.stock import stock_python

        py = str(stock_python())
    rows = []
    with tempfile.TemporaryDirectory(prefix="onnxqat-sweep-") as d:
        models = {}
        for cin, cout, (k, hw), pooled in itertools.product(args.channels, args.outputs, SHAPES, (True, False)):
            key = f"{cin}->{cout} k{k} {hw}x{hw} {'MaxPool' if pooled else 'no pool'}"
            qat = model(cin, cout, k, hw, pooled)
            for tag, fl in (("qlinear", False), ("float", True)):
                models[f"{key}/{tag}"] = lowered(qat, os.path.join(d, f"{len(models)}.onnx"), fl)
            rows.append(key)
        spec = {"models": models, "threads": 1, "batches": [1, 64], "repeat": args.repeat}
        out = subprocess.run([py, "-c", _TIMER, json.dumps(spec)], capture_output=True, text=True)
        if out.returncode != 0:
            sys.exit(f"timing failed: {out.stderr.strip().splitlines()[-1]}")
    res = json.loads(out.stdout)
    t = {(r["model"], r["batch"]): r["cpu_ms"] for r in res["rows"]}
    print(f"onnxruntime {res['version']} CPU, 1 thread, median of {args.repeat} interleaved runs (thread CPU time)")
    print(f"{'conv1':32} {'QLinearConv ms b1':>17} {'float/QLinear b1':>16} {'QLinearConv ms b64':>18} "
          f"{'float/QLinear b64':>17}")
    for key in rows:
        q1, f1 = t[(f"{key}/qlinear", 1)], t[(f"{key}/float", 1)]
        q64, f64 = t[(f"{key}/qlinear", 64)], t[(f"{key}/float", 64)]
        print(f"{key:32} {q1:17.3f} {f1 / q1:16.2f} {q64:18.3f} {f64 / q64:17.2f}")


if __name__ == "__main__":
    main()
