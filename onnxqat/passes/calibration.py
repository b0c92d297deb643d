"""Calibration: run a batch through the float model with onnxruntime and collect activation tensors."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import onnx

from onnxqat.errors import DataError


def load_calibration(data, input_names: list[str]) -> dict[str, np.ndarray]:
    """Feeds for the model from an .npz/.npy path or a dict. With one model input, any single array is taken."""
    if isinstance(data, (str, os.PathLike)):
        path = Path(data)
        if not path.is_file():
            raise DataError(f"calibration data not found: {path}")
        try:
            loaded = np.load(path, allow_pickle=False)
            if isinstance(loaded, np.ndarray):  # .npy: one array, for a single-input model
                arrays = {path.stem: loaded}
            else:
                with loaded as npz:
                    arrays = {k: npz[k] for k in npz.files}
        except Exception as exc:
            raise DataError(f"{path}: not a numpy .npz/.npy file ({type(exc).__name__})") from None
        where = str(path)
    else:
        arrays = {k: np.asarray(v) for k, v in dict(data).items()}
        where = "calibration data"
    if len(input_names) == 1 and len(arrays) == 1:
        feeds = {input_names[0]: next(iter(arrays.values()))}
    else:
        missing = [n for n in input_names if n not in arrays]
        if missing:
            raise DataError(f"{where}: no array for model input '{missing[0]}' (arrays: {', '.join(arrays)})")
        feeds = {n: arrays[n] for n in input_names}
    for name, x in feeds.items():  # an empty or NaN batch would give every quantizer a NaN or default value
        if x.ndim == 0 or x.shape[0] == 0:
            raise DataError(f"{where}: the array for input '{name}' holds no sample (shape {list(x.shape)})")
        if x.dtype.kind == "f" and not np.all(np.isfinite(x)):
            bad = int(x.size - np.count_nonzero(np.isfinite(x)))
            raise DataError(f"{where}: the array for input '{name}' holds {bad} NaN/inf value(s)")
    return feeds


def collect(model: onnx.ModelProto, feeds: dict[str, np.ndarray], tensors: list[str]) -> dict[str, np.ndarray]:
    """Values of `tensors` when the float model runs on `feeds` (onnxruntime, CPU)."""
    import onnxruntime as ort

    m = onnx.ModelProto()
    m.CopyFrom(model)
    present = {o.name for o in m.graph.output}
    for t in tensors:
        if t not in present:
            m.graph.output.append(onnx.helper.make_tensor_value_info(t, onnx.TensorProto.FLOAT, None))
    opts = ort.SessionOptions()
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    opts.intra_op_num_threads = 2
    opts.log_severity_level = 3  # errors only: unused-initializer warnings of a stripped model are noise here
    sess = ort.InferenceSession(m.SerializeToString(), opts, providers=["CPUExecutionProvider"])
    types = {i.name: i.type for i in sess.get_inputs()}
    cast = {}
    for k, v in feeds.items():
        dtype = {"tensor(float)": np.float32, "tensor(int64)": np.int64, "tensor(double)": np.float64}.get(types.get(k))
        cast[k] = v.astype(dtype) if dtype is not None else v
    # a model with a fixed batch size runs the calibration batch in chunks of that size
    batch = {i.name: i.shape[0] for i in sess.get_inputs() if i.shape and isinstance(i.shape[0], int)}
    n = min(v.shape[0] for v in cast.values()) if cast and all(v.ndim for v in cast.values()) else 0
    chunk = min(batch.values()) if batch else 0
    if chunk and n > chunk and all(cast[k].shape[0] != b for k, b in batch.items()):
        runs = [{k: v[i : i + chunk] for k, v in cast.items()} for i in range(0, n - chunk + 1, chunk)]
    else:
        runs = [cast]
    try:
        results = [sess.run(tensors, feeds) for feeds in runs]
    except Exception as exc:
        raise DataError(f"calibration run failed: {str(exc).splitlines()[0]}") from None
    out = {t: np.concatenate([r[k] for r in results], axis=0) for k, t in enumerate(tensors)}
    for t, v in out.items():
        if v.dtype.kind == "f" and not np.all(np.isfinite(v)):
            raise DataError(f"calibration: activation '{t}' is NaN/inf on this data (the float model overflows on "
                            "it: check the data's scale)")
    return out


# ------------------------------------------------------------------ initial quantizer values from data
# Shared by insert (calibration data) and train (the first training batches, for quantizers insert left uncalibrated).

def sat_alpha(activation: np.ndarray, percentile: float) -> float | None:
    """SAT (CG-PACT) alpha: that percentile of the activation's values (after its ReLU); None when it is not > 0."""
    a = float(np.percentile(np.asarray(activation, np.float64), percentile)) if np.size(activation) else 0.0
    return a if a > 0 else None


def lsq_step(values: np.ndarray, qp: float) -> float | None:
    """LSQ's initial step 2 <|v|> / sqrt(Qp) (Esser et al.); None when the mean magnitude is 0."""
    m = float(np.mean(np.abs(np.asarray(values, np.float64)))) if np.size(values) else 0.0
    return 2.0 * m / float(np.sqrt(qp)) if m > 0 else None


LSQ_WEIGHT_INITS = ("paper", "max", "mse")


def lsq_weight_steps(w: np.ndarray, qn: float, qp: float, axis: int | None, how: str = "paper") -> np.ndarray:
    """Initial LSQ weight step(s), one per tensor (axis None) or per index of `axis`:
    paper: 2 mean|W| / sqrt(Qp); max: max|W| / Qp (no weight clipped); mse: the step among 100 candidates
    (max|W|/Qp times 0.01 .. 1) that minimises mean((W - s*clip(round(W/s), -Qn, Qp))^2).
    A channel of zeros gets 1e-3 (the ops need a step > 0)."""
    if how not in LSQ_WEIGHT_INITS:
        raise ValueError(f"LSQ weight step init must be one of {', '.join(LSQ_WEIGHT_INITS)}, got {how!r}")
    w = np.asarray(w, np.float64)
    if axis is None:
        groups = w.reshape(1, -1)
    else:
        groups = np.moveaxis(w, axis, 0).reshape(w.shape[axis], -1)
    a = np.abs(groups)
    if how == "paper":
        steps = 2.0 * a.mean(axis=1) / np.sqrt(qp)
    elif how == "max":
        steps = a.max(axis=1) / qp
    else:
        top = a.max(axis=1) / qp
        fracs = np.linspace(0.01, 1.0, 100)
        steps = np.empty(groups.shape[0])
        for k, (g, t) in enumerate(zip(groups, top)):
            if t <= 0:
                steps[k] = 0.0
                continue
            cand = t * fracs
            q = np.clip(np.round(g[None, :] / cand[:, None]), -qn, qp) * cand[:, None]
            steps[k] = cand[int(np.argmin(((q - g[None, :]) ** 2).mean(axis=1)))]
    return np.where(steps > 0, steps, 1e-3).astype(np.float32)
