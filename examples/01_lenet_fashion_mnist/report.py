"""examples/01: evaluates every stage of the LeNet SAT run on the Fashion-MNIST test set and prints the results table.

    python examples/01_lenet_fashion_mnist/report.py OUT [--limit-test N] [--json PATH]

OUT is the folder run.sh (or run.py) wrote: lenet.onnx, fp32/, clamp/, sat4/ (each with model.onnx, metrics.json,
histograms/) and lenet.int.onnx. How each model runs:
- FP32, SAT clamp and SAT W4A4 fake-quant: onnxruntime from .venv, with onnxqat's op library for the quantizer nodes.
- the fused integer-only model: the latest stock `onnxruntime` from a second environment (.venv-stock, made by
  scripts/make_stock_env.sh on first use), which has no op library and no training build. Its input is the uint8
  image (code = pixel, real value = code / 255, the same as the training transform's divide-by-255).
Agreement = fused (stock onnxruntime) vs fake-quantized (op library) on the same test images: same top-1 class, and
the same logits up to float32 rounding (|difference| <= 1e-4). An image can differ when the float model's sum order
puts a pre-activation on the other side of a rounding boundary of an activation quantizer; the fused model's
integer sums are exact.
Writes OUT/results.json and OUT/pictures/{fused_graph,qat_graph}.png (the weight-distribution pictures are the
ones `onnxqat train` wrote in OUT/<stage>/histograms/).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import onnx
from onnx import numpy_helper

STAGES = [  # key, folder, label, weights
    ("fp32", "fp32", "FP32 baseline", "float32"),
    ("clamp", "clamp", "SAT clamp (phase 1, sat4-clamp)", "clamped float"),
    ("sat4", "sat4", "SAT W4A4 fake-quant (sat4)", "4-bit, first/last 8-bit"),
]
FUSED = "lenet.int.onnx"
LOGIT_TOL = 1e-4  # float32 rounding of the fake-quantized logits (|logit| < ~30: ulp < 4e-6)


def load_test_set(limit: int | None):
    from onnxqat.training.data import resolve_data

    _, test = resolve_data("fashion-mnist")
    test = test.limit(limit)
    x = np.ascontiguousarray(np.transpose(test.images, (0, 3, 1, 2)))  # NHWC -> NCHW, uint8 codes
    return x, test.labels


def run_ort(path: Path, x_codes: np.ndarray, batch: int = 1000) -> np.ndarray:
    """Logits of a float or fake-quantized model (onnxruntime in .venv, op library registered when needed)."""
    import onnxruntime as ort

    model = onnx.load(str(path))
    custom = any(op.domain not in ("", "ai.onnx") for op in model.opset_import)
    if custom:
        from onnxqat import session_options

        so = session_options()
    else:
        so = ort.SessionOptions()
    so.log_severity_level = 3
    sess = ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])
    name = sess.get_inputs()[0].name
    outs = []
    for i in range(0, len(x_codes), batch):
        xf = x_codes[i:i + batch].astype(np.float32) / np.float32(255.0)
        outs.append(sess.run(None, {name: xf})[0])
    return np.concatenate(outs)


def run_stock_fused(path: Path, x_codes: np.ndarray, batch: int = 2500) -> tuple[np.ndarray, str]:
    """Logits of the fused model on stock onnxruntime (.venv-stock), fed uint8 codes."""
    from onnxqat.fusion.stock import run_stock

    model = onnx.load(str(path))
    name = model.graph.input[0].name
    feed_type = model.graph.input[0].type.tensor_type.elem_type
    outs, version = [], "?"
    for i in range(0, len(x_codes), batch):
        xb = x_codes[i:i + batch]
        if feed_type != onnx.TensorProto.UINT8:
            xb = xb.astype(np.float32) / np.float32(255.0)
        res, version = run_stock(path, {name: xb}, threads=2)
        outs.append(res[0])
    return np.concatenate(outs), version


def output_scale(model: onnx.ModelProto) -> np.ndarray | None:
    """Scale of the DequantizeLinear that produces the fused model's output (real value of one logit code)."""
    inits = {t.name: t for t in model.graph.initializer}
    out = model.graph.output[0].name
    for n in model.graph.node:
        if out in n.output and n.op_type == "DequantizeLinear" and n.input[1] in inits:
            return numpy_helper.to_array(inits[n.input[1]]).astype(np.float64)
    return None


def stage_metrics(folder: Path) -> dict:
    p = folder / "metrics.json"
    if not p.is_file():
        return {}
    rows = json.loads(p.read_text())
    if not rows:
        return {}
    return {"epochs": len(rows), "train_seconds": round(sum(r.get("epoch_seconds", 0.0) for r in rows), 1),
            "images_per_s": round(float(np.mean([r.get("images_per_s", 0.0) for r in rows])), 1),
            "train_log_test_top1": rows[-1].get("test_top1")}


def top1(logits: np.ndarray, labels: np.ndarray) -> float:
    return 100.0 * float(np.mean(np.argmax(logits, 1) == labels))


def evaluate(out: Path, limit_test: int | None = None, pictures: bool = True) -> dict:
    out = Path(out)
    x, y = load_test_set(limit_test)
    res: dict = {"out": str(out), "test_images": int(len(y)), "stages": {}}
    logits = {}
    for key, folder, label, weights in STAGES:
        path = out / folder / "model.onnx"
        if not path.is_file():
            raise SystemExit(f"report: {path} is missing (run examples/01_lenet_fashion_mnist/run.sh first)")
        t0 = time.perf_counter()
        logits[key] = run_ort(path, x)
        res["stages"][key] = {"label": label, "model": str(path.relative_to(out)), "weights": weights,
                              "bytes": path.stat().st_size, "top1": top1(logits[key], y),
                              "eval_seconds": round(time.perf_counter() - t0, 2), **stage_metrics(out / folder)}
    fused_path = out / FUSED
    if not fused_path.is_file():
        raise SystemExit(f"report: {fused_path} is missing (run `onnxqat fuse` first)")
    t0 = time.perf_counter()
    fused_logits, version = run_stock_fused(fused_path, x)
    fused = onnx.load(str(fused_path))
    res["stages"]["fused"] = {"label": f"fused integer-only (stock onnxruntime {version})", "model": FUSED,
                              "weights": "4/8-bit integer codes", "bytes": fused_path.stat().st_size,
                              "top1": top1(fused_logits, y), "eval_seconds": round(time.perf_counter() - t0, 2)}
    fq = logits["sat4"]
    agree = float(np.mean(np.argmax(fq, 1) == np.argmax(fused_logits, 1)))
    d = np.abs(fq.astype(np.float64) - fused_logits.astype(np.float64)).max(1)
    same = d <= LOGIT_TOL
    res["agreement"] = {"top1_agreement": 100.0 * agree, "samples_differing": int(np.sum(np.argmax(fq, 1) !=
                                                                                      np.argmax(fused_logits, 1))),
                        "logits_match": 100.0 * float(np.mean(same)), "logits_mismatch_samples": int(np.sum(~same)),
                        "max_abs_logit_diff": float(d.max()),
                        "logit_scale": None if output_scale(fused) is None else float(np.max(output_scale(fused))),
                        "top1_diff_points": abs(res["stages"]["fused"]["top1"] - res["stages"]["sat4"]["top1"])}
    float_bytes = res["stages"]["fp32"]["bytes"]
    res["size"] = {"float_bytes": float_bytes, "fused_bytes": fused_path.stat().st_size,
                   "ratio": float_bytes / fused_path.stat().st_size}
    custom = [n.name for n in fused.graph.node if n.domain not in ("", "ai.onnx")]
    bn = [n.name for n in fused.graph.node if n.op_type == "BatchNormalization"]
    res["fused_graph"] = {"nodes": len(fused.graph.node), "custom_domain_nodes": len(custom),
                          "batchnorm_nodes": len(bn), "onnxruntime": version}
    if pictures:
        from onnxqat.report.graph_picture import render_graph

        pic = out / "pictures"
        pic.mkdir(parents=True, exist_ok=True)
        render_graph(fused, str(pic / "fused_graph.png"), "LeNet SAT W4A4, fused to integer-only (lenet.int.onnx)")
        render_graph(onnx.load(str(out / "sat4" / "model.onnx")), str(pic / "qat_graph.png"),
                     "LeNet SAT W4A4 QAT graph, before fusion")
        res["pictures"] = sorted(str(p.relative_to(out)) for p in out.glob("*/histograms/*.png")) + \
            [str((pic / "fused_graph.png").relative_to(out)), str((pic / "qat_graph.png").relative_to(out))]
    return res


def table(res: dict) -> str:
    s = res["stages"]
    rows = [("stage", "model file", "weights", "size", "test top-1", "train s")]
    for key in ("fp32", "clamp", "sat4", "fused"):
        r = s[key]
        rows.append((r["label"], r["model"], r["weights"], f"{r['bytes'] / 1000:.1f} kB", f"{r['top1']:.2f}%",
                     f"{r['train_seconds']:.0f}" if "train_seconds" in r else "-"))
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]

    def line(r):
        return "| " + " | ".join(c.ljust(w) if i < 3 else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths))) + " |"

    sep = "|" + "|".join("-" * (w + 2) for w in widths) + "|"
    a, z = res["agreement"], res["size"]
    lines = [f"LeNet on Fashion-MNIST, {res['test_images']} test images", line(rows[0]), sep]
    lines += [line(r) for r in rows[1:]]
    codes = (f"logits equal within {LOGIT_TOL:g} on {a['logits_match']:.2f}% "
             f"({a['logits_mismatch_samples']} images differ, max |difference| {a['max_abs_logit_diff']:.3g})")
    lines += [f"fused vs fake-quant: top-1 agreement {a['top1_agreement']:.2f}% "
              f"({a['samples_differing']} images differ), {codes}",
              f"model size: float {z['float_bytes']:,} B -> fused {z['fused_bytes']:,} B ({z['ratio']:.1f}x smaller); "
              f"fused graph: {res['fused_graph']['nodes']} nodes, {res['fused_graph']['batchnorm_nodes']} "
              f"BatchNormalization, {res['fused_graph']['custom_domain_nodes']} custom-domain"]
    for key in ("fp32", "clamp", "sat4"):
        r = s[key]
        t = r.get("train_log_test_top1")
        if t is not None and abs(t - r["top1"]) > 0.05 and res["test_images"] == 10000:
            lines.append(f"note: {key}: onnxqat train logged test top-1 {t:.2f}%, this evaluation {r['top1']:.2f}%")
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("out", type=Path)
    p.add_argument("--limit-test", type=int, default=None, help="first N test images (default: all 10000)")
    p.add_argument("--json", type=Path, default=None, help="results file (default: OUT/results.json)")
    a = p.parse_args(argv)
    res = evaluate(a.out, a.limit_test)
    path = a.json or a.out / "results.json"
    path.write_text(json.dumps(res, indent=1))
    print(table(res))
    print(f"results: {path}; pictures: {a.out}/pictures/, {a.out}/<stage>/histograms/")
    return 0


if __name__ == "__main__":
    sys.exit(main())
