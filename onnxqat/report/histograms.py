"""Per-layer weight-distribution pictures (N2D2's `<layer>_weights_quant.distrib.png`), drawn with Pillow.

For each Conv/ConvTranspose/Gemm/MatMul weight: a histogram of the float weights and, when a weight quantizer
feeds the layer, of the quantized weights (computed with the numpy reference of the op, times SAT's restore_scale) on
the same axes.
Quantized weights take few distinct values, so they are drawn as bars at those values.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
from onnx import numpy_helper

from onnxqat.ops.schema import DOMAIN, is_scale_restore

W, H = 640, 400
ML, MR, MT, MB = 60, 20, 36, 44
FLOAT_RGB = (70, 110, 200)
QUANT_RGB = (230, 120, 30)


def _quantized(node, inits) -> np.ndarray | None:
    from onnxqat.ops import reference as ref

    args = [inits.get(i) for i in node.input]
    if any(a is None for a in args):
        return None
    try:
        if node.op_type == "SatWeightQuant":
            return ref.sat_weight_forward(*args)
        if node.op_type == "LsqQuant":
            return ref.lsq_forward(*args)
    except Exception:
        return None
    return None


def weight_tensors(model: onnx.ModelProto) -> list[tuple[str, np.ndarray, np.ndarray | None]]:
    """(layer name, float weights, quantized weights or None) for every weighted layer."""
    g = model.graph
    inits = {i.name: numpy_helper.to_array(i) for i in g.initializer}
    producers = {o: n for n in g.node for o in n.output}
    out = []
    for n in g.node:
        if n.op_type not in ("Conv", "ConvTranspose", "Gemm", "MatMul") or len(n.input) < 2:
            continue
        src = n.input[1]
        q = None
        p = producers.get(src)
        restore = None
        if p is not None and is_scale_restore(p) and p.input[1] in inits:  # Wq times its restore_scale constant
            restore, p = inits[p.input[1]], producers.get(p.input[0])
        if p is not None and p.domain == DOMAIN:
            q = _quantized(p, inits)
            if q is not None and restore is not None:
                q = (q * restore).astype(np.float32)
            src = p.input[0]
        if src in inits and inits[src].dtype == np.float32:
            out.append((n.name or src, inits[src], q))
    return out


def _font():
    from PIL import ImageFont

    try:
        return ImageFont.load_default(size=13)
    except TypeError:
        return ImageFont.load_default()


def draw_histogram(name: str, w: np.ndarray, q: np.ndarray | None, path: str | Path, bins: int = 80) -> Path:
    from PIL import Image, ImageDraw

    w = w.reshape(-1).astype(np.float64)
    vals = [w] + ([q.reshape(-1).astype(np.float64)] if q is not None else [])
    lo = min(float(v.min()) for v in vals)
    hi = max(float(v.max()) for v in vals)
    if hi <= lo:
        lo, hi = lo - 1.0, hi + 1.0
    edges = np.linspace(lo, hi, bins + 1)
    hw, _ = np.histogram(w, edges)
    series = [(hw, FLOAT_RGB, "float", edges)]
    if q is not None:
        qv, qc = np.unique(q.reshape(-1), return_counts=True)
        if qv.size <= bins:  # discrete levels: one bar per level
            series.append((qc, QUANT_RGB, f"quantized ({qv.size} levels)", qv))
        else:  # continuous (SAT clamp phase): a histogram on the same bins, drawn as a step line
            hq, _ = np.histogram(q.reshape(-1), edges)
            series.append((hq, QUANT_RGB, "clamped (continuous)", None))
    ymax = max(int(s[0].max()) for s in series) or 1
    img = Image.new("RGB", (W, H), "white")
    d = ImageDraw.Draw(img)
    font = _font()
    pw, ph = W - ML - MR, H - MT - MB

    def X(v):
        return ML + (v - lo) / (hi - lo) * pw

    def Y(c):
        return MT + ph - c / ymax * ph

    d.rectangle([ML, MT, ML + pw, MT + ph], outline=(0, 0, 0))
    for i, c in enumerate(hw):
        if c:
            d.rectangle([X(edges[i]), Y(c), max(X(edges[i + 1]) - 1, X(edges[i])), MT + ph], fill=FLOAT_RGB)
    if q is not None and series[1][3] is None:
        hq = series[1][0]
        pts = []
        for i, c in enumerate(hq):
            pts += [(X(edges[i]), Y(c)), (X(edges[i + 1]), Y(c))]
        d.line(pts, fill=QUANT_RGB, width=2)
    elif q is not None:
        qv, qc = series[1][3], series[1][0]
        bw = max(2.0, min(6.0, pw / max(qv.size, 1) / 3))
        for v, c in zip(qv, qc):
            d.rectangle([X(v) - bw / 2, Y(c), X(v) + bw / 2, MT + ph], fill=QUANT_RGB)
    for t in np.linspace(lo, hi, 5):
        d.line([X(t), MT + ph, X(t), MT + ph + 4], fill=(0, 0, 0))
        d.text((X(t) - 18, MT + ph + 8), f"{t:.3g}", fill=(0, 0, 0), font=font)
    for frac in (0.0, 0.5, 1.0):
        d.text((4, Y(frac * ymax) - 7), f"{int(frac * ymax)}", fill=(0, 0, 0), font=font)
    d.text((ML, 8), f"{name}: {w.size} weights", fill=(0, 0, 0), font=font)
    x = ML + pw - 10
    for _, rgb, label, _ in reversed(series):
        x -= 8 * len(label) + 24
        d.rectangle([x, 10, x + 12, 22], fill=rgb)
        d.text((x + 16, 8), label, fill=(0, 0, 0), font=font)
    import io

    from onnxqat.files import atomic_write_bytes

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    png = io.BytesIO()  # written whole or not at all: a full disk or a kill leaves no 0-byte picture
    img.save(png, format="PNG")
    atomic_write_bytes(path, png.getvalue())
    return path


def write_weight_histograms(model: onnx.ModelProto | str | Path, out_dir: str | Path) -> list[Path]:
    if not isinstance(model, onnx.ModelProto):
        model = onnx.load(str(model))
    paths = []
    for name, w, q in weight_tensors(model):
        safe = "".join(c if c.isalnum() or c in "-_." else "_" for c in name)
        paths.append(draw_histogram(name, w, q, Path(out_dir) / f"{safe}_weights_quant.distrib.png"))
    return paths
