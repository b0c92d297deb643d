"""EfficientNet-Lite0 (ImageNet weights) -> LSQ W8A8 (calibrated, no training) -> fused integer model, compared with
the FP32 model on the 20 real ImageNet images that ship in foolbox 3.3.4's wheel.

    .venv/bin/python examples/02_efficientnet_lite0_lsq/run.py        # after export_onnx.py (see README.md)

Steps (all files under examples/02_efficientnet_lite0_lsq/work/, which git ignores):
1. images: `pip download --no-deps foolbox==3.3.4` (PyPI) and unzip foolbox/data/imagenet_*.jpg from the wheel
   (nothing is imported from foolbox); label = last number of the file name. Shorter side resized to 256 (bilinear),
   centre crop 224, RGB / 255 -> float32 NCHW in [0, 1] (the exported graph normalises with (255x - 127)/128 itself).
2. FP32: onnxruntime on the exported model (first checked against torch's logits saved by export_onnx.py).
3. insert, twice (both quantize every layer input: ReLU6 outputs unsigned [0, 255], the inputs no ReLU produced --
   linear bottlenecks, the residual sums' outputs, the normalised image -- signed [-128, 127]:
   activations.linear = true):
   a. recipe lsq8 as shipped: one weight step per tensor, LSQ's init 2*mean|W|/sqrt(Qp) from the pretrained weights,
      activation steps 2*mean|x|/sqrt(Qp) calibrated on the 20 images (insert's calibration_data);
   b. recipe lsq8_per_channel.toml (this folder), then every step set from the data: weights max|W_c|/127 per output
      channel (pretrained weights), activations max(x)/255 (signed: max|x|/127) over the 20 images (FP32 run).
4. fake-quant: both QAT models in onnxruntime with the quantizer op library.
5. fuse (model b) to the integer model, run with onnxruntime (no op library, uint8 pixel codes in). Should fuse
   refuse insert's graph, the table says why (fuse_blockers.py: one tiny graph per pattern of the network).
Prints a table: top-1 against the labels, top-1 agreement with FP32, cosine similarity of the logits with FP32.
No training: the 20 images are all there is, and they are also the calibration set (said in the table).
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import re
import subprocess
import sys
import time
import warnings
import zipfile
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[1]
FOOLBOX = "foolbox==3.3.4"
_SEEN: set[str] = set()


def fetch_images(work: Path) -> list[Path]:
    """The 20 ImageNet JPEGs of foolbox's wheel, unzipped into work/imagenet (downloaded once, from PyPI)."""
    out = work / "imagenet"
    jpgs = sorted(out.glob("imagenet_*.jpg"))
    if len(jpgs) == 20:
        return jpgs
    wheels = work / "wheels"
    wheel = sorted(wheels.glob("foolbox-3.3.4-*.whl"))
    if not wheel:
        print(f"images: pip download --no-deps {FOOLBOX} -> {wheels}", flush=True)
        subprocess.run([sys.executable, "-m", "pip", "download", "-q", "--no-deps", FOOLBOX, "-d", str(wheels)],
                       check=True)
        wheel = sorted(wheels.glob("foolbox-3.3.4-*.whl"))
    out.mkdir(parents=True, exist_ok=True)
    with zipfile.ZipFile(wheel[0]) as z:
        for name in z.namelist():
            if re.fullmatch(r"foolbox/data/imagenet_\d+_\d+\.jpg", name):
                (out / Path(name).name).write_bytes(z.read(name))
    jpgs = sorted(out.glob("imagenet_*.jpg"))
    if len(jpgs) != 20:
        raise SystemExit(f"images: expected 20 imagenet_*.jpg in {wheel[0]}, found {len(jpgs)}")
    return jpgs


def preprocess(path: Path) -> np.ndarray:
    """Shorter side -> 256 (bilinear), centre crop 224; uint8 HWC RGB."""
    from PIL import Image

    im = Image.open(path).convert("RGB")
    w, h = im.size
    s = 256 / min(w, h)
    im = im.resize((max(256, round(w * s)), max(256, round(h * s))), Image.BILINEAR)
    w, h = im.size
    left, top = (w - 224) // 2, (h - 224) // 2
    return np.asarray(im.crop((left, top, left + 224, top + 224)), dtype=np.uint8)


def load_images(work: Path) -> tuple[np.ndarray, np.ndarray, list[str]]:
    jpgs = fetch_images(work)
    pixels = np.stack([preprocess(p) for p in jpgs])  # [20, 224, 224, 3] uint8
    labels = np.array([int(re.search(r"_(\d+)\.jpg$", p.name).group(1)) for p in jpgs])
    x = (pixels.transpose(0, 3, 1, 2).astype(np.float32) / np.float32(255))
    return x, labels, [p.name for p in jpgs]


def session(model, library: bool = False):
    import onnxruntime as ort

    if library:
        from onnxqat.ops.library import session_options

        opts = session_options()
    else:
        opts = ort.SessionOptions()
    opts.intra_op_num_threads = 2
    opts.inter_op_num_threads = 1
    data = model if isinstance(model, (str, os.PathLike)) else model.SerializeToString()
    return ort.InferenceSession(str(data) if isinstance(data, Path) else data, opts,
                                providers=["CPUExecutionProvider"])


def run_logits(sess, x: np.ndarray) -> np.ndarray:
    inp = sess.get_inputs()[0]
    return sess.run(None, {inp.name: x})[0].astype(np.float64)


def cosine(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return np.sum(a * b, 1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1))


def set_steps(qat, fp32, x: np.ndarray) -> tuple[int, int]:
    """Post-training steps for an 8-bit LSQ model: weights max|W_c|/Qp per step entry (per channel or per tensor),
    activations max(x)/Qp (unsigned: Qp = R) or max|x|/Qp (signed) over the calibration batch (FP32 run).
    Returns (weight steps set, activation steps set)."""
    from onnx import numpy_helper

    from onnxqat.ops.reference import lsq_bounds
    from onnxqat.passes.calibration import collect

    inits = {t.name: t for t in qat.graph.initializer}
    lsq = [n for n in qat.graph.node if n.domain == "com.onnxqat" and n.op_type == "LsqQuant"]
    acts = [n for n in lsq if n.input[0] not in inits]
    values = collect(fp32, {"image": x}, [n.input[0] for n in acts]) if acts else {}
    nw = na = 0
    for n in lsq:
        t = inits[n.input[1]]
        old = numpy_helper.to_array(t).astype(np.float32)
        r = float(numpy_helper.to_array(inits[n.input[2]]).reshape(-1)[0])
        signed = bool(numpy_helper.to_array(inits[n.input[3]]).reshape(-1)[0])
        qn, qp = lsq_bounds(r, signed)
        if n.input[0] in inits:  # weight
            w = numpy_helper.to_array(inits[n.input[0]]).astype(np.float64)
            if old.size > 1:
                axis = int(numpy_helper.to_array(inits[n.input[5]]).reshape(-1)[0]) % w.ndim
                m = np.abs(np.moveaxis(w, axis, 0).reshape(w.shape[axis], -1)).max(1)
            else:
                m = np.array([np.abs(w).max()])
            new = np.where(m > 0, m / qp, old.reshape(-1))  # an all-zero channel keeps insert's step
            nw += 1
        else:  # activation: the largest calibration value (|value| when signed) lands on code Qp
            v = values[n.input[0]]
            m = float(np.max(np.abs(v)) if signed else np.max(v))
            if not m > 0:
                continue
            new = np.array([m / qp])
            na += 1
        t.CopyFrom(numpy_helper.from_array(new.astype(np.float32).reshape(old.shape), t.name))
    return nw, na


def try_fuse(qat, path: Path, x: np.ndarray, check: bool = True):
    """fuse() -> (logits of the fused model on x, FuseResult) or (None, error line). check: fuse's own self-check on
    x (fake-quant with the op library vs fused: output codes and every activation quantizer's codes)."""
    try:
        from onnxqat.fusion.api import fuse
    except ImportError as exc:
        return None, f"onnxqat.fusion.api not available ({exc})"
    try:
        res = fuse(qat, str(path), verify_data=x if check else None, check=check, verify_engine="onnxruntime")
    except Exception as exc:  # reported under the table, not hidden
        return None, f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"
    sess = session(path)
    feed = x if sess.get_inputs()[0].type == "tensor(float)" else np.round(x * 255).astype(np.uint8)
    y = sess.run(None, {sess.get_inputs()[0].name: feed})[0]
    print("fuse: " + res.summary().replace("\n", "\nfuse: "))
    stock_check(path, feed, y, path.parent)
    return y.astype(np.float64), res


STOCK_CHECK = """
import sys, numpy as np, onnxruntime as ort
d = np.load(sys.argv[2])
s = ort.InferenceSession(sys.argv[1], providers=["CPUExecutionProvider"])
y = s.run(None, {s.get_inputs()[0].name: d["x"]})[0]
print(ort.__version__, float(np.abs(y.astype(np.float64) - d["y"]).max()))
"""


def stock_check(fused_path: Path, feed: np.ndarray, y: np.ndarray, work: Path) -> None:
    """Runs the fused model in .venv-stock (the latest stock onnxruntime, no op library: scripts/make_stock_env.sh)
    when that environment exists, and prints how far its logits are from this environment's."""
    py = REPO / ".venv-stock" / "bin" / "python"
    if not py.exists():
        print("stock: .venv-stock not found (bash scripts/make_stock_env.sh creates it): stock-onnxruntime run skipped")
        return
    npz = work / "stock_check.npz"
    np.savez(npz, x=feed, y=y)
    out = subprocess.run([str(py), "-c", STOCK_CHECK, str(fused_path), str(npz)], capture_output=True, text=True)
    if out.returncode != 0:
        print(f"stock: the fused model fails on .venv-stock's onnxruntime: {out.stderr.strip().splitlines()[-1]}")
        return
    version, diff = out.stdout.split()
    print(f"stock: fused model on stock onnxruntime {version} (no op library): max |logit diff| vs this run {float(diff):.3g}")


def quantize(fp32_path: Path, recipe: str, x: np.ndarray, data_steps: bool, out: Path):
    """insert(recipe, calibration on x) [+ set_steps]; saves the QAT model to `out`, prints insert's warnings."""
    import onnx

    from onnxqat.passes.insert import insert

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        qat = insert(str(fp32_path), recipe, calibration_data={"image": x})
    for w in caught:
        msg = str(w.message)
        if msg not in _SEEN:  # the same warning for every variant: print it once
            _SEEN.add(msg)
            print(f"insert: warning: {msg[:240]}{' ...' if len(msg) > 240 else ''}")
    qs = [n for n in qat.graph.node if n.domain == "com.onnxqat"]
    inits = {t.name for t in qat.graph.initializer}
    nw = sum(1 for n in qs if n.input[0] in inits)
    ns = sum(1 for n in qs if n.input[0] not in inits and n.op_type == "LsqQuant" and
             any(t.name == n.input[3] and onnx.numpy_helper.to_array(t).reshape(-1)[0] for t in qat.graph.initializer))
    nq = f"{len(qs)} quantizer nodes ({nw} weight, {len(qs) - nw - ns} activation, {ns} signed activation)"
    how = "LSQ init from insert"
    if data_steps:
        nw, na = set_steps(qat, onnx.load(str(fp32_path)), x)
        how = f"steps set from data: {nw} weight (max|W_c|/127), {na} activation (max/Qp)"
    onnx.save(qat, str(out))
    print(f"insert: {Path(recipe).name}: {nq}; {how} -> {out.name}")
    return qat


def main() -> int:
    ap = argparse.ArgumentParser(description="EfficientNet-Lite0: FP32 vs LSQ W8A8 fake-quant vs fused, 20 ImageNet images")
    ap.add_argument("--work", default=str(HERE / "work"), help="folder for the downloads and models (gitignored)")
    ap.add_argument("--fp32", default=None, help="exported FP32 model (default: <work>/efficientnet_lite0_fp32.onnx)")
    ap.add_argument("--recipe", default=None,
                    help="recipe of model b (default: lsq8_per_channel.toml next to this script)")
    ap.add_argument("--json", default=None, help="also write the results as JSON here")
    ap.add_argument("--no-fuse-check", dest="fuse_check", action="store_false",
                    help="skip fuse's self-check (fake-quant vs fused codes at the output and at every quantizer)")
    args = ap.parse_args()
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    fp32_path = Path(args.fp32) if args.fp32 else work / "efficientnet_lite0_fp32.onnx"
    if not fp32_path.is_file():
        raise SystemExit(f"{fp32_path} is missing: run export_onnx.py first (README.md, step 1)")

    t0 = time.time()
    x, labels, names = load_images(work)
    print(f"images: {len(names)} ImageNet JPEGs from {FOOLBOX}, input {list(x.shape)} in [0, 1]")

    # ---- FP32
    fp32_sess = session(fp32_path)
    check = Path(str(fp32_path) + ".check.npz")
    err = None
    if check.is_file():
        with np.load(check) as c:
            err = float(np.max(np.abs(run_logits(fp32_sess, c["x"]) - c["logits"])))
        print(f"fp32: onnxruntime vs torch on the export's check input: max |logit diff| = {err:.2e}")
        if err > 1e-3:
            raise SystemExit("fp32: the exported ONNX model does not reproduce torch")
    y_fp32 = run_logits(fp32_sess, x)

    # ---- insert + fake-quant: (a) the shipped lsq8 recipe, (b) per-channel with steps set from the data
    qat_a = quantize(fp32_path, "lsq8", x, False, work / "efficientnet_lite0_lsq8_qat.onnx")
    y_a = run_logits(session(qat_a, library=True), x)
    recipe_b = args.recipe or str(HERE / "lsq8_per_channel.toml")
    qat_b_path = work / "efficientnet_lite0_lsq8pc_qat.onnx"
    qat_b = quantize(fp32_path, recipe_b, x, True, qat_b_path)
    y_b = run_logits(session(qat_b, library=True), x)
    rows = [("FP32 (onnxruntime)", y_fp32, fp32_path),
            ("lsq8 fake-quant", y_a, work / "efficientnet_lite0_lsq8_qat.onnx"),
            ("lsq8-pc fake-quant", y_b, qat_b_path)]

    # ---- fuse (model b)
    fuse_error = None
    y_fused, res = try_fuse(qat_b, work / "efficientnet_lite0_lsq8pc_int.onnx", x, args.fuse_check)
    if y_fused is not None:
        rows.append(("lsq8-pc fused (integer)", y_fused, work / "efficientnet_lite0_lsq8pc_int.onnx"))
        fused_of = y_b
    else:
        fuse_error = res
        print(f"fuse: lsq8-pc refused: {fuse_error}")
    fused_vs_fq = None
    if y_fused is not None:
        fused_vs_fq = dict(max_abs_diff=float(np.abs(y_fused - fused_of).max()),
                           agree=int((y_fused.argmax(1) == fused_of.argmax(1)).sum()),
                           cos_min=float(cosine(y_fused, fused_of).min()))
        print(f"fused vs its fake-quant model: top-1 {fused_vs_fq['agree']}/20, max |logit diff| "
              f"{fused_vs_fq['max_abs_diff']:.4f}, cosine >= {fused_vs_fq['cos_min']:.5f}")

    # ---- table
    top_fp32 = y_fp32.argmax(1)
    results = []
    print()
    print(f"{'model':<25} {'top-1 (labels)':>15} {'top-1 = FP32':>13} {'cos mean':>9} {'cos min':>9} "
          f"{'max|dlogit|':>11} {'size MB':>8}")
    for label, y, path in rows:
        top = y.argmax(1)
        cos = cosine(y, y_fp32)
        r = dict(model=label, top1=int((top == labels).sum()), agree=int((top == top_fp32).sum()), n=len(labels),
                 cos_mean=float(cos.mean()), cos_min=float(cos.min()),
                 max_abs_diff=float(np.abs(y - y_fp32).max()), size_mb=os.path.getsize(path) / 1e6)
        results.append(r)
        print(f"{label:<25} {r['top1']:>9}/{r['n']:<5} {r['agree']:>7}/{r['n']:<5} {r['cos_mean']:>9.5f} "
              f"{r['cos_min']:>9.5f} {r['max_abs_diff']:>11.4f} {r['size_mb']:>8.2f}")
    if fuse_error:
        print(f"{'lsq8-pc fused (integer)':<25} not produced: {fuse_error}")
    print(f"\n20 images, labels from the file names; the same 20 images calibrate the activation steps; "
          f"{time.time() - t0:.0f} s")
    if args.json:
        Path(args.json).write_text(json.dumps(dict(results=results, fuse_error=fuse_error, fp32_vs_torch=err, fused_vs_fake_quant=fused_vs_fq,
                                                labels=labels.tolist(), images=names), indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
