"""Lowering of a QAT graph (float ops + com.onnxqat quantizers) to standard ONNX ops.

The walk keeps, for each tensor of the QAT graph, how its value is represented in the new graph:
- Codes: unsigned integer codes c in [0, R] with real value scale * c (the output of an activation quantizer, or the
  network input as image codes);
- Acc:   an integer accumulator (or a sum of them, residual Add) with real value sum_i scale_i * t_i + bias, the scales
  and bias per output channel: the output of Conv/Gemm/MatMul on codes with BatchNormalization folded in;
- Float: a float tensor (QDQ format, or a node the user keeps in float with keep_float).
An activation quantizer turns an Acc into Codes: code = clip(round(value / s_out), 0, R_out). In the integer format this is
a fixed-point multiplier per channel and a rounding right shift (rescale="fixed-point"), or a float multiply
(rescale="float", N2D2's default); in the QDQ format a float Clip + QuantizeLinear.
BatchNormalization: f = gamma / sqrt(var + eps); scale_o *= f_o; bias_o = f_o * (bias_o - mean_o) + beta_o.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from onnxqat.errors import FuseError
from onnxqat.fuse.builder import GraphBuilder
from onnxqat.fuse.graph import QatGraph, attrs, check_range, node_label
from onnxqat.fuse.storage import emit_codes, emit_scaled_codes, storage_bits
from onnxqat.fuse.weights import WeightCodes, weight_codes
from onnxqat.ops.schema import DOMAIN

OPSET = 21
IR_VERSION = 10
PRECISION_BITS = 28  # fixed-point multipliers are < 2**28
WEIGHTED = ("Conv", "Gemm", "MatMul")
SHAPE_OPS = ("Flatten", "Reshape", "Squeeze", "Unsqueeze", "Identity", "Transpose", "Dropout", "MaxPool")


@dataclass
class Codes:
    """Unsigned codes u in [0, r]; real value scale * (u - zp) (zp > 0: signed quantizers, input normalisation)."""
    name: str
    scale: float
    r: int
    dtype: int = TensorProto.UINT8
    zp: int = 0

    @property
    def bound(self) -> float:  # max |u - zp|
        return float(max(self.zp, self.r - self.zp))

    def term(self) -> tuple:
        return (self.name, np.array([self.scale]), self.bound)

    def offset(self) -> np.ndarray:  # real bias of the term form: scale*u - scale*zp
        return np.array([-self.scale * self.zp])


@dataclass
class Acc:
    terms: list  # [(tensor name, float64 scale vector [C] or [1], bound on |t|)]
    bias: np.ndarray  # float64 [C] or [1]
    cshape: tuple  # broadcast shape of a per-channel vector against the tensor
    axis: int  # channel axis
    clip: tuple = (-np.inf, np.inf)  # a Relu / Clip(lo, hi) on the real value, folded into the next quantizer


@dataclass
class Float:
    name: str
    grid: Codes | None = None  # set when the float tensor is exactly grid.scale * codes
    unit: tuple | None = None  # (scale vector, axis): the integer step of a weighted layer's output (QDQ logits)


@dataclass
class Pooled:
    """The mean of codes over `axes` (GlobalAveragePool), not yet computed: real = codes.scale * (sum(u) / count - zp).
    A quantizer after it takes the int32 sum; a Gemm/MatMul right after it (through Flatten) runs first as a 1x1
    ConvInteger on the codes and sums its output (sum and matrix product commute), so it stays exact."""
    codes: Codes
    axes: list
    count: int
    flat: bool = False


@dataclass
class OutputInfo:
    name: str
    scale: np.ndarray  # real value of one output code, per channel
    axis: int
    dtype: int


@dataclass
class Lowered:
    model: onnx.ModelProto
    outputs: list[OutputInfo]
    weight_params: int = 0
    weight_bits: dict = field(default_factory=dict)
    kept_float: list = field(default_factory=list)
    activation_codes: dict = field(default_factory=dict)  # quantizer output -> (fused codes tensor, scale, zp)


def _vec(v) -> np.ndarray:
    return np.atleast_1d(np.asarray(v, dtype=np.float64)).reshape(-1)


class Lowerer:
    def __init__(self, model: onnx.ModelProto, *, format: str = "int", rescale: str = "fixed-point",
                 input_scale: float = 1 / 255, input_type: str = "uint8", keep_float=(), dequantize_output: bool = True):
        if format not in ("int", "qdq"):
            raise FuseError(f"unknown format '{format}' (int or qdq)")
        if rescale not in ("fixed-point", "float"):
            raise FuseError(f"unknown rescale '{rescale}' (fixed-point or float)")
        if input_type not in ("uint8", "float"):
            raise FuseError(f"unknown input type '{input_type}' (uint8 or float)")
        if not input_scale > 0:
            raise FuseError(f"input scale must be > 0, got {input_scale}")
        self.g = QatGraph(model)
        self.format, self.rescale = format, rescale
        self.input_scale = float(input_scale)
        self.input_type = "float" if format == "qdq" else input_type
        self.keep_float = set(keep_float)
        self.dequantize_output = dequantize_output
        taken = {o for n in model.graph.node for o in n.output} | {i.name for i in model.graph.input}
        taken |= set(self.g.consts)
        self.b = GraphBuilder(taken)
        self.val: dict[str, object] = {}
        self.done: set[int] = set()
        self.weight_params = 0
        self.weight_bits: dict[str, int] = {}
        self.kept: list[str] = []
        self.act_codes: dict[str, tuple] = {}

    # ------------------------------------------------------------------ walk
    def run(self) -> Lowered:
        g = self.g
        if not g.quantizers:
            raise FuseError("model has no quantizer node (com.onnxqat): run `onnxqat insert` and train it first")
        if len(g.inputs) != 1:
            raise FuseError(f"fuse handles one network input, model has {len(g.inputs)}")
        inp = g.inputs[0]
        if inp.type.tensor_type.elem_type != TensorProto.FLOAT:
            raise FuseError(f"network input '{inp.name}' is not float32")
        self._input(inp.name)
        for idx, node in enumerate(g.model.graph.node):
            if idx in self.done:
                continue
            self._node(idx, node)
        outputs = [self._output(name) for name in g.output_names]
        return Lowered(self._model(inp, outputs), outputs, self.weight_params, self.weight_bits, self.kept,
                       self.act_codes)

    def _record(self, out: str, v):
        c = v.grid if isinstance(v, Float) else v
        self.act_codes[out] = (c.name, c.scale, c.dtype, c.zp)
        return v

    def _index(self, node) -> int:
        for i, n in enumerate(self.g.model.graph.node):
            if n is node:
                return i
        raise KeyError(node.name)

    def _get(self, name: str, node) -> object:
        if name not in self.val:
            prod = self.g.producer.get(name)
            src = f" (from {node_label(prod)})" if prod is not None else ""
            raise FuseError(f"{node_label(node)}: input '{name}'{src} has no integer form")
        return self.val[name]

    def _node(self, idx: int, node: onnx.NodeProto) -> None:
        op, g = node.op_type, self.g
        if node.op_type == "Constant":
            return
        if node.domain == DOMAIN and node.input[0] in g.consts:
            return  # weight quantizer: read by its consumer
        if node.name in self.keep_float or node.output[0] in self.keep_float:
            return self._keep_float(node)
        if node.domain == DOMAIN and op == "SatActQuant":
            alpha = abs(g.scalar(node, 1, "alpha"))
            r = check_range(node, g.scalar(node, 2, "range"), max_r=255)
            if not alpha > 0:
                raise FuseError(f"{node_label(node)}: alpha is 0")
            self.val[node.output[0]] = self._record(node.output[0], self._requant(self._get(node.input[0], node), alpha / r,
                                                                                  r, node.output[0]))
            return
        if node.domain == DOMAIN and op == "LsqQuant":
            r = check_range(node, g.scalar(node, 2, "range"), max_r=255)
            zp = (r + 1) // 2 if int(g.scalar(node, 3, "signed")) else 0  # signed codes [-(R+1)/2, (R-1)/2] as u - zp
            step = g.const(node.input[1], node, "step")
            if step.size != 1:
                raise FuseError(f"{node_label(node)}: per-channel step on an activation is not supported")
            s = float(step.reshape(-1)[0])
            if not s > 0:
                raise FuseError(f"{node_label(node)}: step must be > 0, is {s:g}")
            self.val[node.output[0]] = self._record(node.output[0],
                                                    self._requant(self._get(node.input[0], node), s, r, node.output[0], zp))
            return
        if node.domain not in ("", "ai.onnx"):
            raise FuseError(f"{node_label(node)}: op of domain '{node.domain}' has no integer lowering")
        if op in WEIGHTED or op == "ConvTranspose":
            return self._weighted(node)
        if op == "BatchNormalization" and isinstance(self.val.get(node.input[0]), Float):
            return self._keep_float(node, record=False)  # after a layer kept in float
        if op == "BatchNormalization" and isinstance(self.val.get(node.input[0]), Acc):
            return self._batchnorm_on_acc(node)  # e.g. after a residual Add of weighted layers: still linear
        if op == "BatchNormalization":
            prod = g.producer.get(node.input[0])
            src = node_label(prod) if prod is not None else "the network input"
            raise FuseError(f"{node_label(node)} follows no weighted layer (its input comes from {src}); "
                            "only BatchNormalization right after Conv/Gemm/MatMul can be folded")
        if op in ("Softmax", "LogSoftmax") and node.output[0] in g.output_names and not g.consumers.get(node.output[0]):
            return self._keep_float(node)  # a classifier's tail after the final dequantize: float like the logits
        if op in ("Relu", "Clip"):
            return self._clip(node)
        if op in ("Mul", "Div", "Sub") or (op == "Add" and any(i in g.consts for i in node.input)):
            v = self._get([i for i in node.input if i not in g.consts][0], node) if len(node.input) == 2 else None
            if isinstance(v, Codes):
                return self._affine(node, v)
            if op == "Add":
                return self._add(node)
            raise FuseError(f"{node_label(node)} has no integer lowering here (only a scalar affine map of quantized "
                            f"codes, e.g. the input normalisation); keep it in float with --keep-float {node.name}")
        if op in ("GlobalAveragePool", "ReduceMean") and isinstance(self.val.get(node.input[0]), Codes):
            return self._global_pool(node)
        if op in ("GlobalAveragePool", "ReduceMean") and isinstance(self.val.get(node.input[0]), Float):  # QDQ
            extra = [self.b.const(i, g.consts[i]) for i in node.input[1:] if i]
            self.val[node.output[0]] = Float(self.b.op(op, [self.val[node.input[0]].name] + extra, node.output[0],
                                                       **attrs(node)))
            return
        if op == "Add":
            return self._add(node)
        if op in SHAPE_OPS:
            return self._shape_op(node)
        if op == "Concat":
            vals = [self._get(i, node) for i in node.input]
            if all(isinstance(v, Codes) for v in vals) and len({(v.scale, v.dtype, v.zp) for v in vals}) == 1:
                out = self.b.op("Concat", [v.name for v in vals], node.output[0], **attrs(node))
                self.val[node.output[0]] = Codes(out, vals[0].scale, max(v.r for v in vals), vals[0].dtype, vals[0].zp)
                return
            raise FuseError(f"{node_label(node)}: Concat of inputs with different quantization scales is not supported")
        raise FuseError(f"{node_label(node)} has no integer lowering (keep it in float with keep_float=['{node.name}'] "
                        f"/ --keep-float {node.name})")

    def _bn_factors(self, bn: onnx.NodeProto):
        g = self.g
        gamma, beta, mean, var = (_vec(g.const(bn.input[i], bn, n)) for i, n in
                                  ((1, "scale"), (2, "B"), (3, "mean"), (4, "var")))
        if attrs(bn).get("training_mode", 0):
            raise FuseError(f"{node_label(bn)}: training_mode=1 cannot be folded")
        if any(o for o in bn.output[1:]):
            raise FuseError(f"{node_label(bn)}: running-statistics outputs are in use")
        eps = float(attrs(bn).get("epsilon", 1e-5))
        f = gamma.astype(np.float32).astype(np.float64) / np.sqrt(var.astype(np.float64) + eps)
        return f, beta, mean

    def _batchnorm_on_acc(self, node: onnx.NodeProto) -> None:
        v: Acc = self.val[node.input[0]]
        if np.isfinite(v.clip).any():
            raise FuseError(f"{node_label(node)}: BatchNormalization after a Relu/Clip without a quantizer")
        f, beta, mean = self._bn_factors(node)
        c = f.size
        if v.cshape == ():  # per-tensor so far: take the BN's channel layout from the input's rank
            dims = self._shape_of(node.input[0])
            if not dims:
                raise FuseError(f"{node_label(node)}: rank of '{node.input[0]}' unknown")
            v = Acc(v.terms, v.bias, (1, c) + (1,) * (len(dims) - 2) if len(dims) > 2 else (c,), 1 if len(dims) > 2 else -1)
        terms = [(t, np.broadcast_to(sc, (c,)) * f, bd) for t, sc, bd in v.terms]
        bias = f * (np.broadcast_to(v.bias, (c,)) - mean) + beta
        self.val[node.output[0]] = Acc(terms, bias, v.cshape, v.axis)

    # ------------------------------------------------------- Relu / Clip
    def _clip(self, node: onnx.NodeProto) -> None:
        g = self.g
        v = self._get(node.input[0], node)
        if isinstance(v, Pooled):
            v = self._acc_of_pooled(v, node.output[0])
        if node.op_type == "Relu":
            lo, hi = 0.0, np.inf
        else:
            a = attrs(node)
            lo = float(g.const(node.input[1], node, "min").reshape(-1)[0]) if len(node.input) > 1 and node.input[1] \
                else float(a.get("min", -np.inf))
            hi = float(g.const(node.input[2], node, "max").reshape(-1)[0]) if len(node.input) > 2 and node.input[2] \
                else float(a.get("max", np.inf))
        if isinstance(v, Float):
            self.val[node.output[0]] = Float(self.b.op(node.op_type, [v.name] + [self.b.const(i, g.consts[i]) if i else ""
                                                                               for i in node.input[1:]], node.output[0],
                                                       **attrs(node)))
            return
        if isinstance(v, Acc):  # folded into the activation quantizer that follows: its code bounds shrink
            self.val[node.output[0]] = Acc(v.terms, v.bias, v.cshape, v.axis, (max(v.clip[0], lo), min(v.clip[1], hi)))
            return
        if lo <= -v.scale * v.zp and hi >= v.scale * (v.r - v.zp):
            self.val[node.output[0]] = v  # every code is inside already
            return
        lo_u = max(0, math.ceil(lo / v.scale - 1e-9) + v.zp) if np.isfinite(lo) else 0
        hi_u = min(v.r, math.floor(hi / v.scale + 1e-9) + v.zp) if np.isfinite(hi) else v.r
        exact = all(not np.isfinite(t) or abs(t / v.scale - round(t / v.scale)) < 1e-6 for t in (lo, hi) if t is not None)
        if not exact:
            raise FuseError(f"{node_label(node)}: clipping quantized codes at {lo:g}..{hi:g}, off their grid "
                            f"(step {v.scale:g})")
        b = self.b
        y = b.op("Clip", [v.name, b.const(f"{node.output[0]}_lo", np.array(lo_u, np.uint8)),
                          b.const(f"{node.output[0]}_hi", np.array(hi_u, np.uint8))], node.output[0])
        self.val[node.output[0]] = Codes(y, v.scale, v.r, v.dtype, v.zp)

    def _affine(self, node: onnx.NodeProto, v: Codes) -> None:
        """A scalar Mul/Div/Add/Sub of codes (the input normalisation): a new scale and zero point, no op."""
        g, op = self.g, node.op_type
        ci = [i for i in node.input if i in g.consts]
        c = g.consts[ci[0]] if ci else None
        if c is None or c.size != 1:
            raise FuseError(f"{node_label(node)}: only a scalar constant {op} of quantized codes has an integer form")
        c = float(c.reshape(-1)[0])
        scale, zp = v.scale, float(v.zp)
        if op in ("Mul", "Div"):
            f = c if op == "Mul" else 1.0 / c
            if not f > 0:
                raise FuseError(f"{node_label(node)}: {op} by {c:g} (only a positive factor keeps the codes)")
            scale *= f
        elif op == "Sub" and node.input[1] == ci[0]:
            zp += c / scale
        elif op == "Add":
            zp -= c / scale
        else:
            raise FuseError(f"{node_label(node)}: constant minus codes has no integer form")
        if abs(zp - round(zp)) > 1e-3 or not 0 <= round(zp) <= 255:
            raise FuseError(f"{node_label(node)}: the offset {op} {c:g} is not a whole number of codes "
                            f"(zero point {zp:g}, step {scale:g})")
        self.val[node.output[0]] = Codes(v.name, scale, v.r, v.dtype, int(round(zp)))

    def _global_pool(self, node: onnx.NodeProto) -> None:
        """Average of codes = (sum of codes) * scale / count: an int32 ReduceSum, rescaled by the next quantizer."""
        v: Codes = self.val[node.input[0]]
        dims = self._shape_of(node.input[0])
        a = attrs(node)
        if node.op_type == "GlobalAveragePool":
            axes = list(range(2, len(dims))) if dims else None
        else:
            axes = list(g for g in (self.g.consts[node.input[1]] if len(node.input) > 1 else a.get("axes", [])))
        if not dims or axes is None or any(dims[i] is None for i in axes):
            raise FuseError(f"{node_label(node)}: spatial size of '{node.input[0]}' unknown (needs a static shape)")
        if node.op_type == "ReduceMean" and not a.get("keepdims", 1):
            raise FuseError(f"{node_label(node)}: ReduceMean with keepdims=0 is not supported")
        count = int(np.prod([dims[i] for i in axes]))
        if sorted(a % len(dims) for a in axes) != list(range(2, len(dims))):
            raise FuseError(f"{node_label(node)}: only the mean over all spatial axes is supported")
        self.val[node.output[0]] = Pooled(v, list(range(2, len(dims))), count)

    def _acc_of_pooled(self, p: Pooled, base: str) -> Acc:
        b, v = self.b, p.codes
        x32 = b.cast(v.name, TensorProto.INT32, f"{base}_i32")
        ssum = b.op("ReduceSum", [x32, b.const(f"{base}_axes", np.array(p.axes, np.int64))], f"{base}_sum",
                    keepdims=0 if p.flat else 1)
        s = v.scale / p.count
        return Acc([(ssum, np.array([s]), v.bound * p.count)], np.array([-s * v.zp * p.count]), (), 1)

    def _shape_of(self, name: str):
        if not hasattr(self, "_shapes"):
            self._shapes = {}
            try:  # quantizers keep their input's shape: infer on a copy with Identity in their place
                m = onnx.ModelProto()
                m.CopyFrom(self.g.model)
                for n in m.graph.node:
                    if n.domain == DOMAIN:
                        del n.input[1:]
                        n.op_type, n.domain = "Identity", ""
                inferred = onnx.shape_inference.infer_shapes(m)
                for vi in list(inferred.graph.value_info) + list(inferred.graph.input) + list(inferred.graph.output):
                    self._shapes[vi.name] = [d.dim_value if d.HasField("dim_value") else None
                                             for d in vi.type.tensor_type.shape.dim]
            except Exception:  # shape inference is best effort here
                pass
        return self._shapes.get(name)

    # ------------------------------------------------------------- the input
    def _input(self, name: str) -> None:
        b = self.b
        if self.input_type == "uint8":
            self.val[name] = Codes(name, self.input_scale, 255)
            return
        s = b.const(f"{name}_scale", np.array(self.input_scale, np.float32))
        zp = b.const(f"{name}_zp", np.array(0, np.uint8))
        q = b.op("QuantizeLinear", [name, s, zp], f"{name}_codes")
        self.val[name] = Codes(q, self.input_scale, 255)

    # ------------------------------------------------------- weighted layers
    def _weighted(self, node: onnx.NodeProto) -> None:
        g, b = self.g, self.b
        op = node.op_type
        if op == "ConvTranspose":
            raise FuseError(f"{node_label(node)}: ConvTranspose has no integer ONNX op (ConvInteger has no transpose); "
                            f"keep it in float with keep_float=['{node.name}'] / --keep-float {node.name}")
        wname = node.input[1]
        q = g.producer.get(wname)
        if q is None or q.domain != DOMAIN or q.op_type not in ("SatWeightQuant", "LsqQuant"):
            raise FuseError(f"{node_label(node)}: weight '{wname}' has no weight quantizer")
        x = self._get(node.input[0], node)
        if isinstance(x, Float) and x.grid is not None:
            x = self._to_codes(x)
        pooled = None
        if isinstance(x, Pooled) and x.flat and op in ("Gemm", "MatMul") and self.format == "int":
            pooled, x = x, x.codes  # a 1x1 ConvInteger on the codes, summed over the pooled axes afterwards
        if not isinstance(x, Codes):
            raise FuseError(f"{node_label(node)}: input '{node.input[0]}' is not quantized (no activation quantizer "
                            "before this layer)")
        a = attrs(node)
        w = g.const(q.input[0], q, "weight")
        alpha = beta_g = 1.0
        if op == "Conv":
            out_axis, n_out, cshape, ch_axis = 0, w.shape[0], (1, w.shape[0]) + (1,) * (w.ndim - 2), 1
        elif op == "Gemm":
            if a.get("transA", 0):
                raise FuseError(f"{node_label(node)}: Gemm with transA=1 is not supported")
            trans_b = a.get("transB", 0)
            out_axis = 0 if trans_b else 1
            n_out, cshape, ch_axis = w.shape[out_axis], (w.shape[out_axis],), -1
            alpha, beta_g = float(a.get("alpha", 1.0)), float(a.get("beta", 1.0))
        else:
            if w.ndim != 2:
                raise FuseError(f"{node_label(node)}: MatMul with a {w.ndim}-D weight is not supported")
            out_axis, n_out, cshape, ch_axis = 1, w.shape[1], (w.shape[1],), -1
        codes = weight_codes(g, q, out_axis, n_out)
        self.weight_params += int(w.size)
        self.weight_bits[q.name or wname] = codes.bits
        bias = np.zeros(n_out)
        if len(node.input) > 2 and node.input[2]:
            bias = bias + beta_g * np.broadcast_to(_vec(g.const(node.input[2], node, "bias")), (n_out,))
        scale = x.scale * codes.scale * alpha / (pooled.count if pooled else 1)
        out = node.output[0]
        nxt = g.only_consumer(out)
        if op == "MatMul" and nxt is not None and nxt.op_type == "Add":
            other = [i for i in nxt.input if i != out]
            if len(other) == 1 and other[0] in g.consts:
                bias = bias + np.broadcast_to(_vec(g.consts[other[0]]), (n_out,))
                self.done.add(self._index(nxt))
                out = nxt.output[0]
                nxt = g.only_consumer(out)
        if nxt is not None and nxt.op_type == "BatchNormalization" and nxt.input[0] == out:
            bn = nxt
            f, beta, mean = self._bn_factors(bn)
            scale = scale * f
            bias = f * (bias - mean) + beta
            self.done.add(self._index(bn))
            out = bn.output[0]
        wk = codes.w_int if not (op == "Gemm" and a.get("transB", 0)) else codes.w_int.T
        u = codes.u if not (op == "Gemm" and a.get("transB", 0)) else codes.u.T
        if self.format == "qdq":
            self.val[out] = Float(self._weighted_qdq(node, x, codes, wk, scale, bias, cshape, out), unit=(scale, ch_axis))
            return
        # integer: acc = sum x_code * W_int over the window
        base = node.name or out
        zp_x = b.const(f"{base}_x_zp", np.array(x.zp, np.uint8))
        umax = (1 << codes.bits) - 1
        if codes.mult * umax <= 255 and 0 <= -codes.offset <= 255:
            wt = emit_scaled_codes(b, f"{base}_w", np.ascontiguousarray(u), codes.bits, codes.mult)
            zp, rem, mult = -codes.offset, 0, 1
        else:  # W_int = mult*(u - zp) + rem, rem in (-mult, 0]
            wt = emit_codes(b, f"{base}_w", np.ascontiguousarray(u), codes.bits)
            mult = codes.mult
            zp = (-codes.offset) // mult
            rem = codes.offset + mult * zp
        zp_w = b.const(f"{base}_w_zp", np.array(zp, np.uint8))
        if pooled is not None:  # weights [K, N] -> a 1x1 convolution [N, K, 1, 1]
            k1 = [1] * len(pooled.axes)
            wt = b.op("Reshape", [b.op("Transpose", [wt], f"{base}_wT", perm=[1, 0]),
                                  b.const(f"{base}_w1x1", np.array([n_out, -1] + k1, np.int64))], f"{base}_w_1x1")
            conv_attrs = {}
            acc = b.op("ConvInteger", [x.name, wt, zp_x, zp_w], f"{base}_acc_map")
            acc = b.op("ReduceSum", [acc, b.const(f"{base}_pool_axes", np.array(pooled.axes, np.int64))], f"{base}_acc",
                       keepdims=0)
        elif op == "Conv":
            conv_attrs = {k: v for k, v in a.items() if k in ("auto_pad", "dilations", "group", "kernel_shape", "pads", "strides")}
            acc = b.op("ConvInteger", [x.name, wt, zp_x, zp_w], f"{base}_acc", **conv_attrs)
        else:
            acc = b.op("MatMulInteger", [x.name, wt, zp_x, zp_w], f"{base}_acc")
        if mult != 1:
            acc = b.op("Mul", [acc, b.const(f"{base}_m", np.array(mult, np.int32))], f"{base}_accm")
        if rem != 0:
            if pooled is not None:
                box = b.op("ReduceSum", [b.cast(x.name, TensorProto.INT32, f"{base}_x32"),
                                         b.const(f"{base}_box_axes", np.array([1] + pooled.axes, np.int64))],
                           f"{base}_box", keepdims=0)
                if x.zp:
                    raise FuseError(f"{node_label(node)}: 8-bit DoReFa weights after a pooled input with a zero point")
                box = b.op("Unsqueeze", [box, b.const(f"{base}_box_ax1", np.array([1], np.int64))], f"{base}_box2")
            elif op == "Conv":
                grp = int(a.get("group", 1))
                ones_shape = (1,) + w.shape[1:] if grp == 1 else w.shape
                ones = b.const(f"{base}_ones", np.ones(ones_shape, np.uint8))
                zero = b.const(f"{base}_ones_zp", np.array(0, np.uint8))
                box = b.op("ConvInteger", [x.name, ones, zp_x, zero], f"{base}_box", **conv_attrs)
            else:
                x32 = b.cast(x.name, TensorProto.INT32, f"{base}_x32")
                if x.zp:
                    x32 = b.op("Sub", [x32, b.const(f"{base}_xzp32", np.array(x.zp, np.int32))], f"{base}_xc")
                box = b.op("ReduceSum", [x32, b.const(f"{base}_ax", np.array([-1], np.int64))], f"{base}_box", keepdims=1)
            box = b.op("Mul", [box, b.const(f"{base}_rem", np.array(rem, np.int32))], f"{base}_boxm")
            acc = b.op("Add", [acc, box], f"{base}_accw")
        red = tuple(i for i in range(wk.ndim) if i != (0 if op == "Conv" else 1))
        bound = float(np.max(np.sum(np.abs(wk), axis=red))) * x.bound * (pooled.count if pooled else 1)
        if bound > 2**31 - 1:
            raise FuseError(f"{node_label(node)}: its int32 accumulator could overflow (bound {bound:.3g})")
        self.val[out] = Acc([(acc, scale, bound)], bias, cshape, ch_axis)

    def _weighted_qdq(self, node, x: Codes, codes: WeightCodes, wk, scale, bias, cshape, out) -> str:
        """QDQ: DequantizeLinear(x) -> float op with DequantizeLinear(W_int) (BN folded into the scale) + float bias."""
        b, op = self.b, node.op_type
        base = node.name or out
        xf = self._dq(x)
        lo, hi = int(wk.min()), int(wk.max())
        w_axis = 0 if op == "Conv" else 1  # Gemm/MatMul weights are written [K, N]
        wscale = scale / x.scale  # weight step per output channel (BN factor included)
        if -8 <= lo and hi <= 7:
            flat = (wk.reshape(-1) & 0xF).astype(np.uint8)
            if flat.size % 2:
                flat = np.concatenate([flat, np.zeros(1, np.uint8)])
            raw = (flat[0::2] | (flat[1::2] << 4)).astype(np.uint8)
            wq = b.const_typed(f"{base}_w_int4", raw, TensorProto.INT4, list(wk.shape))
        elif -128 <= lo and hi <= 127:
            wq = b.const(f"{base}_w_int8", wk.astype(np.int8))
        else:
            wq = b.const(f"{base}_w_int16", wk.astype(np.int16))
        ws = b.const(f"{base}_w_scale", wscale.astype(np.float32))
        wf = b.op("DequantizeLinear", [wq, ws], f"{base}_w_f", axis=w_axis)
        bconst = b.const(f"{base}_bias", bias.astype(np.float32))
        a = attrs(node)
        if op == "Conv":
            return b.op("Conv", [xf, wf, bconst], out, **a)
        y = b.op("MatMul", [xf, wf], f"{base}_mm")
        return b.op("Add", [y, bconst], out)

    # ------------------------------------------------------------ residuals
    def _add(self, node: onnx.NodeProto) -> None:
        g = self.g
        ins = list(node.input)
        consts = [i for i in ins if i in g.consts]
        if len(consts) == 1:
            v = self._get([i for i in ins if i not in g.consts][0], node)
            if isinstance(v, Acc):
                c = _vec(g.consts[consts[0]])
                self.val[node.output[0]] = Acc(v.terms, v.bias + c, v.cshape, v.axis)
                return
            raise FuseError(f"{node_label(node)}: adding a constant to quantized codes is not supported")
        vals = [self._get(i, node) for i in ins]
        vals = [self._acc_of_pooled(v, f"{node.output[0]}_{k}") if isinstance(v, Pooled) else v for k, v in enumerate(vals)]
        if self.format == "qdq" or any(isinstance(v, Float) for v in vals):
            fl = [self._to_float(v) for v in vals]
            self.val[node.output[0]] = Float(self.b.op("Add", fl, node.output[0]))
            return
        terms, bias, cshape, axis = [], np.zeros(1), (1,), 1
        for v in vals:
            if isinstance(v, Codes):
                terms.append(v.term())
                bias = bias + v.offset()
            else:
                if np.isfinite(v.clip).any():
                    raise FuseError(f"{node_label(node)}: a Relu/Clip inside a residual branch without an activation "
                                    "quantizer has no integer form")
                terms += v.terms
                if len(v.cshape) > len(cshape) or np.prod(v.cshape) > np.prod(cshape):
                    cshape, axis = v.cshape, v.axis
                bias = bias + v.bias
        self.val[node.output[0]] = Acc(terms, np.asarray(bias, np.float64), cshape, axis)

    # --------------------------------------------------------- shape ops
    def _shape_op(self, node: onnx.NodeProto) -> None:
        v = self._get(node.input[0], node)
        b, g = self.b, self.g
        if node.op_type == "MaxPool" and len([o for o in node.output if o]) > 1:
            raise FuseError(f"{node_label(node)}: MaxPool with an Indices output is not supported")
        if isinstance(v, Pooled) and not v.flat and node.op_type == "Flatten" and attrs(node).get("axis", 1) == 1:
            self.val[node.output[0]] = Pooled(v.codes, v.axes, v.count, True)
            return
        if not isinstance(v, (Codes, Float)):
            raise FuseError(f"{node_label(node)}: its input is an integer accumulator (no activation quantizer before it)")
        extra = []
        for i in node.input[1:]:
            if not i:
                extra.append("")
                continue
            if i not in g.consts:
                raise FuseError(f"{node_label(node)}: input '{i}' must be a constant")
            extra.append(b.const(i, g.consts[i]))
        op = "Identity" if node.op_type == "Dropout" else node.op_type
        if op == "Identity":
            extra = []
        out = b.op(op, [v.name] + extra, node.output[0], **({} if node.op_type == "Dropout" else attrs(node)))
        # max pooling and reshaping keep values on the quantization grid
        self.val[node.output[0]] = Codes(out, v.scale, v.r, v.dtype, v.zp) if isinstance(v, Codes) else Float(out, v.grid)

    # ----------------------------------------------------------- float islands
    def _keep_float(self, node: onnx.NodeProto, record: bool = True) -> None:
        g, b = self.g, self.b
        ins = []
        for i in node.input:
            q = g.producer.get(i)
            if not i:
                ins.append("")
            elif i in g.consts:
                ins.append(b.const(i, g.consts[i]))
            elif q is not None and q.domain == DOMAIN and q.input[0] in g.consts:  # fake-quantized weight, as a constant
                ins.append(b.const(i, self._fake_quantized_weight(q)))
            else:
                ins.append(self._to_float(self._get(i, node)))
        outs = [self.b.fresh(o) if o else "" for o in node.output]
        self.b.nodes.append(helper.make_node(node.op_type, ins, outs, name=self.b.fresh(node.name or outs[0]),
                                             domain=node.domain, **attrs(node)))
        for o_old, o_new in zip(node.output, outs):
            if o_old:
                self.val[o_old] = Float(o_new)
        if record:
            self.kept.append(node.name or node.output[0])

    def _fake_quantized_weight(self, q: onnx.NodeProto) -> np.ndarray:
        from onnxqat.ops import reference as ref

        args = [self.g.const(i, q, "input") for i in q.input]
        if q.op_type == "SatWeightQuant":
            return ref.sat_weight_forward(*args)
        return ref.lsq_forward(*args)

    def _dq(self, c: Codes) -> str:
        b = self.b
        s = b.const(f"{c.name}_scale", np.array(c.scale, np.float32))
        zp = b.const(f"{c.name}_zp", np.array(c.zp, helper.tensor_dtype_to_np_dtype(c.dtype)))
        return b.op("DequantizeLinear", [c.name, s, zp], f"{c.name}_dq")

    def _to_float(self, v) -> str:
        if isinstance(v, Pooled):
            v = self._acc_of_pooled(v, f"{v.codes.name}_pool")
        if isinstance(v, Float):
            return v.name
        if isinstance(v, Codes):
            return self._dq(v)
        b = self.b
        if len(v.terms) == 1 and not np.isfinite(v.clip).any():  # int32 codes + DequantizeLinear, as for an output
            out = b.fresh(f"{v.terms[0][0]}_dq")
            self._acc_out(v, out, out, True)
            return out
        parts = []
        for k, (t, sc, _) in enumerate(v.terms):
            tf = b.cast(t, TensorProto.FLOAT, f"{t}_f")
            parts.append(b.op("Mul", [tf, b.const(f"{t}_s", sc.astype(np.float32).reshape(self._shape(v, sc)))], f"{t}_real"))
        y = parts[0]
        for p in parts[1:]:
            y = b.op("Add", [y, p], f"{y}_sum")
        y = b.op("Add", [y, b.const(f"{y}_b", v.bias.astype(np.float32).reshape(self._shape(v, v.bias)))], f"{y}_b")
        if np.isfinite(v.clip).any():
            lo = b.const(f"{y}_lo", np.array(v.clip[0] if np.isfinite(v.clip[0]) else -np.finfo(np.float32).max, np.float32))
            hi = b.const(f"{y}_hi", np.array(v.clip[1] if np.isfinite(v.clip[1]) else np.finfo(np.float32).max, np.float32))
            y = b.op("Clip", [y, lo, hi], f"{y}_clip")
        return y

    def _to_codes(self, v: Float) -> Codes:
        c = v.grid
        b = self.b
        s = b.const(f"{v.name}_scale", np.array(c.scale, np.float32))
        zp = b.const(f"{v.name}_zp", np.array(c.zp, helper.tensor_dtype_to_np_dtype(c.dtype)))
        return Codes(b.op("QuantizeLinear", [v.name, s, zp], f"{v.name}_q"), c.scale, c.r, c.dtype, c.zp)

    @staticmethod
    def _shape(v: Acc, vec: np.ndarray) -> tuple:
        return v.cshape if vec.size > 1 else ()

    # ------------------------------------------------- activation quantizers
    def _requant(self, v, s_out: float, r: int, name: str, zp: int = 0):
        """u = clip(round(v / s_out) + zp, 0, r) (and within a folded Relu/Clip of v)."""
        b = self.b
        if isinstance(v, Pooled):
            v = self._acc_of_pooled(v, f"{name}_pool")
        clip = v.clip if isinstance(v, Acc) else (-np.inf, np.inf)
        lo_u = 0 if not np.isfinite(clip[0]) else int(min(r, max(0, np.round(clip[0] / s_out) + zp)))
        hi_u = r if not np.isfinite(clip[1]) else int(max(lo_u, min(r, np.round(clip[1] / s_out) + zp)))
        if self.format == "qdq" or isinstance(v, Float):
            xf = self._to_float(v)
            lo = b.const(f"{name}_lo", np.array((lo_u - zp) * s_out, np.float32))
            hi = b.const(f"{name}_hi", np.array((hi_u - zp) * s_out, np.float32))
            y = b.op("Clip", [xf, lo, hi], f"{name}_clip")
            # uint8 codes with zero point zp (onnxruntime's QDQ default; its QDQ propagation mishandles int8 codes)
            s = b.const(f"{name}_scale", np.array(s_out, np.float32))
            zq = b.const(f"{name}_zp", np.array(zp, np.uint8))
            q = b.op("QuantizeLinear", [y, s, zq], f"{name}_codes")
            if self.format == "qdq":
                c = Codes(q, s_out, r, TensorProto.UINT8, zp)
                return Float(self._dq(c), grid=c)
            return Codes(q, s_out, r, TensorProto.UINT8, zp)
        if isinstance(v, Codes):
            v = Acc([v.term()], v.offset(), (), 1)
        n = max([t[1].size for t in v.terms] + [v.bias.size])
        cshape = v.cshape if n > 1 else ()
        a = [np.broadcast_to(t[1], (n,)) / s_out for t in v.terms]
        bq = np.broadcast_to(v.bias, (n,)) / s_out + zp
        if self.rescale == "float":
            y = None
            for (t, _, _), ai in zip(v.terms, a):
                tf = b.cast(t, TensorProto.FLOAT, f"{name}_f")
                p = b.op("Mul", [tf, b.const(f"{name}_mult", ai.astype(np.float32).reshape(cshape))], f"{name}_scaled")
                y = p if y is None else b.op("Add", [y, p], f"{name}_sum")
            # Round (half to even) before an odd zero point is added: code = round(v / s_out) + zp
            zo = zp % 2
            y = b.op("Add", [y, b.const(f"{name}_bias", (bq - zo).astype(np.float32).reshape(cshape))], f"{name}_biased")
            y = b.op("Round", [y], f"{name}_round")
            if zo:
                y = b.op("Add", [y, b.const(f"{name}_zp_odd", np.array(zo, np.float32))], f"{name}_zp")
            y = b.op("Clip", [y, b.const(f"{name}_lo", np.array(lo_u, np.float32)),
                              b.const(f"{name}_hi", np.array(hi_u, np.float32))], f"{name}_clip")
            return Codes(b.cast(y, TensorProto.UINT8, f"{name}_codes"), s_out, r, TensorProto.UINT8, zp)
        # fixed point: u = clip(rne(x / 2^sh), lo, hi) with x = sum t_i*m_i + B (zp included), per channel sh >= 1;
        # rne = round half to even, like the quantizers' np.round. With h = 2^(sh-1) and y = x + h:
        # rne(x / 2^sh) = (y - bit_sh(y)) >> sh, bit_sh(y) = floor(y / 2^sh) mod 2 (y >= 0; README.md "Rounding").
        # The code is c + zp: with an odd zp the tie goes to an even c = an odd u, so bit_sh is inverted there.
        amax = np.max(np.abs(np.stack(a)), axis=0)
        sh_max = 62 - math.ceil(math.log2(r + 1)) - 1
        with np.errstate(divide="ignore"):
            sh = np.where(amax > 0, np.floor(PRECISION_BITS - 1 - np.log2(np.where(amax > 0, amax, 1))), 0)
        sh = np.clip(sh, 1, sh_max).astype(np.int64)  # sh >= 1: the half 2^(sh-1) is an integer
        if sh.size > 1 and sh.max() - sh.min() <= 7:  # one shift for the layer: every multiplier keeps >= 20 bits
            sh = np.full_like(sh, sh.min())
        p2 = np.ldexp(1.0, sh)
        m = [np.round(ai * p2).astype(np.int64) for ai in a]
        lim = float(2 ** 61)
        # B' = round(b*2^sh) + 2^(sh-1): the bias with the half of the rounding shift folded in
        bias_fp = np.clip(np.round(bq * p2) + np.ldexp(0.5, sh), -lim, lim).astype(np.int64)
        half = np.int64(1) << (sh - 1)
        # x clipped to [lo 2^sh, hi 2^sh] (y to that + h): the same as clipping the rounded code to [lo, hi]
        hi = (hi_u << sh) + half
        lo = (lo_u << sh) + half
        shape_sh = cshape if np.any(sh != sh.flat[0]) else ()
        sh_c, hi_c, lo_c = (sh, hi, lo) if shape_sh else (sh[:1], hi[:1], lo[:1])
        y = None
        for k, ((t, _, _), mk) in enumerate(zip(v.terms, m)):
            t64 = b.cast(t, TensorProto.INT64, f"{name}_t{k}")
            p = b.op("Mul", [t64, b.const(f"{name}_m{k}", mk.reshape(cshape))], f"{name}_p{k}")
            y = p if y is None else b.op("Add", [y, p], f"{name}_sum")
        y = b.op("Add", [y, b.const(f"{name}_bias", bias_fp.reshape(cshape))], f"{name}_biased")
        lo_t = b.const(f"{name}_lo", lo_c.reshape(shape_sh).astype(np.int64))
        hi_t = b.const(f"{name}_hi", hi_c.reshape(shape_sh).astype(np.int64))
        if shape_sh:  # per-channel upper bounds: Clip takes scalars only
            y = b.op("Min", [b.op("Max", [y, lo_t], f"{name}_relu"), hi_t], f"{name}_sat")
        else:
            y = b.op("Clip", [y, lo_t, hi_t], f"{name}_sat")
        # ties to even, in int64: BitwiseAnd with 2^sh gives 0 or 2^sh, Min with 1 makes it bit_sh(y); y - bit_sh(y)
        shift_t = b.const(f"{name}_shift", sh_c.reshape(shape_sh).astype(np.uint64))
        if shape_sh:  # per-channel 2^sh computed from the shifts (initializers only: onnxruntime folds it), not stored
            one = b.const(f"{name}_one_u64", np.array(1, np.uint64))
            bit_t = b.cast(b.op("BitShift", [one, shift_t], f"{name}_pow2", direction="LEFT"), TensorProto.INT64,
                           f"{name}_bit")
        else:
            bit_t = b.const(f"{name}_bit", (np.int64(1) << sh_c).reshape(shape_sh))
        par = b.op("BitwiseXor", [y, bit_t], f"{name}_flip") if zp % 2 else y
        bit = b.op("Min", [b.op("BitwiseAnd", [par, bit_t], f"{name}_par"),
                           b.const(f"{name}_one", np.array(1, np.int64))], f"{name}_odd")
        y = b.op("Sub", [y, bit], f"{name}_rne")
        y = b.cast(y, TensorProto.UINT64, f"{name}_u64")
        y = b.op("BitShift", [y, shift_t], f"{name}_shr", direction="RIGHT")
        return Codes(b.cast(y, TensorProto.UINT8, f"{name}_codes"), s_out, r, TensorProto.UINT8, zp)

    # ---------------------------------------------------------------- outputs
    def _output(self, name: str) -> OutputInfo:
        b = self.b
        v = self.val.get(name)
        if v is None:
            raise FuseError(f"graph output '{name}' has no integer form")
        if isinstance(v, Pooled):
            v = self._acc_of_pooled(v, f"{name}_pool")
        if isinstance(v, Float) and v.grid is not None and self.format == "qdq":
            c = v.grid
            self._rename(v.name, name)
            return OutputInfo(name, np.array([c.scale]), 1, TensorProto.FLOAT)
        if isinstance(v, Float):
            self._rename(v.name, name)
            unit, axis = v.unit if v.unit is not None else (np.array([0.0]), 1)
            return OutputInfo(name, np.abs(unit), axis, TensorProto.FLOAT)
        if isinstance(v, Codes):
            if self.dequantize_output:
                s = b.const(f"{name}_scale", np.array(v.scale, np.float32))
                zp = b.const(f"{name}_zp", np.array(v.zp, np.uint8))
                b.nodes.append(helper.make_node("DequantizeLinear", [v.name, s, zp], [name], name=b.fresh(f"{name}_dequantize")))
                return OutputInfo(name, np.array([v.scale]), 1, TensorProto.FLOAT)
            self._rename(v.name, name)
            return OutputInfo(name, np.array([v.scale]), 1, v.dtype)
        return self._acc_out(v, name, name, self.dequantize_output)

    def _acc_out(self, v: Acc, name: str, out_name: str, dequantize: bool) -> OutputInfo:
        """Acc -> int32 codes in accumulator steps (c = acc + round(bias/scale)); with dequantize, refined by 2^k so
        the bias keeps 2^-k of a step, then DequantizeLinear to float. The last node writes `out_name`."""
        b = self.b
        if len(v.terms) != 1:
            raise FuseError(f"'{name}' is a sum of branches without an activation quantizer")
        if np.isfinite(v.clip).any():
            raise FuseError(f"'{name}': a Relu/Clip after the last layer without a quantizer is not supported")
        t, sc, bound = v.terms[0]
        n = max(sc.size, v.bias.size)
        sc = np.broadcast_to(sc, (n,)).copy()
        bias = np.broadcast_to(v.bias, (n,))
        sgn = np.where(sc < 0, -1, 1)
        mag = np.abs(sc)
        mag = np.where(mag > 0, mag, np.max(mag) if np.max(mag) > 0 else 1.0)
        bcode = bias / mag
        room = (2 ** 30) / max(bound + np.max(np.abs(bcode)) + 1, 1)
        k = int(max(0, min(16, math.floor(math.log2(room))))) if dequantize else 0
        cshape = v.cshape if n > 1 else ()
        mul = (sgn * (1 << k)).astype(np.int32)
        y = t
        if np.any(mul != 1):
            mul_c = mul.reshape(cshape) if np.any(mul != mul[0]) else mul[:1].reshape(())
            y = b.op("Mul", [t, b.const(f"{name}_mul", mul_c)], f"{name}_acc")
        badd = np.floor(bcode * (1 << k) + 0.5).astype(np.int32)
        out_scale = mag / (1 << k)
        if not dequantize:
            b.nodes.append(helper.make_node("Add", [y, b.const(f"{name}_bias", badd.reshape(cshape))], [out_name],
                                            name=b.fresh(f"{name}_codes")))
            return OutputInfo(out_name, mag, v.axis, TensorProto.INT32)
        y = b.op("Add", [y, b.const(f"{name}_bias", badd.reshape(cshape))], f"{name}_codes")
        if n > 1 and not np.all(out_scale == out_scale[0]):
            s = b.const(f"{name}_scale", out_scale.astype(np.float32))
            zp = b.const(f"{name}_zp", np.zeros(n, np.int32))
            dq_attrs = {"axis": v.axis}
        else:
            s = b.const(f"{name}_scale", np.array(out_scale[0], np.float32))
            zp = b.const(f"{name}_zp", np.array(0, np.int32))
            dq_attrs = {}
        b.nodes.append(helper.make_node("DequantizeLinear", [y, s, zp], [out_name], name=b.fresh(f"{name}_dequantize"),
                                        **dq_attrs))
        return OutputInfo(out_name, mag, v.axis, TensorProto.FLOAT)

    def _rename(self, old: str, new: str) -> None:
        if old == new:
            return
        for n in self.b.nodes:
            for i, o in enumerate(n.output):
                if o == old:
                    n.output[i] = new
            for i, x in enumerate(n.input):
                if x == old:
                    n.input[i] = new

    # ------------------------------------------------------------------ model
    def _model(self, inp, outputs: list[OutputInfo]) -> onnx.ModelProto:
        src = self.g.model
        dims = [d.dim_param or d.dim_value or None for d in inp.type.tensor_type.shape.dim]
        in_type = TensorProto.UINT8 if self.input_type == "uint8" else TensorProto.FLOAT
        graph_inputs = [helper.make_tensor_value_info(inp.name, in_type, dims or None)]
        orig_out = {o.name: o for o in src.graph.output}
        graph_outputs = []
        for o in outputs:
            d = [x.dim_param or x.dim_value or None for x in orig_out[o.name].type.tensor_type.shape.dim]
            graph_outputs.append(helper.make_tensor_value_info(o.name, o.dtype, d or None))
        graph = helper.make_graph(self.b.nodes, f"{src.graph.name or 'model'}_{self.format}", graph_inputs,
                                  graph_outputs, self.b.initializers)
        model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)],
                                  producer_name="onnxqat.fuse", ir_version=IR_VERSION)
        for p in src.metadata_props:
            if p.key.startswith("onnxqat."):
                model.metadata_props.add(key=p.key, value=p.value)
        return model
