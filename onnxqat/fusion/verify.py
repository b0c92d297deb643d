"""Self-check of a fused model: the fake-quantized (QAT) model and the fused model on the same batch.

The QAT model runs on onnxruntime with the compiled op library (default), or on onnx.reference with the numpy
quantizer references (`reference_ops()`, the executable form of the quantizer math; slow, and onnx.reference has known
gaps such as Conv's auto_pad=VALID in onnx 1.17). The fused model runs on this environment's onnxruntime where its
kernels cover the graph, else on onnx.reference. A model with several inputs gets one array per input (NPZ keys =
input names); inputs without data get random values.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import onnx

from onnxqat.errors import DataError, FuseError
from onnxqat.fusion.graph import QatGraph
from onnxqat.fusion.values import OutputInfo


@dataclass
class Agreement:
    samples: int
    max_code_diff: float  # max |code(fake-quant) - code(fused)| over all output elements, in output code units
    code_agreement: float  # fraction of output elements whose codes are identical
    top1_agreement: float  # fraction of samples whose argmax is identical (first output, rank 2)
    fused_engine: str
    activations: dict | None = None  # quantizer output -> fraction of its codes identical in both models
    fake_quant_engine: str = "onnx.reference"
    # Layer by layer: every layer of the fake-quantized model fed the fused model's codes of its inputs. One rounding
    # tie decided differently upstream (BN folded, another summation order) moves codes downstream and, in a deep
    # network on 8 bits, compounds (EfficientNet-Lite0: 99.9996 % of the codes after its first layer, 52 % at block
    # 15, top-1 still 100 %); fed identical inputs, each layer shows its own differences only, i.e. a lowering error.
    local_activations: dict | None = None
    local_code_agreement: float | None = None

    @property
    def local_agreement(self) -> float:
        """The lowest layer-by-layer agreement (quantizer codes and outputs); what the self-check's minimum applies to."""
        vals = list((self.local_activations or {}).values())
        vals.append(self.code_agreement if self.local_code_agreement is None else self.local_code_agreement)
        return min(vals)

    @property
    def identical(self) -> bool:
        return self.max_code_diff == 0 and self.top1_agreement == 1.0

    @property
    def min_activation_agreement(self) -> float:
        return min(self.activations.values()) if self.activations else 1.0

    def summary(self) -> str:
        s = (f"verify: {self.samples} samples, max output code difference {self.max_code_diff:g}, "
             f"codes identical {100 * self.code_agreement:.3f}%, top-1 agreement {100 * self.top1_agreement:.2f}% "
             f"(fake-quant on {self.fake_quant_engine}, fused on {self.fused_engine})")
        if self.activations:
            worst = min(self.activations, key=self.activations.get)
            exact = sum(1 for v in self.activations.values() if v == 1.0)
            s += (f"\nverify: activation codes identical at {exact} of {len(self.activations)} quantizers; "
                  f"lowest agreement {100 * self.activations[worst]:.3f}% ({worst})")
        if self.local_activations is not None:
            worst = min(self.local_activations, key=self.local_activations.get, default=None)
            s += (f"\nverify: layer by layer (each layer fed the fused model's codes): output codes identical "
                  f"{100 * self.local_code_agreement:.3f}%")
            if worst is not None:
                s += f", lowest quantizer {100 * self.local_activations[worst]:.3f}% ({worst})"
        return s


def fake_quant_runner(model: onnx.ModelProto, engine: str = "onnxruntime") -> Callable[[dict], list[np.ndarray]]:
    """feeds -> outputs of the QAT model. engine "reference": onnx.reference + the numpy quantizer references (the
    executable spec); "onnxruntime": onnxruntime with the compiled op library (fast, for large models).
    The session is built once: verify and accuracy_check run it on chunk after chunk."""
    if engine == "onnxruntime":
        import onnxruntime as ort

        from onnxqat.ops.library import session_options

        so = session_options()
        so.log_severity_level = 3
        sess = ort.InferenceSession(model.SerializeToString(), so, providers=["CPUExecutionProvider"])
    else:
        from onnx.reference import ReferenceEvaluator

        from onnxqat.ops.reference import reference_ops

        sess = ReferenceEvaluator(model, new_ops=reference_ops())
    return lambda feeds: [np.asarray(o) for o in sess.run(None, feeds)]


def _ort_session(model: onnx.ModelProto, threads: int = 1):
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.intra_op_num_threads = threads
    so.inter_op_num_threads = 1
    so.log_severity_level = 3
    return ort.InferenceSession(model.SerializeToString(), so, providers=["CPUExecutionProvider"])


def session_check(model: onnx.ModelProto, qat: onnx.ModelProto) -> None:
    """The fused model must load in onnxruntime (this environment's; the stock one is checked by the tests) and run
    one sample: the ONNX checker passes graphs onnxruntime refuses (a QuantizeLinear with an int32 zero point), and some
    kernels check their inputs only when they run. FuseError names the node."""
    import onnxruntime as ort

    try:
        sess = _ort_session(model)
    except Exception as exc:
        msg = _first_line(exc)
        if "NOT_IMPLEMENTED" in msg or "not implemented" in msg.lower():
            return  # a kernel this (older) onnxruntime lacks; the self-check runs it on onnx.reference
        raise FuseError(f"the fused model does not load in onnxruntime {ort.__version__}: {msg}") from None
    try:
        _, feeds = build_feeds(qat, model, None, 1 / 255, 1, 0)
    except (FuseError, DataError):
        return  # symbolic input dimensions: only the self-check with the user's data can run it
    try:
        sess.run(None, feeds)
    except Exception as exc:
        raise FuseError(f"the fused model fails in onnxruntime {ort.__version__}: {_first_line(exc)}") from None


def _first_line(exc: Exception) -> str:
    """onnxruntime's message without its C++ source location ("Non-zero status code ... Status Message: ...")."""
    msg = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
    node = msg.split("Name:'")[1].split("'")[0] if "Name:'" in msg else None
    tail = msg.split("Status Message:")[-1].strip()
    tail = re.sub(r"^\S*\.(cc|cpp|h):\d+\s+", "", tail)  # the C++ source location
    return f"node '{node}': {tail}" if node else tail


def fused_runner(model: onnx.ModelProto, threads: int = 1) -> tuple[Callable[[dict], list[np.ndarray]], str]:
    """(feeds -> outputs of the fused model, engine name): onnxruntime, or onnx.reference where the installed
    runtime has no kernel for an op (e.g. 1.19.2's coverage; ORT reports that when it builds the session)."""
    try:
        import onnxruntime as ort

        sess = _ort_session(model, threads)
        return (lambda feeds: sess.run(None, feeds)), f"onnxruntime {ort.__version__}"
    except Exception as exc:
        if "NOT_IMPLEMENTED" not in str(exc) and "not implemented" not in str(exc).lower():
            raise
    from onnx.reference import ReferenceEvaluator

    ref = ReferenceEvaluator(model)
    return (lambda feeds: [np.asarray(o) for o in ref.run(None, feeds)]), "onnx.reference"


def _dims(vi: onnx.ValueInfoProto) -> list:
    return [d.dim_value if d.dim_value > 0 else None for d in vi.type.tensor_type.shape.dim]


def _sample(vi: onnx.ValueInfoProto, n: int, rng: np.random.Generator, image: bool) -> np.ndarray:
    """Random data for one input: uint8 codes for the image, N(0, 1) floats or zeros (integer inputs) otherwise."""
    dims = _dims(vi)
    if not dims or any(d is None for d in dims[1:]):
        raise FuseError(f"network input '{vi.name}' has symbolic dimensions {dims or '?'}: pass verify data")
    shape = [n] + dims[1:]
    if image:
        return rng.integers(0, 256, size=shape, dtype=np.uint8)
    elem = vi.type.tensor_type.elem_type
    if elem == onnx.TensorProto.FLOAT:
        return rng.standard_normal(shape).astype(np.float32)
    return np.zeros(shape, onnx.helper.tensor_dtype_to_np_dtype(elem))


def load_verify_data(path: str, samples: int | None = None):
    """The arrays of an NPZ: one array (the image input; keys x/images/input/data or the only one) or a dict with one
    array per input name."""
    import zipfile

    try:
        z = np.load(path)
        if isinstance(z, np.ndarray):  # a .npy: the image input's array
            arrays = {"x": z}
        else:
            with z:
                if not z.files:
                    raise DataError(f"{path}: no array in the file")
                arrays = {k: np.asarray(z[k]) for k in z.files}
    except (OSError, ValueError, EOFError, zipfile.BadZipFile) as exc:
        raise DataError(f"{path}: cannot read verify data ({type(exc).__name__}: {exc})") from None
    if len(arrays) > 1 and not any(k in arrays for k in ("x", "images", "input", "data")):
        return {k: v[:samples] if samples else v for k, v in arrays.items()}
    key = next((k for k in ("x", "images", "input", "data") if k in arrays), next(iter(arrays)))
    x = arrays[key]
    return x[:samples] if samples else x


def image_feeds(x: np.ndarray, input_scale: float, fused_input: str, name: str = "image") -> tuple[np.ndarray,
                                                                                                  np.ndarray]:
    """(QAT-model input as float, fused-model input) from codes (uint8) or float data in the input's range. Float
    data beyond the 256 codes of the input scale is an error: clipped, it would compare the two models on different
    images (seen: 0..255 pixels with the default scale 1/255, an agreement of 61 % that looked like a lowering bug)."""
    if x.dtype == np.uint8:
        xf = (x.astype(np.float32) * np.float32(input_scale)).astype(np.float32)
        codes = x
    else:
        xf = x.astype(np.float32)
        raw = np.round(xf / np.float32(input_scale))
        if fused_input == "uint8" and raw.size and (raw.min() < 0 or raw.max() > 255 or not np.isfinite(raw).all()):
            raise DataError(f"verify data for input '{name}' spans [{float(xf.min()):.6g}, {float(xf.max()):.6g}], "
                            f"beyond the 256 codes of input scale {input_scale:.6g} ([0, {255 * input_scale:.6g}]): "
                            f"give the scale of one input step (--input-scale, e.g. 1 for 0..255 pixels) or uint8 codes")
        codes = np.clip(raw, 0, 255).astype(np.uint8)
    return xf, (codes if fused_input == "uint8" else xf)


def build_feeds(qat: onnx.ModelProto, fused: onnx.ModelProto, data, input_scale: float, samples: int,
                seed: int) -> tuple[dict, dict]:
    """Feeds of the QAT model and of the fused model for the same samples. `data`: None (random codes / N(0, 1)), an
    array for the image input, or a dict of arrays by input name (inputs it lacks get random values)."""
    g = QatGraph(qat)
    meta = {p.key: p.value for p in fused.metadata_props}
    image = meta.get("onnxqat.codes_input")  # the input the fused model takes as image codes (lowering.py)
    first = image or next((i.name for i in g.inputs), None)
    given = {k: np.asarray(v) for k, v in data.items()} if isinstance(data, dict) else (
        {} if data is None else {first: np.asarray(data)})
    unknown = sorted(set(given) - {i.name for i in g.inputs})
    if unknown:
        raise DataError(f"verify data: the model has no input named '{unknown[0]}' "
                        f"(inputs: {', '.join(i.name for i in g.inputs)})")
    n = len(next(iter(given.values()))) if given else samples
    rng = np.random.default_rng(seed)
    fused_types = {i.name: i.type.tensor_type.elem_type for i in fused.graph.input}
    qat_feeds, fused_feeds = {}, {}
    for vi in g.inputs:
        x = given.get(vi.name)
        if x is None:
            x = _sample(vi, n, rng, vi.name == image)
        dims = _dims(vi)
        if len(x) != n or (dims and (x.ndim != len(dims) or any(d is not None and d != k
                                                               for d, k in zip(dims[1:], x.shape[1:])))):
            raise DataError(f"verify data: samples of shape {list(x.shape[1:])} ({len(x)} samples), the model input "
                            f"'{vi.name}' takes {[d if d else '?' for d in dims[1:]]} ({n} samples)")
        if vi.name == image:
            fused_input = "uint8" if fused_types.get(vi.name) == onnx.TensorProto.UINT8 else "float"
            qat_feeds[vi.name], fused_feeds[vi.name] = image_feeds(x, input_scale, fused_input, vi.name)
        else:
            elem = vi.type.tensor_type.elem_type
            qat_feeds[vi.name] = fused_feeds[vi.name] = x.astype(onnx.helper.tensor_dtype_to_np_dtype(elem))
    return qat_feeds, fused_feeds


def _run_chunked(run: Callable[[dict], list], feeds: dict, step: int) -> list[np.ndarray]:
    n = len(next(iter(feeds.values())))
    parts = [run({k: v[i:i + step] for k, v in feeds.items()}) for i in range(0, n, step)]
    return [np.concatenate([np.asarray(p[j]) for p in parts]) for j in range(len(parts[0]))]


def compare(fq: list[np.ndarray], fused: list[np.ndarray], outputs: list[OutputInfo], engine: str) -> Agreement:
    max_diff, agree, total = 0.0, 0, 0
    for a, b, info in zip(fq, fused, outputs):
        a = np.asarray(a, np.float64)
        b = np.asarray(b, np.float64)
        if a.shape != b.shape:
            raise FuseError(f"output '{info.name}': fake-quantized shape {a.shape} vs fused {b.shape}")
        shape = [1] * a.ndim
        if info.scale.size > 1:
            shape[info.axis] = info.scale.size
        s = info.scale.reshape(shape)
        if np.all(info.scale == 0) or info.accumulator:
            # a float output with no code grid (a float island's, a float tail's), or one on an accumulator's grid
            # finer than float32 at its magnitude: equal when within 2^-16 of the output's range (float32 rounding of
            # two summation orders apart, not a moved code upstream), or within one accumulator step
            if info.accumulator and info.dtype != onnx.TensorProto.FLOAT:
                b = b * s
            unit = np.maximum(max(float(np.max(np.abs(a))) if a.size else 0.0, 1e-12) * 2.0 ** -16, s)
            d = np.maximum(np.ceil(np.abs(a - b) / unit) - 1, 0)  # units beyond the tolerance
        else:
            ca, cb = (np.round(a / s), np.round(b / s)) if info.dtype == onnx.TensorProto.FLOAT else (np.round(a / s), b)
            d = np.abs(ca - cb)
        max_diff = max(max_diff, float(d.max()) if d.size else 0.0)
        agree += int(np.sum(d == 0))
        total += d.size
    a0, b0 = np.asarray(fq[0]), np.asarray(fused[0])
    if a0.ndim >= 2:
        top1 = float(np.mean(np.argmax(a0.reshape(len(a0), -1), 1) == np.argmax(b0.reshape(len(b0), -1), 1)))
    else:
        top1 = 1.0
    return Agreement(len(a0), max_diff, agree / max(total, 1), top1, engine)


def _with_outputs(model: onnx.ModelProto, names: list[tuple[str, int]]) -> onnx.ModelProto:
    m = onnx.ModelProto()
    m.CopyFrom(model)
    have = {o.name for o in m.graph.output}
    for n, dtype in names:
        if n not in have:
            m.graph.output.append(onnx.helper.make_tensor_value_info(n, dtype, None))
    return m


def verify(qat: onnx.ModelProto, fused: onnx.ModelProto, outputs: list[OutputInfo], *, input_scale: float,
           data=None, samples: int = 64, seed: int = 0, activation_codes: dict | None = None,
           engine: str = "onnxruntime") -> Agreement:
    """Outputs (and, given activation_codes from the lowering, every activation quantizer's codes) of both models."""
    qat_feeds, fused_feeds = build_feeds(qat, fused, data, input_scale, samples, seed)
    n = len(next(iter(qat_feeds.values())))
    acts = dict(activation_codes or {})
    n_out = len(qat.graph.output)
    qat_probe = _with_outputs(qat, [(k, onnx.TensorProto.FLOAT) for k in acts])
    fused_probe = _with_outputs(fused, [(v[0], v[2]) for v in acts.values()])
    batch = {d[0] for d in (_dims(vi) for vi in QatGraph(qat).inputs) if d and d[0]}
    step = batch.pop() if len(batch) == 1 else n  # a model with a fixed batch size runs chunk by chunk
    if n % step:
        raise FuseError(f"verify data: {n} samples is not a multiple of the model's batch size {step}")
    fq = _run_chunked(fake_quant_runner(qat_probe, engine), qat_feeds, step)
    run_fused, fused_engine = fused_runner(fused_probe)
    out = _run_chunked(run_fused, fused_feeds, step)
    agreement = compare(fq[:n_out], out[:n_out], outputs, fused_engine)
    agreement.fake_quant_engine = "onnxruntime + op library" if engine == "onnxruntime" else "onnx.reference"
    agreement.activations = {}
    forced = {}
    for k, (name, (_, scale, _dtype, zp)) in enumerate(acts.items()):
        want = np.round(np.asarray(fq[n_out + k], np.float64) / np.float32(scale))
        got = np.asarray(out[n_out + k]).astype(np.float64) - zp
        if got.shape == want.shape:
            agreement.activations[name] = float(np.mean(want == got))
            forced[name] = (got * np.float32(scale)).astype(np.float32)
    if forced:
        _layer_by_layer(agreement, qat, engine, qat_feeds, forced, out[:n_out], outputs, step,
                        {k: np.float32(v[1]) for k, v in acts.items()})
    return agreement


def _layer_by_layer(agreement: Agreement, qat: onnx.ModelProto, engine: str, feeds: dict, forced: dict,
                    fused_out: list, outputs: list[OutputInfo], step: int, scales: dict) -> None:
    """The fake-quantized model with every activation quantizer's output cut into a graph input fed the fused model's
    codes (as values); each quantizer still runs on its own layer's input, so its codes and the model's outputs
    compare with the fused model's one layer at a time."""
    m = onnx.ModelProto()
    m.CopyFrom(qat)
    g = m.graph
    outs = {o.name for o in g.output}
    cut = {k for k in forced if k not in outs}
    for node in g.node:
        for i, o in enumerate(node.output):
            if o in cut:
                node.output[i] = o + "__layer"
    keep = [vi for vi in g.value_info if vi.name not in cut]
    del g.value_info[:]
    g.value_info.extend(keep)
    n_out = len(g.output)
    for k in sorted(cut):
        g.input.append(onnx.helper.make_tensor_value_info(k, onnx.TensorProto.FLOAT, None))
        g.output.append(onnx.helper.make_tensor_value_info(k + "__layer", onnx.TensorProto.FLOAT, None))
    res = _run_chunked(fake_quant_runner(m, engine), {**feeds, **{k: forced[k] for k in cut}}, step)
    local = compare(res[:n_out], fused_out, outputs, agreement.fused_engine)
    agreement.local_code_agreement = local.code_agreement
    agreement.local_activations = {}
    for j, k in enumerate(sorted(cut)):
        want = np.round(np.asarray(res[n_out + j], np.float64) / scales[k])
        agreement.local_activations[k] = float(np.mean(want == np.round(np.asarray(forced[k], np.float64) / scales[k])))


def fake_quant_agreement(a: onnx.ModelProto, b: onnx.ModelProto, outputs: list[OutputInfo], *, input_scale: float,
                         data=None, samples: int = 64, seed: int = 0, engine: str = "onnxruntime") -> Agreement:
    """Two fake-quantized models on the same batch (the trained one and its bias-snapped copy), compared like the
    self-check compares the fused model: in output code units."""
    feeds, _ = build_feeds(a, a, data, input_scale, samples, seed)
    n = len(next(iter(feeds.values())))
    batch = {d[0] for d in (_dims(vi) for vi in QatGraph(a).inputs) if d and d[0]}
    step = batch.pop() if len(batch) == 1 else n
    out_a = _run_chunked(fake_quant_runner(a, engine), feeds, step)
    out_b = _run_chunked(fake_quant_runner(b, engine), feeds, step)
    return compare(out_a, out_b, outputs, "fake-quant")


def accuracy_check(qat, fused, images: np.ndarray, labels: np.ndarray, *, input_scale: float = 1 / 255,
                   batch: int = 500, engine: str = "onnxruntime") -> dict:
    """Top-1 of the fake-quantized model and of the fused model on a labelled set (the trained-LeNet check).

    qat / fused: ModelProto or path; images: uint8 codes or float in [0, 1] shaped like the input; labels: int.
    engine: runs the fake-quantized model: "onnxruntime" (with the op library, seconds) or "reference"
    (onnx.reference; ~2 min for LeNet on 10k images on one core). The fused model runs on this environment's
    onnxruntime. Returns {"top1_fake_quant", "top1_fused", "diff_points", "top1_agreement"} in percent / fraction.
    """
    qat = onnx.load(qat) if isinstance(qat, str) else qat
    fused = onnx.load(fused) if isinstance(fused, str) else fused
    run_fq = fake_quant_runner(qat, engine)
    run_fused, _ = fused_runner(fused)
    pf, pq = [], []
    for i in range(0, len(images), batch):
        qf, ff = build_feeds(qat, fused, images[i:i + batch], input_scale, 0, 0)
        pq.append(np.argmax(run_fq(qf)[0], 1))
        pf.append(np.argmax(run_fused(ff)[0], 1))
    pq, pf = np.concatenate(pq), np.concatenate(pf)
    labels = np.asarray(labels).reshape(-1)
    a, b = 100 * float(np.mean(pq == labels)), 100 * float(np.mean(pf == labels))
    return {"top1_fake_quant": a, "top1_fused": b, "diff_points": abs(a - b), "top1_agreement": float(np.mean(pq == pf))}
