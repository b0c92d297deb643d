"""Small QAT graphs built by hand, named as docs/CONVENTIONS.md says insert names them.

Each builder returns an onnx.ModelProto with random (seeded) weights and BatchNorm statistics, float input in [0, 1].
"""

from __future__ import annotations

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from onnxqat.ops.schema import DOMAIN, SAT_MODE_DOREFA


class QatBuilder:
    def __init__(self, seed: int = 0, sat_mode: int = SAT_MODE_DOREFA):
        self.rng = np.random.default_rng(seed)
        self.sat_mode = sat_mode  # SAT weight mode of conv() and gemm()
        self.nodes: list[onnx.NodeProto] = []
        self.inits: list[onnx.TensorProto] = []

    def init(self, name: str, value) -> str:
        self.inits.append(numpy_helper.from_array(np.asarray(value), name))
        return name

    # quantizers -------------------------------------------------------------
    def sat_weight(self, consumer: str, wname: str, r: int = 15, mode: int = SAT_MODE_DOREFA, fan_out: int = 0) -> str:
        q = f"{consumer}_wquant"
        self.init(f"{q}.range", np.array(r, np.float32))
        self.init(f"{q}.mode", np.array(mode, np.int64))
        self.init(f"{q}.fan_out", np.array(fan_out, np.int64))
        out = f"{wname}_q"
        self.nodes.append(helper.make_node("SatWeightQuant", [wname, f"{q}.range", f"{q}.mode", f"{q}.fan_out"],
                                           [out], name=q, domain=DOMAIN))
        return out

    def lsq_weight(self, consumer: str, wname: str, w: np.ndarray, r: int = 15, per_channel: bool = False,
                   axis: int = 0) -> str:
        q = f"{consumer}_wquant"
        qp = (r - 1) // 2
        if per_channel:
            red = tuple(i for i in range(w.ndim) if i != axis)
            step = (2 * np.mean(np.abs(w), axis=red) / np.sqrt(qp)).astype(np.float32)
        else:
            step = np.array([2 * np.mean(np.abs(w)) / np.sqrt(qp)], np.float32)
        self._lsq(q, wname, f"{wname}_q", step, r, 1, axis)
        return f"{wname}_q"

    def _lsq(self, q, x, y, step, r, signed, axis=0):
        self.init(f"{q}.step", step)
        self.init(f"{q}.range", np.array(r, np.float32))
        self.init(f"{q}.signed", np.array(signed, np.int64))
        self.init(f"{q}.grad_scale", np.array(1.0, np.float32))
        self.init(f"{q}.axis", np.array(axis, np.int64))
        self.nodes.append(helper.make_node("LsqQuant", [x, f"{q}.step", f"{q}.range", f"{q}.signed", f"{q}.grad_scale",
                                                        f"{q}.axis"], [y], name=q, domain=DOMAIN))

    def sat_act(self, name: str, x: str, y: str, alpha: float, r: int = 15) -> str:
        q = f"{name}_aquant"
        self.init(f"{q}.alpha", np.array([alpha], np.float32))
        self.init(f"{q}.range", np.array(r, np.float32))
        self.nodes.append(helper.make_node("SatActQuant", [x, f"{q}.alpha", f"{q}.range"], [y], name=q, domain=DOMAIN))
        return y

    def lsq_act(self, name: str, x: str, step: float, r: int = 15) -> str:
        self._lsq(f"{name}_aquant", x, f"{x}_q", np.array([step], np.float32), r, 0)
        return f"{x}_q"

    # layers -----------------------------------------------------------------
    def conv(self, name: str, x: str, cin: int, cout: int, k: int = 3, stride: int = 1, pad: int = 1, group: int = 1,
             wq: str = "sat", r: int = 15, bias: bool = False, per_channel: bool = False) -> str:
        w = (self.rng.standard_normal((cout, cin // group, k, k)) * 0.3).astype(np.float32)
        wname = self.init(f"{name}.weight", w)
        if wq == "sat":
            wqn = self.sat_weight(name, wname, r, mode=self.sat_mode)
        else:
            wqn = self.lsq_weight(name, wname, w, r, per_channel, 0)
        ins = [x, wqn]
        if bias:
            ins.append(self.init(f"{name}.bias", (self.rng.standard_normal(cout) * 0.1).astype(np.float32)))
        self.nodes.append(helper.make_node("Conv", ins, [f"{name}_out"], name=name, kernel_shape=[k, k],
                                           strides=[stride, stride], pads=[pad] * 4, group=group))
        return f"{name}_out"

    def bn(self, name: str, x: str, c: int, negative_gamma: bool = True) -> str:
        rng = self.rng
        gamma = (rng.uniform(0.5, 1.5, c) * (np.where(rng.uniform(size=c) < 0.2, -1, 1) if negative_gamma else 1))
        ins = [x]
        for part, v in (("scale", gamma), ("B", rng.standard_normal(c) * 0.2), ("mean", rng.standard_normal(c) * 0.5),
                        ("var", rng.uniform(0.5, 2.0, c))):
            ins.append(self.init(f"{name}.{part}", v.astype(np.float32)))
        self.nodes.append(helper.make_node("BatchNormalization", ins, [f"{name}_out"], name=name, epsilon=1e-5))
        return f"{name}_out"

    def gemm(self, name: str, x: str, k: int, n: int, wq: str = "sat", r: int = 15, fan_out: int = 0,
             per_channel: bool = False) -> str:
        w = (self.rng.standard_normal((n, k)) * 0.3).astype(np.float32)
        wname = self.init(f"{name}.weight", w)
        if wq == "sat":
            wqn = self.sat_weight(name, wname, r, mode=self.sat_mode, fan_out=fan_out)
        else:
            wqn = self.lsq_weight(name, wname, w, r, per_channel, 0)
        b = self.init(f"{name}.bias", (self.rng.standard_normal(n) * 0.1).astype(np.float32))
        self.nodes.append(helper.make_node("Gemm", [x, wqn, b], [f"{name}_out"], name=name, transB=1))
        return f"{name}_out"

    def op(self, op: str, ins: list[str], out: str, **kw) -> str:
        self.nodes.append(helper.make_node(op, ins, [out], name=out, **kw))
        return out

    def model(self, in_shape, out: str, out_shape) -> onnx.ModelProto:
        g = helper.make_graph(self.nodes, "qat", [helper.make_tensor_value_info("input", TensorProto.FLOAT, in_shape)],
                              [helper.make_tensor_value_info(out, TensorProto.FLOAT, out_shape)], self.inits)
        m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid(DOMAIN, 1)],
                              ir_version=9)
        m.metadata_props.add(key="onnxqat.recipe", value="handmade")
        return m


def conv_bn_sat(r_w: int = 15, r_a: int = 15, seed: int = 0) -> onnx.ModelProto:
    """Conv-BN-SatAct, MaxPool, strided Conv-BN-SatAct, Flatten, Gemm (SAT weights with ApplyScaling) -> logits."""
    b = QatBuilder(seed)
    x = b.conv("conv1", "input", 1, 4, r=r_w)
    x = b.bn("bn1", x, 4)
    x = b.sat_act("relu1", x, "relu1_out", 2.11, r_a)
    x = b.op("MaxPool", [x], "pool1", kernel_shape=[2, 2], strides=[2, 2])
    x = b.conv("conv2", x, 4, 8, stride=2, r=r_w)
    x = b.bn("bn2", x, 8)
    x = b.sat_act("relu2", x, "relu2_out", 2.93, r_a)
    x = b.op("Flatten", [x], "flat", axis=1)
    x = b.gemm("fc", x, 8 * 2 * 2, 10, r=r_w, fan_out=10)
    return b.model(["N", 1, 8, 8], x, ["N", 10])


def residual(seed: int = 1, r: int = 15) -> onnx.ModelProto:
    """ResNet-style block: a = act(bn(conv)); y = act(bn(conv(act(bn(conv a)))) + a); plus an Add of two codes."""
    b = QatBuilder(seed)
    a = b.sat_act("relu0", b.bn("bn0", b.conv("conv0", "input", 3, 6, r=r), 6), "relu0_out", 2.13, r)
    h = b.sat_act("relu1", b.bn("bn1", b.conv("conv1", a, 6, 6, r=r), 6), "relu1_out", 1.87, r)
    h = b.bn("bn2", b.conv("conv2", h, 6, 6, r=r), 6)
    s = b.op("Add", [h, a], "add1")
    y = b.sat_act("relu2", s, "relu2_out", 3.07, r)
    # second residual: sum of two quantized tensors
    z = b.sat_act("relu3", b.bn("bn3", b.conv("conv3", y, 6, 6, r=r), 6), "relu3_out", 1.61, r)
    s2 = b.op("Add", [z, y], "add2")
    y2 = b.sat_act("relu4", s2, "relu4_out", 3.93, r)
    f = b.op("Flatten", [b.op("MaxPool", [y2], "pool", kernel_shape=[2, 2], strides=[2, 2])], "flat", axis=1)
    out = b.gemm("fc", f, 6 * 3 * 3, 5, r=r, fan_out=5)
    return b.model(["N", 3, 6, 6], out, ["N", 5])


def lsq_per_channel(r: int = 15, seed: int = 2) -> onnx.ModelProto:
    """Conv(per-channel LSQ weights, bias)-BN-Relu-LsqAct, depthwise conv, MatMul+Add, Gemm per-tensor LSQ."""
    b = QatBuilder(seed)
    x = b.conv("conv1", "input", 3, 8, wq="lsq", r=r, per_channel=True, bias=True)
    x = b.bn("bn1", x, 8)
    x = b.op("Relu", [x], "relu1")
    x = b.lsq_act("relu1", x, 0.153, r)
    x = b.conv("dw", x, 8, 8, group=8, wq="lsq", r=r, per_channel=True)
    x = b.bn("bn_dw", x, 8)
    x = b.op("Relu", [x], "relu_dw")
    x = b.lsq_act("relu_dw", x, 0.207, r)
    x = b.op("MaxPool", [x], "pool", kernel_shape=[2, 2], strides=[2, 2])
    x = b.op("Flatten", [x], "flat", axis=1)
    w = (b.rng.standard_normal((8 * 4 * 4, 16)) * 0.3).astype(np.float32)
    wn = b.init("mm.weight", w)
    wq = b.lsq_weight("mm", wn, w, r, per_channel=True, axis=1)
    x = b.op("MatMul", [x, wq], "mm")
    x = b.op("Add", [x, b.init("mm.bias", (b.rng.standard_normal(16) * 0.1).astype(np.float32))], "mm_bias")
    x = b.op("Relu", [x], "relu_mm")
    x = b.lsq_act("relu_mm", x, 0.311, r)
    out = b.gemm("fc", x, 16, 10, wq="lsq", r=r)
    return b.model(["N", 3, 8, 8], out, ["N", 10])


def mobile_block(r: int = 255, seed: int = 3) -> onnx.ModelProto:
    """EfficientNet-Lite-like: input normalisation (x*255/128 - 127/128), ReLU6 = Clip(0, 6) before LSQ, depthwise,
    a linear bottleneck with a signed LSQ activation quantizer, a residual Add of signed codes, GlobalAveragePool."""
    b = QatBuilder(seed)
    x = b.op("Mul", ["input", b.init("norm.mul", np.array(255 / 128, np.float32))], "norm_mul")
    x = b.op("Sub", [x, b.init("norm.sub", np.array(127 / 128, np.float32))], "norm_sub")

    def relu6_q(name, x, step):
        y = b.op("Clip", [x, b.init(f"{name}.lo", np.array(0, np.float32)), b.init(f"{name}.hi", np.array(6, np.float32))],
                 name)
        return b.lsq_act(name, y, step, r)

    x = relu6_q("stem_act", b.bn("bn0", b.conv("stem", x, 3, 8, stride=2, wq="lsq", r=r, per_channel=True), 8), 0.031)
    x = relu6_q("dw_act", b.bn("bn_dw", b.conv("dw", x, 8, 8, group=8, wq="lsq", r=r, per_channel=True), 8), 0.027)
    h = b.bn("bn_pw", b.conv("pw", x, 8, 6, k=1, pad=0, wq="lsq", r=r, per_channel=True), 6)
    bott = f"{h}_q"
    b._lsq("pw_out_aquant", h, bott, np.array([0.0437], np.float32), r, 1)  # signed: linear bottleneck
    e = relu6_q("exp_act", b.bn("bn_exp", b.conv("exp", bott, 6, 12, k=1, pad=0, wq="lsq", r=r, per_channel=True), 12),
                0.029)
    p = b.bn("bn_proj", b.conv("proj", e, 12, 6, k=1, pad=0, wq="lsq", r=r, per_channel=True), 6)
    s = b.op("Add", [p, bott], "res_add")
    sq = "res_add_q"
    b._lsq("res_add_aquant", s, sq, np.array([0.0517], np.float32), r, 1)
    g = b.op("GlobalAveragePool", [sq], "gap")
    gq = "gap_q"
    b._lsq("gap_aquant", g, gq, np.array([0.0113], np.float32), r, 1)
    f = b.op("Flatten", [gq], "flat", axis=1)
    return b.model(["N", 3, 12, 12], b.gemm("fc", f, 6, 10, wq="lsq", r=r, per_channel=True), ["N", 10])


def gemm_bn1d(r: int = 15, wq: str = "sat", seed: int = 1) -> onnx.ModelProto:
    """Flatten -> Gemm(transB=0, alpha, beta; per-channel LSQ on axis 1) -> BatchNormalization (1-D) -> SatAct -> Gemm."""
    b = QatBuilder(seed)
    x = b.op("Flatten", ["input"], "flat", axis=1)
    w = (b.rng.standard_normal((48, 20)) * 0.3).astype(np.float32)
    b.init("fc1.weight", w)
    q = b.sat_weight("fc1", "fc1.weight", r, fan_out=20) if wq == "sat" else b.lsq_weight("fc1", "fc1.weight", w, r, True, 1)
    b.nodes.append(helper.make_node("Gemm", [x, q, b.init("fc1.bias", np.full(20, 0.1, np.float32))], ["h"], name="fc1",
                                    transB=0, alpha=0.7, beta=1.3))
    h = b.sat_act("relu", b.bn("bn_fc", "h", 20), "hq", 1.37, r)
    return b.model(["N", 3, 4, 4], b.gemm("fc2", h, 20, 7, wq=wq, r=r), ["N", 7])
