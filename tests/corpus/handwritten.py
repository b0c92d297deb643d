"""Corpus models written as ONNX directly (onnx.helper, no torch), each with a numpy float64 reference.

`Builder` adds one ONNX node per call *and* computes that node's value in numpy on a batch of inputs, so the
graph and its independent reference come from the same layer list. The batch is 16 calibration rows (they set
BatchNormalization's running statistics, as training would) followed by the 4 reference rows saved beside the
model. Weights: He-normal for convolutions (std sqrt(2 / fan_in)), fixed seed per model name.
"""

from __future__ import annotations

import os
import zlib

import numpy as np
import onnx
from numpy.lib.stride_tricks import sliding_window_view
from onnx import TensorProto, helper, numpy_helper

from .catalog import SPEC_BY_NAME, Spec
from .inputs import sample_inputs

CALIB, REF = 16, 4


def conv2d_ref(x, w, b, stride, pads, group):
    """NCHW convolution in float64; pads = (top, left, bottom, right)."""
    n, c, _, _ = x.shape
    o, cg, kh, kw = w.shape
    xp = np.pad(x, ((0, 0), (0, 0), (pads[0], pads[2]), (pads[1], pads[3])))
    win = sliding_window_view(xp, (kh, kw), axis=(2, 3))[:, :, ::stride, ::stride]  # N, C, Ho, Wo, kh, kw
    ho, wo = win.shape[2], win.shape[3]
    win = win.reshape(n, group, cg, ho, wo, kh, kw)
    wg = w.reshape(group, o // group, cg, kh, kw)
    y = np.einsum("ngchwij,gocij->ngohw", win, wg, optimize=True).reshape(n, o, ho, wo)
    return y if b is None else y + b.reshape(1, -1, 1, 1)


def same_upper_pads(size: int, k: int, s: int) -> tuple[int, int]:
    out = -(-size // s)
    total = max(0, (out - 1) * s + k - size)
    return total // 2, total - total // 2  # the odd pixel goes at the end (SAME_UPPER)


def softmax_ref(x, axis):
    e = np.exp(x - x.max(axis=axis, keepdims=True))
    return e / e.sum(axis=axis, keepdims=True)


class Builder:
    def __init__(self, name: str, seed: int):
        self.name = name
        self.rng = np.random.default_rng(seed)
        self.nodes: list[onnx.NodeProto] = []
        self.inits: list[onnx.TensorProto] = []
        self.vals: dict[str, np.ndarray] = {}
        self._n = 0

    # -- plumbing
    def _name(self, op: str) -> str:
        self._n += 1
        return f"{op.lower()}_{self._n}"

    def init(self, hint: str, arr: np.ndarray) -> str:
        name = f"{hint}_{len(self.inits)}"
        arr = np.asarray(arr)
        self.inits.append(numpy_helper.from_array(arr, name))
        self.vals[name] = arr.astype(np.float64) if arr.dtype == np.float32 else arr
        return name

    def node(self, op: str, inputs: list[str], value: np.ndarray, out: str | None = None, **attrs) -> str:
        nm = self._name(op)
        out = out or nm
        self.nodes.append(helper.make_node(op, inputs, [out], name=nm, **attrs))
        self.vals[out] = value
        return out

    def v(self, t: str) -> np.ndarray:
        return self.vals[t]

    # -- layers
    def scalar(self, op: str, x: str, c: float, out=None) -> str:
        k = self.init(f"{op.lower()}_c", np.array(c, np.float32))
        f = {"Mul": np.multiply, "Add": np.add, "Sub": np.subtract}[op]
        return self.node(op, [x, k], f(self.v(x), self.v(k)), out)

    def transpose(self, x: str, perm, out=None) -> str:
        return self.node("Transpose", [x], self.v(x).transpose(perm), out, perm=list(perm))

    def conv(self, x, cout, k, stride=1, auto_pad=None, pads=None, group=1, bias=True, out=None, gain=2.0) -> str:
        xv = self.v(x)
        cin = xv.shape[1]
        fan_in = cin // group * k * k
        w = (self.rng.standard_normal((cout, cin // group, k, k)) * np.sqrt(gain / fan_in)).astype(np.float32)
        b = (0.01 * self.rng.standard_normal(cout)).astype(np.float32) if bias else None
        ins = [x, self.init("W", w)] + ([self.init("B", b)] if bias else [])
        attrs = dict(kernel_shape=[k, k], strides=[stride, stride], group=group)
        if auto_pad == "SAME_UPPER":
            (t, bo), (lft, r) = same_upper_pads(xv.shape[2], k, stride), same_upper_pads(xv.shape[3], k, stride)
            p = (t, lft, bo, r)
            attrs["auto_pad"] = auto_pad
        elif auto_pad == "VALID":
            p = (0, 0, 0, 0)
            attrs["auto_pad"] = auto_pad
        else:
            p = tuple(pads if pads is not None else [k // 2] * 4)
            attrs["pads"] = list(p)
        y = conv2d_ref(xv, self.v(ins[1]), None if b is None else self.v(ins[2]), stride, p, group)
        return self.node("Conv", ins, y, out, **attrs)

    def batchnorm(self, x: str, eps=1e-3) -> str:
        xv = self.v(x)
        calib = xv[:CALIB]
        c = xv.shape[1]
        mean = calib.mean(axis=(0, 2, 3)).astype(np.float32)
        var = calib.var(axis=(0, 2, 3)).astype(np.float32)
        gamma = self.rng.uniform(0.8, 1.2, c).astype(np.float32)
        beta = (0.1 * self.rng.standard_normal(c)).astype(np.float32)
        ins = [x] + [self.init(h, a) for h, a in (("gamma", gamma), ("beta", beta), ("mean", mean), ("var", var))]
        g, bt, m, vr = (self.v(i).reshape(1, -1, 1, 1) for i in ins[1:])
        y = (xv - m) / np.sqrt(vr + np.float64(np.float32(eps))) * g + bt
        return self.node("BatchNormalization", ins, y, epsilon=eps)

    def prelu(self, x: str) -> str:
        c = self.v(x).shape[1]
        slope = self.init("slope", self.rng.uniform(0.05, 0.3, (c, 1, 1)).astype(np.float32))
        xv, s = self.v(x), self.v(slope)[None]
        return self.node("PRelu", [x, slope], np.where(xv >= 0, xv, xv * s))

    def relu(self, x: str) -> str:
        return self.node("Relu", [x], np.maximum(self.v(x), 0))

    def sigmoid(self, x: str, out=None) -> str:
        return self.node("Sigmoid", [x], 1 / (1 + np.exp(-self.v(x))), out)

    def tanh(self, x: str) -> str:
        return self.node("Tanh", [x], np.tanh(self.v(x)))

    def binary(self, op: str, a: str, b: str, out=None) -> str:
        f = {"Mul": np.multiply, "Add": np.add, "Sub": np.subtract, "MatMul": np.matmul}[op]
        return self.node(op, [a, b], f(self.v(a), self.v(b)), out)

    def gemm(self, x: str, cout: int, trans_b: int, out=None, scale=None) -> str:
        cin = self.v(x).shape[1]
        s = scale if scale is not None else np.sqrt(1.0 / cin)
        w = (self.rng.standard_normal((cout, cin) if trans_b else (cin, cout)) * s).astype(np.float32)
        b = (0.01 * self.rng.standard_normal(cout)).astype(np.float32)
        wn, bn = self.init("W", w), self.init("B", b)
        wv = self.v(wn).T if trans_b else self.v(wn)
        return self.node("Gemm", [x, wn, bn], self.v(x) @ wv + self.v(bn), out, transB=trans_b)

    def matmul_weight(self, x: str, cout: int, scale: float) -> str:
        w = self.init("U", (self.rng.standard_normal((self.v(x).shape[1], cout)) * scale).astype(np.float32))
        return self.binary("MatMul", x, w)

    def reduce_mean(self, x: str, axes) -> str:
        return self.node("ReduceMean", [x], self.v(x).mean(axis=tuple(axes)), axes=list(axes), keepdims=0)

    def global_avg_flatten(self, x: str) -> str:
        g = self.node("GlobalAveragePool", [x], self.v(x).mean(axis=(2, 3), keepdims=True))
        return self.node("Flatten", [g], self.v(g).reshape(self.v(g).shape[0], -1), axis=1)

    def reshape(self, x: str, shape) -> str:
        s = self.init("shape", np.array(shape, np.int64))
        xv = self.v(x)
        target = [xv.shape[i] if d == 0 else d for i, d in enumerate(shape)]
        return self.node("Reshape", [x, s], xv.reshape(target))

    def concat(self, xs: list[str], axis: int, out=None) -> str:
        return self.node("Concat", xs, np.concatenate([self.v(x) for x in xs], axis=axis), out, axis=axis)

    def softmax(self, x: str, axis: int, out=None) -> str:
        return self.node("Softmax", [x], softmax_ref(self.v(x), axis), out, axis=axis)

    # -- the model
    def model(self, spec: Spec, opset: int, outputs: list[str]) -> onnx.ModelProto:
        ins = [helper.make_tensor_value_info(i.name, TensorProto.FLOAT, ["N", *i.shape[1:]]) for i in spec.inputs]
        outs = [helper.make_tensor_value_info(name, TensorProto.FLOAT, ["N", *o.shape[1:]])
                for name, o in zip(outputs, spec.outputs)]
        graph = helper.make_graph(self.nodes, spec.name, ins, outs, self.inits)
        opsets = [helper.make_opsetid("", opset)]
        m = helper.make_model(graph, opset_imports=opsets, producer_name="onnxqat tests/corpus/handwritten.py",
                              ir_version=helper.find_min_ir_version_for(opsets))
        m.doc_string = spec.notes
        return m


def _inputs(spec: Spec, seed: int) -> dict[str, np.ndarray]:
    """CALIB + REF rows per input (inputs.py: image-like in the value range), float32."""
    xs = sample_inputs(spec, CALIB + REF, np.random.default_rng(seed))
    return {i.name: x for i, x in zip(spec.inputs, xs)}


def keras_nhwc(b: Builder, x: str) -> list[str]:
    x = b.scalar("Add", b.scalar("Mul", x, 1 / 127.5), -1.0)  # Keras Rescaling(1/127.5, offset=-1)
    x = b.transpose(x, (0, 3, 1, 2))  # tf2onnx's NHWC -> NCHW in front of the convolutions
    x = b.prelu(b.batchnorm(b.conv(x, 16, 3, 2, auto_pad="SAME_UPPER")))  # 64 -> 32
    x = b.prelu(b.batchnorm(b.conv(x, 32, 3, 1, auto_pad="VALID", bias=False)))  # 32 -> 30
    x = b.relu(b.conv(x, 32, 3, 2, auto_pad="SAME_UPPER", group=32))  # depthwise, 30 -> 15
    x = b.relu(b.conv(x, 64, 1, 1, auto_pad="VALID"))
    x = b.transpose(x, (0, 2, 3, 1))  # back to NHWC for Keras' GlobalAveragePooling2D
    x = b.reduce_mean(x, (1, 2))
    x = b.gemm(x, 10, trans_b=0, scale=np.sqrt(3.0 / 64))  # Keras Dense kernel [in, out]
    return [b.softmax(x, 1, out="probs")]


def face_detector(b: Builder, x: str) -> list[str]:
    x = b.scalar("Mul", b.scalar("Sub", x, 127.0), 1 / 128.0)
    x = b.relu(b.conv(x, 16, 3, 2))  # 32
    x = b.relu(b.conv(b.relu(b.conv(x, 16, 3, 1, group=16)), 32, 1))
    f1 = b.relu(b.conv(b.relu(b.conv(x, 32, 3, 2, group=32)), 64, 1))  # 16
    f2 = b.relu(b.conv(b.relu(b.conv(f1, 64, 3, 2, group=64)), 64, 1))  # 8
    heads = {"boxes": 4, "scores": 2, "landmarks": 10}
    flat: dict[str, list[str]] = {k: [] for k in heads}
    for f in (f1, f2):
        for k, c in heads.items():
            y = b.transpose(b.conv(f, c, 3, 1, gain=1.0), (0, 2, 3, 1))
            flat[k].append(b.reshape(y, [0, -1, c]))
    return [b.concat(flat["boxes"], 1, out="boxes"), b.softmax(b.concat(flat["scores"], 1), -1, out="scores"),
            b.concat(flat["landmarks"], 1, out="landmarks")]


def vad_state(b: Builder, x: str, h: str) -> list[str]:
    x = b.relu(b.conv(x, 8, 3, 2))  # 16
    x = b.relu(b.conv(x, 16, 3, 2))  # 8
    x = b.global_avg_flatten(x)  # [N, 16]
    hidden = b.v(h).shape[1]
    s = 1.0 / np.sqrt(hidden)

    def gate(act, hh):
        pre = b.binary("Add", b.gemm(x, hidden, trans_b=1, scale=1.0), b.matmul_weight(hh, hidden, s))
        return act(pre)

    z = gate(b.sigmoid, h)
    r = gate(b.sigmoid, h)
    n = gate(b.tanh, b.binary("Mul", r, h))
    one_minus_z = b.node("Sub", [b.init("one", np.array(1.0, np.float32)), z], 1.0 - b.v(z))
    h_out = b.binary("Add", b.binary("Mul", one_minus_z, n), b.binary("Mul", z, h), out="h_out")
    prob = b.sigmoid(b.gemm(h_out, 1, trans_b=1, scale=1.0), out="speech_prob")
    return [prob, h_out]


BUILDERS = {"keras_nhwc": keras_nhwc, "face_detector": face_detector, "vad_state": vad_state}


def build(name: str, opset: int, out_dir: str | os.PathLike) -> tuple[str, str]:
    """Writes <name>.op<opset>.onnx and <name>.ref.npz into out_dir (temp file + rename); returns their paths."""
    spec = SPEC_BY_NAME[name]
    seed = zlib.crc32(name.encode())
    b = Builder(name, seed)
    xs = _inputs(spec, seed)
    for i in spec.inputs:
        b.vals[i.name] = xs[i.name].astype(np.float64)
    outs = BUILDERS[name](b, *[i.name for i in spec.inputs])
    m = b.model(spec, opset, outs)
    onnx.checker.check_model(m, full_check=True)
    path = os.path.join(out_dir, f"{name}.op{opset}.onnx")
    ref_path = os.path.join(out_dir, f"{name}.ref.npz")
    ref = {f"input:{i.name}": xs[i.name][CALIB:] for i in spec.inputs}
    ref.update({f"output:{o.name}": b.v(t)[CALIB:] for o, t in zip(spec.outputs, outs)})
    for p, write in ((path, lambda f: f.write(m.SerializeToString())), (ref_path, lambda f: np.savez(f, **ref))):
        with open(p + ".tmp", "wb") as f:
            write(f)
        os.replace(p + ".tmp", p)
    return path, ref_path
