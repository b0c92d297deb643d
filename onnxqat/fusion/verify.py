"""Self-check of a fused model: the fake-quantized (QAT) model and the fused model on the same batch.

The QAT model runs on onnx.reference with the numpy quantizer references (`reference_ops()`): the executable form of
the quantizer math, independent of the compiled op library. The fused model runs on this environment's onnxruntime
where its kernels cover the graph, else on onnx.reference.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import onnx

from onnxqat.errors import DataError, FuseError
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
        return s


def fake_quant_runner(model: onnx.ModelProto, engine: str = "reference") -> Callable[[np.ndarray], list[np.ndarray]]:
    """x -> outputs of the QAT model. engine "reference": onnx.reference + the numpy quantizer references (the
    executable spec); "onnxruntime": onnxruntime with the compiled op library (fast, for large models).
    The session is built once: verify and accuracy_check run it on chunk after chunk."""
    name = [i.name for i in model.graph.input if i.name not in {t.name for t in model.graph.initializer}][0]
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
    return lambda x: [np.asarray(o) for o in sess.run(None, {name: x})]


def fused_runner(model: onnx.ModelProto, threads: int = 1) -> tuple[Callable[[np.ndarray], list[np.ndarray]], str]:
    """(x -> outputs of the fused model, engine name): onnxruntime, or onnx.reference where the installed
    runtime has no kernel for an op (e.g. 1.19.2's coverage; ORT reports that when it builds the session)."""
    name = model.graph.input[0].name
    try:
        import onnxruntime as ort

        so = ort.SessionOptions()
        so.intra_op_num_threads = threads
        so.inter_op_num_threads = 1
        so.log_severity_level = 3
        sess = ort.InferenceSession(model.SerializeToString(), so, providers=["CPUExecutionProvider"])
        return (lambda x: sess.run(None, {name: x})), f"onnxruntime {ort.__version__}"
    except Exception as exc:
        if "NOT_IMPLEMENTED" not in str(exc) and "not implemented" not in str(exc).lower():
            raise
    from onnx.reference import ReferenceEvaluator

    ref = ReferenceEvaluator(model)
    return (lambda x: [np.asarray(o) for o in ref.run(None, {name: x})]), "onnx.reference"


def _input_info(model: onnx.ModelProto):
    inits = {t.name for t in model.graph.initializer}
    inp = [i for i in model.graph.input if i.name not in inits][0]
    dims = [d.dim_value if d.dim_value > 0 else None for d in inp.type.tensor_type.shape.dim]
    return inp.name, dims


def random_codes(qat: onnx.ModelProto, samples: int, seed: int = 0) -> np.ndarray:
    """uint8 image codes shaped like the network input (batch = samples)."""
    name, dims = _input_info(qat)
    if not dims:
        raise FuseError(f"network input '{name}' has no shape: pass verify data")
    if any(d is None for d in dims[1:]):
        raise FuseError(f"network input '{name}' has symbolic dimensions {dims}: pass verify data")
    rng = np.random.default_rng(seed)
    return rng.integers(0, 256, size=[samples] + dims[1:], dtype=np.uint8)


def load_verify_data(path: str, samples: int | None = None) -> np.ndarray:
    try:
        with np.load(path) as z:
            key = next((k for k in ("x", "images", "input", "data") if k in z.files), z.files[0] if z.files else None)
            if key is None:
                raise DataError(f"{path}: no array in the file")
            x = np.asarray(z[key])
    except (OSError, ValueError) as exc:
        raise DataError(f"{path}: cannot read verify data ({exc})") from exc
    return x[:samples] if samples else x


def inputs_for(x: np.ndarray, input_scale: float, fused_input: str) -> tuple[np.ndarray, np.ndarray]:
    """(QAT-model input as float, fused-model input) from codes (uint8) or float data in the input's range."""
    if x.dtype == np.uint8:
        xf = (x.astype(np.float32) * np.float32(input_scale)).astype(np.float32)
        codes = x
    else:
        xf = x.astype(np.float32)
        codes = np.clip(np.round(xf / np.float32(input_scale)), 0, 255).astype(np.uint8)
    return xf, (codes if fused_input == "uint8" else xf)


def compare(fq: list[np.ndarray], fused: list[np.ndarray], outputs: list[OutputInfo], engine: str) -> Agreement:
    max_diff, agree, total = 0.0, 0, 0
    for a, b, info in zip(fq, fused, outputs):
        a = np.asarray(a, np.float64)
        b = np.asarray(b, np.float64)
        if a.shape != b.shape:
            raise FuseError(f"output '{info.name}': fake-quantized shape {a.shape} vs fused {b.shape}")
        if np.all(info.scale == 0):  # float output (QDQ logits): compare in units of 1e-6 relative to the range
            unit = max(np.max(np.abs(a)), 1e-12) * 1e-6
            ca, cb = np.round(a / unit), np.round(b / unit)
        else:
            shape = [1] * a.ndim
            if info.scale.size > 1:
                shape[info.axis] = info.scale.size
            s = info.scale.reshape(shape)
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
           fused_input: str, data: np.ndarray | None = None, samples: int = 64, seed: int = 0,
           activation_codes: dict | None = None, engine: str = "reference") -> Agreement:
    """Outputs (and, given activation_codes from the lowering, every activation quantizer's codes) of both models."""
    x = data if data is not None else random_codes(qat, samples, seed)
    xf, xin = inputs_for(x, input_scale, fused_input)
    acts = dict(activation_codes or {})
    n_out = len(qat.graph.output)
    qat_probe = _with_outputs(qat, [(k, onnx.TensorProto.FLOAT) for k in acts])
    fused_probe = _with_outputs(fused, [(v[0], v[2]) for v in acts.values()])
    input_name, fixed = _input_info(qat)
    if fixed and (x.ndim != len(fixed) or any(d is not None and d != n for d, n in zip(fixed[1:], x.shape[1:]))):
        raise DataError(f"verify data: samples of shape {list(x.shape[1:])}, the model input '{input_name}' takes "
                        f"{[d if d else '?' for d in fixed[1:]]}")
    step = fixed[0] if fixed and fixed[0] else len(xf)  # a model with a fixed batch size runs chunk by chunk
    if len(xf) % step:
        raise FuseError(f"verify data: {len(xf)} samples is not a multiple of the model's batch size {step}")
    run_fq = fake_quant_runner(qat_probe, engine)
    run_fused, fused_engine = fused_runner(fused_probe)
    fq_parts = [run_fq(xf[i:i + step]) for i in range(0, len(xf), step)]
    out_parts = [run_fused(xin[i:i + step]) for i in range(0, len(xf), step)]
    fq = [np.concatenate([p[j] for p in fq_parts]) for j in range(len(fq_parts[0]))]
    out = [np.concatenate([p[j] for p in out_parts]) for j in range(len(out_parts[0]))]
    agreement = compare(fq[:n_out], out[:n_out], outputs, fused_engine)
    agreement.fake_quant_engine = "onnxruntime + op library" if engine == "onnxruntime" else "onnx.reference"
    agreement.activations = {}
    for k, (name, (_, scale, _dtype, zp)) in enumerate(acts.items()):
        want = np.round(np.asarray(fq[n_out + k], np.float64) / np.float32(scale))
        got = np.asarray(out[n_out + k]).astype(np.float64) - zp
        if got.shape == want.shape:
            agreement.activations[name] = float(np.mean(want == got))
    return agreement


def accuracy_check(qat, fused, images: np.ndarray, labels: np.ndarray, *, input_scale: float = 1 / 255,
                   batch: int = 500, engine: str = "reference") -> dict:
    """Top-1 of the fake-quantized model and of the fused model on a labelled set (the trained-LeNet check).

    qat / fused: ModelProto or path; images: uint8 codes or float in [0, 1] shaped like the input; labels: int.
    engine: runs the fake-quantized model: "reference" (onnx.reference; ~2 min for LeNet on 10k images on one core)
    or "onnxruntime" (with the op library, seconds). The fused model runs on this environment's onnxruntime.
    Returns {"top1_fake_quant", "top1_fused", "diff_points", "top1_agreement"} in percent / fraction.
    """
    qat = onnx.load(qat) if isinstance(qat, str) else qat
    fused = onnx.load(fused) if isinstance(fused, str) else fused
    fused_input = "uint8" if fused.graph.input[0].type.tensor_type.elem_type == onnx.TensorProto.UINT8 else "float"
    run_fq = fake_quant_runner(qat, engine)
    run_fused, _ = fused_runner(fused)
    pf, pq = [], []
    for i in range(0, len(images), batch):
        xf, xin = inputs_for(images[i:i + batch], input_scale, fused_input)
        pq.append(np.argmax(run_fq(xf)[0], 1))
        pf.append(np.argmax(run_fused(xin)[0], 1))
    pq, pf = np.concatenate(pq), np.concatenate(pf)
    labels = np.asarray(labels).reshape(-1)
    a, b = 100 * float(np.mean(pq == labels)), 100 * float(np.mean(pf == labels))
    return {"top1_fake_quant": a, "top1_fused": b, "diff_points": abs(a - b), "top1_agreement": float(np.mean(pq == pf))}
