"""Minimal reproductions of what stops `fuse` on EfficientNet-Lite0 (one tiny graph per pattern of the real network).

    .venv/bin/python examples/02_efficientnet_lite0_lsq/fuse_blockers.py

Each case: a float ONNX graph (random weights, seed 0) -> insert(recipe lsq8, calibration on 8 random images) ->
fuse(check=False) -> if fuse succeeds, the fused model (stock onnxruntime, uint8 input codes) is compared with the
fake-quantized model (op library). Prints one line per case: OK with the agreement, or the error.
"""

from __future__ import annotations

import warnings

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

RNG = np.random.default_rng(0)


def _w(name, *shape, scale=0.3):
    return numpy_helper.from_array((RNG.standard_normal(shape) * scale).astype(np.float32), name)


def _bn(prefix, c):
    return [numpy_helper.from_array(v.astype(np.float32), f"{prefix}.{k}") for k, v in (
        ("scale", 1 + 0.1 * RNG.standard_normal(c)), ("B", 0.1 * RNG.standard_normal(c)),
        ("mean", 0.1 * RNG.standard_normal(c)), ("var", 1 + 0.1 * RNG.random(c)))]


def _const(name, v):
    return numpy_helper.from_array(np.asarray(v, np.float32), name)


def model(nodes, inits, out_shape=(None, 10)):
    g = helper.make_graph(nodes, "repro", [helper.make_tensor_value_info("image", TensorProto.FLOAT, [None, 3, 8, 8])],
                          [helper.make_tensor_value_info("logits", TensorProto.FLOAT, list(out_shape))], inits)
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])
    onnx.checker.check_model(m)
    return m


def N(op, i, o, name, **kw):
    return helper.make_node(op, i, o, name=name, **kw)


def head(x, c, inits):
    """x [N, c, H, W] codes-friendly head: Relu -> Flatten -> Gemm (no pooling)."""
    inits += [_w("fc.w", 10, c * 64, scale=0.05), _const("fc.b", np.zeros(10))]
    return [N("Relu", [x], ["h_r"], "head_relu"), N("Flatten", ["h_r"], ["h_f"], "head_flat"),
            N("Gemm", ["h_f", "fc.w", "fc.b"], ["logits"], "fc", transB=1)]


def case_baseline():
    """Conv -> BN -> Relu -> Flatten -> Gemm (what fuse is built for)."""
    inits = [_w("c1.w", 8, 3, 3, 3)] + _bn("bn1", 8)
    nodes = [N("Conv", ["image", "c1.w"], ["c1"], "conv1", pads=[1, 1, 1, 1]),
             N("BatchNormalization", ["c1", "bn1.scale", "bn1.B", "bn1.mean", "bn1.var"], ["b1"], "bn1")]
    return model(nodes + head("b1", 8, inits), inits)


def case_input_normalisation():
    """image in [0,1] -> x*(255/128) - 127/128 (EfficientNet-Lite's (pixel-127)/128) -> Conv ..."""
    inits = [_const("n.mul", 255 / 128), _const("n.sub", 127 / 128), _w("c1.w", 8, 3, 3, 3)]
    nodes = [N("Mul", ["image", "n.mul"], ["m"], "norm_mul"), N("Sub", ["m", "n.sub"], ["s"], "norm_sub"),
             N("Conv", ["s", "c1.w"], ["c1"], "conv1", pads=[1, 1, 1, 1])]
    return model(nodes + head("c1", 8, inits), inits)


def case_relu6():
    """Conv -> BN -> Clip(0, 6) (ReLU6) -> Conv: LsqQuant goes after the Clip, the Clip stays in the graph."""
    inits = [_w("c1.w", 8, 3, 3, 3), _const("lo", 0), _const("hi", 6), _w("c2.w", 8, 8, 1, 1)] + _bn("bn1", 8)
    nodes = [N("Conv", ["image", "c1.w"], ["c1"], "conv1", pads=[1, 1, 1, 1]),
             N("BatchNormalization", ["c1", "bn1.scale", "bn1.B", "bn1.mean", "bn1.var"], ["b1"], "bn1"),
             N("Clip", ["b1", "lo", "hi"], ["r1"], "relu6"),
             N("Conv", ["r1", "c2.w"], ["c2"], "conv2")]
    return model(nodes + head("c2", 8, inits), inits)


def case_depthwise():
    """Conv -> Relu -> depthwise Conv (group = channels, 3x3, asymmetric pads [0,0,1,1], stride 2) -> ..."""
    inits = [_w("c1.w", 8, 3, 3, 3), _w("dw.w", 8, 1, 3, 3)]
    nodes = [N("Conv", ["image", "c1.w"], ["c1"], "conv1", pads=[1, 1, 1, 1]), N("Relu", ["c1"], ["r1"], "relu1"),
             N("Conv", ["r1", "dw.w"], ["dw"], "dwconv", group=8, pads=[0, 0, 1, 1], strides=[2, 2])]
    inits += [_w("fc.w", 10, 8 * 16, scale=0.05), _const("fc.b", np.zeros(10))]
    nodes += [N("Relu", ["dw"], ["h_r"], "head_relu"), N("Flatten", ["h_r"], ["h_f"], "head_flat"),
              N("Gemm", ["h_f", "fc.w", "fc.b"], ["logits"], "fc", transB=1)]
    return model(nodes, inits)


def case_linear_bottleneck():
    """MobileNetV2 block: Conv -> Relu -> project Conv -> BN (no activation) -> residual Add -> expand Conv.

    insert (activations.linear) quantizes the Add's two inputs and, signed, its output, which the expand Conv reads
    (the integer model adds the two code tensors in int32 and requantizes the sum)."""
    inits = [_w("c1.w", 8, 3, 3, 3), _w("p.w", 8, 8, 1, 1), _w("e.w", 8, 8, 1, 1)] + _bn("bnp", 8)
    nodes = [N("Conv", ["image", "c1.w"], ["c1"], "conv1", pads=[1, 1, 1, 1]), N("Relu", ["c1"], ["r1"], "relu1"),
             N("Conv", ["r1", "p.w"], ["p"], "project"),
             N("BatchNormalization", ["p", "bnp.scale", "bnp.B", "bnp.mean", "bnp.var"], ["pb"], "bn_project"),
             N("Add", ["pb", "r1"], ["res"], "residual"),
             N("Conv", ["res", "e.w"], ["e"], "expand")]
    return model(nodes + head("e", 8, inits), inits)


def case_global_average_pool():
    """Conv -> Relu -> GlobalAveragePool -> Flatten -> Gemm (the classifier head of every ImageNet CNN).

    insert walks through GlobalAveragePool as if it kept values on the grid and quantizes before it, so the Gemm
    reads averaged codes (off the grid, in the fake-quant model too)."""
    inits = [_w("c1.w", 8, 3, 3, 3), _w("fc.w", 10, 8, scale=0.3), _const("fc.b", np.zeros(10))]
    nodes = [N("Conv", ["image", "c1.w"], ["c1"], "conv1", pads=[1, 1, 1, 1]), N("Relu", ["c1"], ["r1"], "relu1"),
             N("GlobalAveragePool", ["r1"], ["gap"], "gap"), N("Flatten", ["gap"], ["f"], "flat"),
             N("Gemm", ["f", "fc.w", "fc.b"], ["logits"], "fc", transB=1)]
    return model(nodes, inits)


CASES = [case_baseline, case_input_normalisation, case_relu6, case_depthwise, case_linear_bottleneck,
         case_global_average_pool]


def run_case(build, recipe="lsq8") -> str:
    import onnxruntime as ort

    from onnxqat.fusion.api import fuse
    from onnxqat.ops.library import session_options
    from onnxqat.passes.insert import insert

    m = build()
    x = RNG.random((8, 3, 8, 8), dtype=np.float32)
    codes = np.round(x * 255).astype(np.uint8)
    x = codes.astype(np.float32) / 255
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            qat = insert(m, recipe, calibration_data={"image": x})
        except Exception as exc:
            return f"insert fails: {type(exc).__name__}: {exc}"
    note = "; ".join(str(w.message) for w in caught)
    try:
        res = fuse(qat, check=False)
    except Exception as exc:
        return f"fuse fails: {type(exc).__name__}: {exc}" + (f"  [insert warned: {note}]" if note else "")
    so = session_options()
    so.intra_op_num_threads = 1
    fq = ort.InferenceSession(qat.SerializeToString(), so, providers=["CPUExecutionProvider"]).run(None, {"image": x})[0]
    o = ort.SessionOptions()
    o.intra_op_num_threads = 1
    sess = ort.InferenceSession(res.model.SerializeToString(), o, providers=["CPUExecutionProvider"])
    feed = codes if sess.get_inputs()[0].type == "tensor(uint8)" else x
    fused = sess.run(None, {sess.get_inputs()[0].name: feed})[0]
    err = float(np.max(np.abs(fused - fq)))
    agree = int((fused.argmax(1) == fq.argmax(1)).sum())
    return f"OK: fused vs fake-quant max |diff| {err:.3g}, top-1 agreement {agree}/8" + (
        f"  [insert warned: {note}]" if note else "")


def main() -> None:
    from pathlib import Path

    per_channel = str(Path(__file__).resolve().parent / "lsq8_per_channel.toml")
    for build, recipe in [(c, "lsq8") for c in CASES] + [(case_depthwise, per_channel)]:
        name = build.__name__[5:] + ("" if recipe == "lsq8" else " (per-channel)")
        print(f"{name:<26} {build.__doc__.splitlines()[0]}\n{'':<26} -> {run_case(build, recipe)}")


if __name__ == "__main__":
    main()
