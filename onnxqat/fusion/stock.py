"""Run a model on the latest stock `onnxruntime` in the second virtual environment (.venv-stock).

onnxruntime-training-cpu ships its own `onnxruntime` module, so the stock package lives in its own environment
(scripts/make_stock_env.sh creates it). Models and inputs go through files; the child prints nothing but errors.
"""

from __future__ import annotations

import os
import subprocess
import tempfile
from pathlib import Path

import numpy as np

from onnxqat.errors import OnnxqatError

REPO = Path(__file__).resolve().parents[2]
STOCK_ENV = Path(os.environ.get("ONNXQAT_STOCK_ENV", REPO / ".venv-stock"))

_CHILD = r"""
import sys, json, numpy as np, onnxruntime as ort
model, data, out, threads, optimize = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4]), sys.argv[5] == "1"
so = ort.SessionOptions(); so.intra_op_num_threads = threads; so.inter_op_num_threads = 1; so.log_severity_level = 3
if not optimize:
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
s = ort.InferenceSession(model, so, providers=["CPUExecutionProvider"])
with np.load(data) as z:
    feeds = {k: z[k] for k in z.files}
res = s.run(None, feeds)
np.savez(out, **{f"out{i}": r for i, r in enumerate(res)}, version=np.array(ort.__version__))
"""


def stock_python(create: bool = True) -> Path | None:
    py = STOCK_ENV / "bin" / "python"
    if py.exists():
        return py
    if not create:
        return None
    script = REPO / "scripts" / "make_stock_env.sh"
    r = subprocess.run(["bash", str(script), str(STOCK_ENV)], capture_output=True, text=True)
    if r.returncode != 0 or not py.exists():
        raise OnnxqatError(f"cannot create the stock onnxruntime env {STOCK_ENV}: {r.stderr.strip().splitlines()[-1:]}")
    return py


def run_stock(model_path: str | os.PathLike, feeds: dict[str, np.ndarray], threads: int = 1,
              optimize: bool = True) -> tuple[list[np.ndarray], str]:
    """Outputs of the model on stock onnxruntime, and that onnxruntime's version (optimize=False: no graph rewrites)."""
    py = stock_python()
    with tempfile.TemporaryDirectory(prefix="onnxqat-stock-") as d:
        data, out = os.path.join(d, "in.npz"), os.path.join(d, "out.npz")
        np.savez(data, **feeds)
        r = subprocess.run([str(py), "-c", _CHILD, os.fspath(model_path), data, out, str(threads),
                            "1" if optimize else "0"],
                           capture_output=True, text=True)
        if r.returncode != 0:
            raise OnnxqatError(f"stock onnxruntime failed on {model_path}: {r.stderr.strip().splitlines()[-1]}")
        with np.load(out) as z:
            n = len([k for k in z.files if k.startswith("out")])
            return [z[f"out{i}"] for i in range(n)], str(z["version"])
