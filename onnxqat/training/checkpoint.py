"""Training checkpoints: one .npz per checkpoint, written atomically (temp file in the same folder, fsync, rename).

A checkpoint holds every ORT parameter (trainable ones and BN running statistics) under `param/<name>`, the solver
state, and a JSON `meta` (epoch finished, update count, metric history, best metric, the run's configuration).
A kill at any moment leaves either the previous file or the new one, never a partial one.
"""

from __future__ import annotations

import io
import json
import os
import tempfile
from pathlib import Path

import numpy as np

from onnxqat.errors import TrainingError


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise
    try:
        dfd = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(dfd)
        finally:
            os.close(dfd)
    except OSError:
        pass


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    atomic_write_bytes(path, text.encode())


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
