"""A PNG picture of an ONNX graph: nodes in layers, coloured by what they compute.

Drawn with Pillow so that no Graphviz install is needed. Layers are the longest
path from the inputs; within a layer nodes keep graph order. Good for the
graphs onnxqat produces (chains with residual branches), not for thousands of
nodes (those are cut off with a note).
"""

from __future__ import annotations

import io
import os
from collections import defaultdict

import onnx
from PIL import Image, ImageDraw, ImageFont

from onnxqat.files import atomic_write_bytes

_INTEGER_TYPES = {
    onnx.TensorProto.INT8, onnx.TensorProto.UINT8, onnx.TensorProto.INT16, onnx.TensorProto.UINT16,
    onnx.TensorProto.INT32, onnx.TensorProto.UINT32, onnx.TensorProto.INT64, onnx.TensorProto.UINT64,
    onnx.TensorProto.INT4, onnx.TensorProto.UINT4,
}

# Fill colours: integer arithmetic, float arithmetic, quantizers, glue.
_COLOURS = {
    "integer": (198, 232, 198),
    "float": (250, 214, 165),
    "quantizer": (214, 200, 245),
    "glue": (225, 225, 225),
}
_GLUE_OPS = {"Reshape", "Flatten", "Transpose", "Cast", "Shape", "Gather", "Unsqueeze", "Squeeze", "Concat", "Pad",
             "Identity", "Constant", "BitShift", "BitwiseAnd", "DequantizeLinear", "QuantizeLinear"}

BOX_W, BOX_H, GAP_X, GAP_Y, MARGIN = 210, 46, 24, 30, 30
MAX_NODES = 400


def _font(size: int):
    try:
        return ImageFont.truetype("DejaVuSans.ttf", size)
    except OSError:
        return ImageFont.load_default()


def _tensor_types(model: onnx.ModelProto) -> dict[str, int]:
    try:
        inferred = onnx.shape_inference.infer_shapes(model)
    except Exception:  # custom ops without schemas: keep what is declared
        inferred = model
    g = inferred.graph
    types = {init.name: init.data_type for init in g.initializer}
    for vi in list(g.input) + list(g.output) + list(g.value_info):
        if vi.type.HasField("tensor_type"):
            types[vi.name] = vi.type.tensor_type.elem_type
    return types


def _kind(node: onnx.NodeProto, types: dict[str, int]) -> str:
    if node.domain == "com.onnxqat":
        return "quantizer"
    if node.op_type in _GLUE_OPS:
        return "glue"
    out_type = types.get(node.output[0]) if node.output else None
    return "integer" if out_type in _INTEGER_TYPES else "float"


def _data_nodes(model: onnx.ModelProto) -> list[onnx.NodeProto]:
    """Nodes that compute on data; nodes that only make parameters (Constant, ConstantOfShape of weights) are left out."""
    initializers = {i.name for i in model.graph.initializer}
    graph_inputs = {i.name for i in model.graph.input if i.name not in initializers}
    on_data: set[str] = set(graph_inputs)
    kept = []
    for n in model.graph.node:
        if n.op_type in ("Constant", "ConstantOfShape"):
            continue
        if any(t in on_data for t in n.input):
            kept.append(n)
            on_data.update(n.output)
    return kept


def _layers(nodes: list[onnx.NodeProto]) -> list[int]:
    producer = {}
    for i, n in enumerate(nodes):
        for o in n.output:
            producer[o] = i
    depth = [0] * len(nodes)
    for i, n in enumerate(nodes):  # nodes are topologically sorted in a valid ONNX graph
        preds = [producer[t] for t in n.input if t in producer and producer[t] < i]
        depth[i] = 1 + max((depth[p] for p in preds), default=-1)
    return depth


def render_graph(model: onnx.ModelProto | str, path: str, title: str | None = None) -> str:
    """Writes a PNG of the model's graph to `path` (atomically) and returns the path."""
    if isinstance(model, (str, os.PathLike)):
        model = onnx.load(str(model))
    nodes = _data_nodes(model)
    truncated = len(nodes) > MAX_NODES
    nodes = nodes[:MAX_NODES]
    types = _tensor_types(model)
    depth = _layers(nodes)
    by_layer: dict[int, list[int]] = defaultdict(list)
    for i, d in enumerate(depth):
        by_layer[d].append(i)
    n_layers = max(by_layer) + 1 if by_layer else 1
    width_slots = max((len(v) for v in by_layer.values()), default=1)
    header = 60
    legend_h = 40
    width = max(2 * MARGIN + width_slots * (BOX_W + GAP_X), 700)
    height = header + 2 * MARGIN + n_layers * (BOX_H + GAP_Y) + legend_h
    img = Image.new("RGB", (width, height), "white")
    draw = ImageDraw.Draw(img)
    f_title, f_op, f_small = _font(18), _font(14), _font(11)
    draw.text((MARGIN, 15), title or model.graph.name or "model", fill="black", font=f_title)

    centres = {}
    for layer, members in by_layer.items():
        row_w = len(members) * (BOX_W + GAP_X) - GAP_X
        x0 = (width - row_w) // 2
        y = header + MARGIN + layer * (BOX_H + GAP_Y)
        for k, i in enumerate(members):
            x = x0 + k * (BOX_W + GAP_X)
            centres[i] = (x, y)

    producer = {o: i for i, n in enumerate(nodes) for o in n.output}
    for i, n in enumerate(nodes):
        for t in n.input:
            p = producer.get(t)
            if p is None or p not in centres:
                continue
            (px, py), (cx, cy) = centres[p], centres[i]
            draw.line([(px + BOX_W // 2, py + BOX_H), (cx + BOX_W // 2, cy)], fill=(90, 90, 90), width=2)

    for i, n in enumerate(nodes):
        x, y = centres[i]
        kind = _kind(n, types)
        draw.rounded_rectangle([x, y, x + BOX_W, y + BOX_H], radius=8, fill=_COLOURS[kind], outline="black")
        draw.text((x + 8, y + 5), n.op_type, fill="black", font=f_op)
        out_t = types.get(n.output[0]) if n.output else None
        dtype = onnx.helper.tensor_dtype_to_np_dtype(out_t).name if out_t else "?"
        label = (n.name or n.output[0])[:30]
        draw.text((x + 8, y + 25), f"{label}  -> {dtype}", fill=(40, 40, 40), font=f_small)

    ly = height - legend_h + 8
    lx = MARGIN
    for kind, colour in _COLOURS.items():
        draw.rectangle([lx, ly, lx + 18, ly + 18], fill=colour, outline="black")
        draw.text((lx + 24, ly + 2), kind, fill="black", font=f_small)
        lx += 120
    if truncated:
        draw.text((lx, ly + 2), f"(first {MAX_NODES} nodes shown)", fill="black", font=f_small)

    png = io.BytesIO()
    img.save(png, format="PNG")
    atomic_write_bytes(path, png.getvalue())
    return path
