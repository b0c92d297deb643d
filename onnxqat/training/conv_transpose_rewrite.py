"""ConvTranspose for training: onnxruntime-training 1.19.2 builds ConvTransposeGrad but has no CPU kernel for it.

A transposed convolution is a convolution of the input spread out by the stride (s-1 zeros between samples) with the
kernel flipped in space and its in/out channel axes swapped (per group):
    ConvTranspose(x, W[Cin, Cout/g, k..], B) = Conv(spread(x), W', B, pads = d(k-1) - p_begin, d(k-1) - p_end + op,
                                                   dilations = d, group = g)
    W' = flip_space(W) regrouped to [Cout, Cin/g, k..]   (computed in the graph from W, so W keeps training)
spread(x): Reshape [N, C, H, 1, W, 1] - Pad (s-1 zeros after each sample) - Reshape [N, C, H s, W s] - Slice off
the trailing s-1. A negative Conv pad (p > d(k-1)) becomes a Slice of the spread input. Every op has a gradient.
Needs the input's channel and spatial dims known; `output_shape` / `auto_pad` are turned into explicit pads.
"""

from __future__ import annotations

import numpy as np
from onnx import helper

from onnxqat.errors import TrainingError


def _attr(node, name, default):
    for a in node.attribute:
        if a.name == name:
            v = helper.get_attribute_value(a)
            return v.decode() if isinstance(v, bytes) else v
    return default


def rewrite_conv_transpose(ctx, node) -> list:
    x, w = node.input[0], node.input[1]
    bias = node.input[2] if len(node.input) > 2 and node.input[2] else None
    in_shape = ctx.static_shape(node, x, slice(1, None))
    nd = len(in_shape) - 2
    w_shape = ctx.shapes.get(w)
    if w_shape is None or any(d is None for d in w_shape):
        raise TrainingError(f"ConvTranspose node {node.name}: the weight's shape is not known")
    g = int(_attr(node, "group", 1))
    cin, cout_g, ks = w_shape[0], w_shape[1], list(w_shape[2:])
    s = list(_attr(node, "strides", [1] * nd))
    d = list(_attr(node, "dilations", [1] * nd))
    op = list(_attr(node, "output_padding", [0] * nd))
    pads = list(_attr(node, "pads", [0] * (2 * nd)))
    auto_pad = _attr(node, "auto_pad", "NOTSET")
    out_shape = _attr(node, "output_shape", None)
    if out_shape or auto_pad not in ("NOTSET", ""):
        out_sp = list(out_shape)[-nd:] if out_shape else None
        if out_sp is None:
            if auto_pad == "VALID":
                out_sp = [s[i] * (in_shape[2 + i] - 1) + op[i] + (ks[i] - 1) * d[i] + 1 for i in range(nd)]
            else:
                out_sp = [in_shape[2 + i] * s[i] for i in range(nd)]
        total = [s[i] * (in_shape[2 + i] - 1) + op[i] + (ks[i] - 1) * d[i] + 1 - out_sp[i] for i in range(nd)]
        if auto_pad == "SAME_UPPER":  # the ONNX spec's split of the total padding
            pads = [t // 2 for t in total] + [t - t // 2 for t in total]
        else:
            pads = [t - t // 2 for t in total] + [t // 2 for t in total]
    nodes = []
    # --- W' : flip the spatial axes, swap in/out channels per group
    cur = w
    for a in range(2, 2 + nd):
        out = ctx.name(node, f"w_flip{a}")
        idx = ctx.const(node, f"flip{a}", np.arange(ks[a - 2])[::-1].copy(), np.int64)
        nodes.append(helper.make_node("Gather", [cur, idx], [out], axis=a))
        cur = out
    if g == 1:
        wt = ctx.name(node, "w_swapped")
        nodes.append(helper.make_node("Transpose", [cur], [wt], perm=[1, 0] + list(range(2, 2 + nd))))
    else:
        r1, t1, wt = ctx.name(node, "w_groups"), ctx.name(node, "w_groups_t"), ctx.name(node, "w_swapped")
        nodes += [helper.make_node("Reshape", [cur, ctx.const(node, "wg_shape", [g, cin // g, cout_g, *ks], np.int64)],
                                   [r1]),
                  helper.make_node("Transpose", [r1], [t1], perm=[0, 2, 1] + list(range(3, 3 + nd))),
                  helper.make_node("Reshape", [t1, ctx.const(node, "w_shape", [g * cout_g, cin // g, *ks], np.int64)],
                                   [wt])]
    # --- spread x by the stride
    xs = x
    if any(v > 1 for v in s):
        sp = list(in_shape[2:])
        inter = [0, in_shape[1]] + [v for k in range(nd) for v in (sp[k], 1)]
        r1, pd, r2, sl = (ctx.name(node, k) for k in ("x_split", "x_padded", "x_spread_full", "x_spread"))
        pad_begin = [0] * (2 + 2 * nd)
        pad_end = [0, 0] + [v for k in range(nd) for v in (0, s[k] - 1)]
        nodes += [helper.make_node("Reshape", [x, ctx.const(node, "x_inter", inter, np.int64)], [r1]),
                  helper.make_node("Pad", [r1, ctx.const(node, "x_pads", pad_begin + pad_end, np.int64)], [pd]),
                  helper.make_node("Reshape", [pd, ctx.const(node, "x_full", [0, in_shape[1]] +
                                                             [sp[k] * s[k] for k in range(nd)], np.int64)], [r2]),
                  helper.make_node("Slice", [r2, ctx.const(node, "sl_start", [0] * nd, np.int64),
                                             ctx.const(node, "sl_end", [(sp[k] - 1) * s[k] + 1 for k in range(nd)],
                                                       np.int64),
                                             ctx.const(node, "sl_axes", list(range(2, 2 + nd)), np.int64)], [sl])]
        xs = sl
    # --- conv pads; negative ones crop the spread input
    begin = [d[k] * (ks[k] - 1) - pads[k] for k in range(nd)]
    end = [d[k] * (ks[k] - 1) - pads[nd + k] + op[k] for k in range(nd)]
    if any(v < 0 for v in begin + end):
        spread = [(in_shape[2 + k] - 1) * s[k] + 1 for k in range(nd)]
        crop = ctx.name(node, "x_cropped")
        starts = ctx.const(node, "crop_start", [max(0, -v) for v in begin], np.int64)
        ends = ctx.const(node, "crop_end", [spread[k] - max(0, -end[k]) for k in range(nd)], np.int64)
        axes = ctx.const(node, "crop_axes", list(range(2, 2 + nd)), np.int64)
        nodes.append(helper.make_node("Slice", [xs, starts, ends, axes], [crop]))
        xs = crop
        begin, end = [max(0, v) for v in begin], [max(0, v) for v in end]
    conv_in = [xs, wt] + ([bias] if bias else [])
    nodes.append(helper.make_node("Conv", conv_in, [node.output[0]], kernel_shape=ks, pads=begin + end,
                                  dilations=d, group=g, strides=[1] * nd))
    return nodes
