"""Helpers for the op tests: run one node of our domain through onnxruntime with the compiled library."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper

F32 = np.float32
I64 = np.int64

_SESSIONS: dict = {}


def _so():
    import onnxqat

    so = onnxqat.session_options()
    so.log_severity_level = 4  # errors are asserted through exceptions; keep the log quiet
    return so


def one_node_model(op_type: str, inputs: list[np.ndarray], n_out: int, node_name: str = "n1",
                   out_names: list[str] | None = None) -> onnx.ModelProto:
    from onnxqat.ops.schema import DOMAIN

    names = [f"in{k}" for k in range(len(inputs))]
    outs = out_names if out_names is not None else [f"out{k}" for k in range(n_out)]
    node = helper.make_node(op_type, names, outs, domain=DOMAIN, name=node_name)
    vis = [helper.make_tensor_value_info(n, helper.np_dtype_to_tensor_dtype(a.dtype), None)
           for n, a in zip(names, inputs)]
    ovis = [helper.make_tensor_value_info(o, TensorProto.FLOAT, None) for o in outs if o]
    graph = helper.make_graph([node], "g", vis, ovis)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid(DOMAIN, 1)],
                             ir_version=9)


def run_op(op_type: str, inputs: list, n_out: int = 1, node_name: str = "n1", threads: int = 0,
           out_names: list[str] | None = None) -> list[np.ndarray]:
    """Outputs of one `op_type` node (domain com.onnxqat) on `inputs` (numpy arrays, in schema order)."""
    import onnxruntime as ort

    inputs = [np.asarray(a) for a in inputs]
    key = (op_type, tuple(a.dtype.str for a in inputs), n_out, node_name, threads, tuple(out_names or ()))
    sess = _SESSIONS.get(key)
    if sess is None:
        so = _so()
        so.intra_op_num_threads = threads
        model = one_node_model(op_type, inputs, n_out, node_name, out_names)
        sess = ort.InferenceSession(model.SerializeToString(), so, providers=["CPUExecutionProvider"])
        _SESSIONS[key] = sess
    feeds = {f"in{k}": a for k, a in enumerate(inputs)}
    return sess.run(None, feeds)


def assert_sum_close(got, want, abs_terms_sum, what=""):
    """A float32 value that numpy and the kernel both get as float32(double sum): equal up to 1 float32 ulp
    (the double sums differ in order) plus 1e-12 of the sum of |terms| (cancellation)."""
    got = np.asarray(got, dtype=np.float64)
    want = np.asarray(want, dtype=np.float64)
    tol = np.abs(want) * 2.0**-23 + 1e-12 * np.asarray(abs_terms_sum, dtype=np.float64) + 1e-30
    bad = np.abs(got - want) > tol
    assert not bad.any(), f"{what}: got {got[bad]}, want {want[bad]} (tol {tol[bad]})"


@pytest.fixture(scope="session", autouse=True)
def _library_present():
    from onnxqat.errors import OpLibraryError
    from onnxqat.ops.library import library_path

    try:
        library_path()
    except OpLibraryError as e:
        pytest.fail(str(e))
