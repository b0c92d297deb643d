"""graph.check_tensor_sizes: no false alarm on the tensor encodings onnx writes (raw, typed fields, packed int4,
strings, float16 in int32_data, Constant values), and an alarm for each kind of short data."""

import numpy as np
import onnx
import pytest
from onnx import helper, numpy_helper

from onnxqat.errors import ModelError
from onnxqat.graph import check_tensor_sizes


def _model(tensors, constants=()):
    nodes = [helper.make_node("Constant", [], [f"c{k}"], value=t) for k, t in enumerate(constants)]
    return helper.make_model(helper.make_graph(nodes, "g", [], [], list(tensors)))


def test_every_encoding_passes():
    tensors = [
        numpy_helper.from_array(np.ones((2, 3), np.float32), "raw_f32"),
        numpy_helper.from_array(np.ones((4,), bool), "raw_bool"),
        numpy_helper.from_array(np.ones((3,), np.float16), "raw_f16"),
        numpy_helper.from_array(np.zeros((0, 5), np.float32), "empty"),
        helper.make_tensor("typed_f32", onnx.TensorProto.FLOAT, [2, 2], [1.0, 2.0, 3.0, 4.0]),
        helper.make_tensor("typed_i8", onnx.TensorProto.INT8, [3], [1, 2, 3]),
        helper.make_tensor("typed_f16", onnx.TensorProto.FLOAT16, [2], np.array([1, 2], np.float16)),
        helper.make_tensor("typed_i64", onnx.TensorProto.INT64, [], [7]),
        helper.make_tensor("str", onnx.TensorProto.STRING, [2], [b"a", b"b"]),
        helper.make_tensor("int4", onnx.TensorProto.INT4, [5], [1, -2, 3, 4, -5]),
    ]
    check_tensor_sizes(_model(tensors, [numpy_helper.from_array(np.ones(3, np.float32))]))


@pytest.mark.parametrize("case", ["raw short", "typed short", "constant short", "negative dim"])
def test_short_or_bad_data_is_named(case):
    t = numpy_helper.from_array(np.ones((2, 3), np.float32), "w")
    if case == "raw short":
        t.raw_data = t.raw_data[:8]
    elif case == "typed short":
        t = helper.make_tensor("w", onnx.TensorProto.FLOAT, [4], [1.0, 2.0, 3.0, 4.0])
        t.dims[0] = 6
    elif case == "negative dim":
        t.dims[0] = -2
    tensors, constants = ([], [t]) if case == "constant short" else ([t], [])
    if case == "constant short":
        t.raw_data = t.raw_data[:4]
    with pytest.raises(ModelError, match="tensor 'w' (claims shape|has a negative dimension)"):
        check_tensor_sizes(_model(tensors, constants))
