"""onnxqat.library_path() / session_options() and the gradient registration."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

import onnxqat
from onnxqat.errors import OpLibraryError
from onnxqat.ops import library


def test_library_path_is_a_loadable_file():
    p = Path(onnxqat.library_path())
    assert p.is_file() and p.name == library.LIBRARY_NAME
    so = onnxqat.session_options()
    import onnxruntime as ort

    assert isinstance(so, ort.SessionOptions)


def test_only_register_custom_ops_is_exported():
    out = subprocess.run(["nm", "-D", "--defined-only", onnxqat.library_path()], capture_output=True, text=True)
    if out.returncode != 0:
        pytest.skip("nm not available")
    symbols = [line.split()[-1] for line in out.stdout.splitlines() if line.strip()]
    assert symbols == ["RegisterCustomOps"]


def test_env_var_wins(monkeypatch, tmp_path):
    real = onnxqat.library_path()
    copy = tmp_path / "libcopy.so"
    copy.write_bytes(Path(real).read_bytes())
    monkeypatch.setenv(library.ENV_VAR, str(copy))
    assert onnxqat.library_path() == str(copy.resolve())
    monkeypatch.setenv(library.ENV_VAR, str(tmp_path / "missing.so"))
    with pytest.raises(OpLibraryError, match="ONNXQAT_OPS_LIBRARY"):
        onnxqat.library_path()


def test_missing_library_names_the_fix(monkeypatch):
    monkeypatch.delenv(library.ENV_VAR, raising=False)
    monkeypatch.setattr(library, "candidate_paths", lambda: [Path("/nonexistent/libonnxqat_ops.so")])
    with pytest.raises(OpLibraryError, match="pip install ."):
        onnxqat.library_path()


def test_unloadable_library_is_an_op_library_error(monkeypatch, tmp_path):
    bad = tmp_path / "libonnxqat_ops.so"
    bad.write_bytes(b"not a shared object")
    monkeypatch.setenv(library.ENV_VAR, str(bad))
    with pytest.raises(OpLibraryError, match="cannot load"):
        onnxqat.session_options()


def test_session_options_adds_to_given_options():
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.intra_op_num_threads = 1
    assert onnxqat.session_options(so) is so


def test_gradient_definitions_follow_schema():
    from onnxqat.ops.gradients import gradient_definition
    from onnxqat.ops.schema import ALL_OPS, DOMAIN

    for op in ALL_OPS:
        key, (node,) = gradient_definition(op)
        assert key == f"{DOMAIN}::{op.name}"
        assert node.op_type == op.grad_name and node.domain == DOMAIN
        assert list(node.inputs) == (["GO(0)"] + [f"I({i})" for i in range(len(op.inputs))]
                                     + [f"O({k})" for k in op.grad_uses_outputs])
        assert list(node.outputs) == [f"GI({i})" for i in op.grad_of]


def test_register_gradients_idempotent_in_fresh_process():
    code = ("from onnxqat.ops.gradients import register_gradients as r; r(); r(); "
            "import onnxqat.ops.gradients as g; print(g._registered)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         cwd=Path(__file__).resolve().parents[2])
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "True"


def test_reference_evaluator_runs_our_ops():
    # onnx.reference with reference_ops() and ORT with the library agree on a small graph
    from onnx.reference import ReferenceEvaluator

    from conftest import one_node_model, run_op
    from onnxqat.ops.reference import reference_ops

    x = np.linspace(-2, 3, 40, dtype=np.float32).reshape(5, 8)
    inputs = [x, np.array([1.5], np.float32), np.array(7, np.float32)]
    model = one_node_model("SatActQuant", inputs, 1)
    (want,) = ReferenceEvaluator(model, new_ops=reference_ops()).run(None, {f"in{k}": a for k, a in enumerate(inputs)})
    np.testing.assert_array_equal(run_op("SatActQuant", inputs)[0], want)


def test_add_gradient_outputs():
    from onnx import TensorProto, helper, numpy_helper

    from onnxqat.ops.gradients import add_gradient_outputs
    from onnxqat.ops.schema import DOMAIN

    w = numpy_helper.from_array(np.ones((4, 3), np.float32), "W")
    nodes = [helper.make_node("SatWeightQuant", ["W", "r", "m", "f"], ["W_q"], domain=DOMAIN, name="q"),
             helper.make_node("LsqQuant", ["x", "s", "r", "sg", "g", "ax"], ["x_q"], domain=DOMAIN, name="l")]
    g = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2])],
                          [helper.make_tensor_value_info("x_q", TensorProto.FLOAT, [2])], [w])
    m = add_gradient_outputs(helper.make_model(g))
    assert list(m.graph.node[0].output) == ["W_q", "W_q_dWq_dW"]
    assert list(m.graph.node[1].output) == ["x_q"]  # LSQ's gradient reads no forward output
    (vi,) = [v for v in m.graph.value_info if v.name == "W_q_dWq_dW"]
    assert [d.dim_value for d in vi.type.tensor_type.shape.dim] == [4, 3]
    add_gradient_outputs(m)  # idempotent
    assert list(m.graph.node[0].output) == ["W_q", "W_q_dWq_dW"] and len(m.graph.value_info) == 1
