"""Resize for training: onnxruntime-training 1.19.2 builds a ResizeGrad node but has no CPU kernel for it, so a
training session with a Resize on a gradient path cannot start.

With static shapes, Resize is separable: along each axis whose size changes, output = A @ input with a constant matrix
A (out x in). A is measured, not derived: the same Resize node (same attributes) runs in onnxruntime on a probe
holding one unit impulse per batch entry along that axis, so every mode, coordinate transformation, rounding rule and
cubic coefficient is exactly onnxruntime's. Nearest modes give one 1 per row: the axis becomes a Gather with constant
indices; linear and cubic become a MatMul. Both have gradients in ORT.

Needs: the input's and output's shapes known (onnx shape inference, sizes or scales constant or computable), the batch
and channel dims unchanged, no tf_crop_and_resize.
"""

from __future__ import annotations

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from onnxqat.errors import TrainingError


def _attr(node, name, default):
    for a in node.attribute:
        if a.name == name:
            v = helper.get_attribute_value(a)
            return v.decode() if isinstance(v, bytes) else v
    return default


def axis_matrix(node: onnx.NodeProto, opset: int, in_shape: tuple, out_shape: tuple, axis: int) -> np.ndarray:
    """A (out_shape[axis] x in_shape[axis]) with Resize(x) along `axis` = A @ x, measured with onnxruntime."""
    import onnxruntime as ort

    n_in = in_shape[axis]
    probe_in = [n_in, 1, *in_shape[2:]]
    x = np.zeros(probe_in, np.float32)
    for i in range(n_in):
        idx = [i, 0] + [slice(None)] * (len(in_shape) - 2)
        idx[axis] = i
        x[tuple(idx)] = 1.0
    sizes = np.array([n_in, 1, *out_shape[2:]], np.int64)
    attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute
             if a.name not in ("axes", "keep_aspect_ratio_policy")}  # the probe gives every size
    inits = [numpy_helper.from_array(sizes, "sizes")]
    if opset >= 11:
        inputs = ["x", "", "", "sizes"]
    else:  # opset 10: scales only
        inits = [numpy_helper.from_array((sizes / np.array(probe_in)).astype(np.float32), "scales")]
        inputs = ["x", "scales"]
    r = helper.make_node("Resize", inputs, ["y"], **attrs)
    g = helper.make_graph([r], "probe", [helper.make_tensor_value_info("x", TensorProto.FLOAT, probe_in)],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)], inits)
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", opset)])
    m.ir_version = 8
    so = ort.SessionOptions()
    so.intra_op_num_threads = 1
    so.log_severity_level = 3
    y = ort.InferenceSession(m.SerializeToString(), so, providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]
    idx = [slice(None), 0] + [0] * (len(in_shape) - 2)
    idx[axis] = slice(None)
    return np.ascontiguousarray(y[tuple(idx)].T)  # y[i, 0, .., o, ..] = A[o, i]


def rewrite_resize(ctx, node: onnx.NodeProto) -> list[onnx.NodeProto]:
    if _attr(node, "coordinate_transformation_mode", "half_pixel") == "tf_crop_and_resize":
        raise TrainingError(f"Resize node {node.name}: tf_crop_and_resize has no training rewrite")
    x, y = node.input[0], node.output[0]
    in_shape = ctx.static_shape(node, x, slice(1, None))
    out_shape = ctx.static_shape(node, y, slice(1, None))
    if len(in_shape) != len(out_shape) or len(in_shape) < 3:
        raise TrainingError(f"Resize node {node.name}: input {list(in_shape)} and output {list(out_shape)} shapes "
                            "do not allow its training rewrite")
    if tuple(in_shape[1:2]) != tuple(out_shape[1:2]) or (in_shape[0] and out_shape[0] and in_shape[0] != out_shape[0]):
        raise TrainingError(f"Resize node {node.name}: resizes the batch or channel dimension; no training rewrite")
    axes = [a for a in range(2, len(in_shape)) if in_shape[a] != out_shape[a]]
    nearest = _attr(node, "mode", "nearest") == "nearest"
    rank = len(in_shape)
    nodes, cur = [], x
    for k, a in enumerate(axes):
        mat = axis_matrix(node, ctx.opset, tuple(in_shape), tuple(out_shape), a)
        out = y if k == len(axes) - 1 else ctx.name(node, f"axis{a}")
        if nearest and np.all((mat == 0) | (mat == 1)) and np.all(mat.sum(axis=1) == 1):
            idx = ctx.const(node, f"indices{a}", np.argmax(mat, axis=1), np.int64)
            nodes.append(helper.make_node("Gather", [cur, idx], [out], axis=a))
        elif a == rank - 1:
            nodes.append(helper.make_node("MatMul", [cur, ctx.const(node, f"matrix{a}", mat.T)], [out]))
        elif a == rank - 2:
            nodes.append(helper.make_node("MatMul", [ctx.const(node, f"matrix{a}", mat), cur], [out]))
        else:  # move the axis last, multiply, move it back
            perm = [d for d in range(rank) if d != a] + [a]
            inv = list(np.argsort(perm))
            t1, t2 = ctx.name(node, f"to_last{a}"), ctx.name(node, f"mm{a}")
            nodes += [helper.make_node("Transpose", [cur], [t1], perm=perm),
                      helper.make_node("MatMul", [t1, ctx.const(node, f"matrix{a}", mat.T)], [t2]),
                      helper.make_node("Transpose", [t2], [out], perm=[int(i) for i in inv])]
        cur = out
    if not nodes:
        nodes.append(helper.make_node("Identity", [x], [y]))
    return nodes
