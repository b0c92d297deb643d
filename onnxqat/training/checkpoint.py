"""Training checkpoints: one .npz per checkpoint, written atomically (onnxqat.files).

A checkpoint holds every ORT parameter (trainable ones and BN running statistics) under `param/<name>`, the solver
state, and a JSON `meta` (epoch finished, update count, metric history, best metric, the run's configuration).
A kill at any moment leaves either the previous file or the new one, never a partial one.
"""

from __future__ import annotations

import io
import json
import os
from pathlib import Path

import numpy as np

from onnxqat.errors import TrainingError
from onnxqat.files import atomic_write_bytes


def save_checkpoint(path: str | os.PathLike, params: dict[str, np.ndarray], solver_state: dict[str, np.ndarray],
                    meta: dict) -> None:
    arrays = {f"param/{k}": np.asarray(v) for k, v in params.items()}
    arrays.update(solver_state)
    arrays["meta"] = np.frombuffer(json.dumps(meta).encode(), dtype=np.uint8)
    buf = io.BytesIO()
    np.savez(buf, **arrays)
    atomic_write_bytes(path, buf.getvalue())


def load_checkpoint(path: str | os.PathLike) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray], dict]:
    path = Path(path)
    if not path.is_file():
        raise TrainingError(f"checkpoint not found: {path}")
    try:
        with np.load(path, allow_pickle=False) as z:
            arrays = {k: z[k] for k in z.files}
        meta = json.loads(arrays.pop("meta").tobytes().decode())
    except Exception as exc:
        raise TrainingError(f"{path}: unreadable checkpoint ({exc.__class__.__name__}: {exc})") from None
    params = {k[len("param/"):]: v for k, v in arrays.items() if k.startswith("param/")}
    solver = {k: v for k, v in arrays.items() if k.startswith("solver.")}
    return params, solver, meta
