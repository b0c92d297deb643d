"""Shape inference of the ops (InferOutputShapeFn): an output has its source input's shape when that is known,
and stays unknown otherwise (an input without shape information must not be taken for a scalar).

Observed through ORT's constant folding: Shape(<our output>) folds into a constant exactly when ORT knows that
output's full static shape; the folded value must be the input's shape.
"""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

import onnxqat
from onnxqat.ops.schema import DOMAIN

F32, I64 = np.float32, np.int64


def _shape_seen(tmp_path, op, x_shape, consts, out_index=0, n_out=1, extra_inputs=()):
    """The static shape ORT infers for output `out_index` of our node, or None when it does not know it."""
    inits = [numpy_helper.from_array(np.asarray(v), k) for k, v in consts.items()]
    outs = [f"o{k}" for k in range(n_out)]
    nodes = [helper.make_node(op, ["x", *extra_inputs, *consts], outs, domain=DOMAIN, name="q"),
             helper.make_node("Shape", [outs[out_index]], ["s"], name="shape")]
    graph_inputs = [helper.make_tensor_value_info(n, TensorProto.FLOAT, x_shape) for n in ("x", *extra_inputs)]
    graph = helper.make_graph(nodes, "g", graph_inputs, [helper.make_tensor_value_info("s", TensorProto.INT64, None)]
                              + [helper.make_tensor_value_info(o, TensorProto.FLOAT, None) for o in outs], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid(DOMAIN, 1)],
                              ir_version=9)
    so = onnxqat.session_options()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_BASIC
    path = tmp_path / "opt.onnx"
    so.optimized_model_filepath = str(path)
    ort.InferenceSession(model.SerializeToString(), so, providers=["CPUExecutionProvider"])
    saved = onnx.load(str(path))
    if any(n.op_type == "Shape" for n in saved.graph.node):
        return None
    folded = {i.name: numpy_helper.to_array(i) for i in saved.graph.initializer}
    producer = {o: n for n in saved.graph.node for o in n.output}
    name = "s"
    while name not in folded:  # an Identity may stand between the folded constant and the output
        name = producer[name].input[0]
    return folded[name].tolist()


SAT_W = {"r": np.array(15, F32), "m": np.array(1, I64), "f": np.array(0, I64)}
SAT_A = {"alpha": np.array([2.0], F32), "r": np.array(15, F32)}
LSQ = {"step": np.array([0.1, 0.2, 0.3], F32), "range": np.array(15, F32), "signed": np.array(1, I64),
       "g": np.array(0.1, F32), "axis": np.array(1, I64)}


@pytest.mark.parametrize("op,consts", [("SatWeightQuant", SAT_W), ("SatActQuant", SAT_A), ("LsqQuant", LSQ)])
def test_forward_output_has_input_shape(tmp_path, op, consts):
    assert _shape_seen(tmp_path, op, [4, 3], consts) == [4, 3]
    assert _shape_seen(tmp_path, op, [2, 5, 3], consts if op != "LsqQuant" else {**LSQ, "axis": np.array(2, I64)}) \
        == [2, 5, 3]
    assert _shape_seen(tmp_path, op, None, consts) is None  # unknown stays unknown (not a scalar)
    assert _shape_seen(tmp_path, op, ["N", 3], consts) is None  # symbolic: not static, nothing to fold


@pytest.mark.parametrize("op,consts,n_out", [("SatWeightQuantGrad", SAT_W, 1), ("SatActQuantGrad", SAT_A, 2),
                                             ("LsqQuantGrad", LSQ, 2)])
def test_gradient_outputs_have_forward_input_shapes(tmp_path, op, consts, n_out):
    # inputs: dy (graph input "x"), v (graph input), then the constants; GI(0) like v, GI(1) like input 1
    assert _shape_seen(tmp_path, op, [4, 3], consts, 0, n_out, extra_inputs=("v",)) == [4, 3]
    if n_out == 2:
        second = list(next(iter(consts.values())).shape)
        want = second if second else None  # rank 0 is never claimed
        assert _shape_seen(tmp_path, op, [4, 3], consts, 1, n_out, extra_inputs=("v",)) == want
