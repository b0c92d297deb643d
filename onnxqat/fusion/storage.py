"""Weight storage at the quantizer's bit width.

Codes of 1, 2 or 4 bits (3 -> 4) are packed several to a uint8 initializer and unpacked inside the graph with
BitShift/BitwiseAnd on uint8 (integer ops that onnxruntime 1.19.2, the latest onnxruntime and onnx.reference all run,
unlike Cast from int4), then reshaped. Codes of 5..8 bits are stored one per uint8. The unpacking only reads
initializers, so onnxruntime folds it to a constant when the session is created.
"""

from __future__ import annotations

import numpy as np
from onnx import TensorProto

from onnxqat.fusion.builder import GraphBuilder


def storage_bits(bits: int) -> int:
    for b in (1, 2, 4, 8):
        if bits <= b:
            return b
    raise ValueError(bits)


def pack(u: np.ndarray, sb: int) -> np.ndarray:
    """Pack unsigned codes (< 2**sb) little-end first: element i goes to byte i // per, bits (i % per) * sb."""
    per = 8 // sb
    flat = u.reshape(-1).astype(np.uint8)
    pad = (-flat.size) % per
    flat = np.concatenate([flat, np.zeros(pad, np.uint8)]).reshape(-1, per)
    out = np.zeros(flat.shape[0], np.uint8)
    for j in range(per):
        out |= (flat[:, j] << (j * sb)).astype(np.uint8)
    return out


def unpack_reference(packed: np.ndarray, sb: int, n: int) -> np.ndarray:
    per = 8 // sb
    mask = (1 << sb) - 1
    parts = [(packed >> (j * sb)) & mask for j in range(per)]
    return np.stack(parts, axis=1).reshape(-1)[:n].astype(np.uint8)


def emit_codes(b: GraphBuilder, base: str, u: np.ndarray, bits: int) -> str:
    """A uint8 tensor equal to `u` (same shape), stored at storage_bits(bits) per code."""
    sb = storage_bits(bits)
    if sb == 8:
        return b.const(f"{base}_codes", u.astype(np.uint8))
    per = 8 // sb
    packed = b.const(f"{base}_packed{sb}b", pack(u, sb))
    mask = b.const(f"{base}_mask", np.array(((1 << sb) - 1), np.uint8))
    axis1 = b.const(f"{base}_axis1", np.array([1], np.int64))
    parts = []
    for j in range(per):
        x = packed
        if j:
            sh = b.const(f"{base}_shift{j}", np.array(j * sb, np.uint8))
            x = b.op("BitShift", [packed, sh], f"{base}_shr{j}", direction="RIGHT")
        x = b.op("BitwiseAnd", [x, mask], f"{base}_nib{j}")
        parts.append(b.op("Unsqueeze", [x, axis1], f"{base}_col{j}"))
    cat = b.op("Concat", parts, f"{base}_cat", axis=1)
    flat_shape = b.const(f"{base}_flat", np.array([-1], np.int64))
    flat = b.op("Reshape", [cat, flat_shape], f"{base}_unpacked")
    if u.size % per:
        starts = b.const(f"{base}_s0", np.array([0], np.int64))
        ends = b.const(f"{base}_s1", np.array([u.size], np.int64))
        flat = b.op("Slice", [flat, starts, ends], f"{base}_trim")
    shape = b.const(f"{base}_shape", np.array(u.shape, np.int64))
    return b.op("Reshape", [flat, shape], f"{base}_u")


def emit_scaled_codes(b: GraphBuilder, base: str, u: np.ndarray, bits: int, mult: int) -> str:
    """uint8 tensor mult*u (mult*max(u) <= 255), stored as u at the code's width."""
    if mult == 1:
        return emit_codes(b, base, u, bits)
    if storage_bits(bits) == 8:
        return b.const(f"{base}_codes", (u.astype(np.int64) * mult).astype(np.uint8))
    x = emit_codes(b, base, u, bits)
    x = b.cast(x, TensorProto.INT32, f"{base}_i32")
    m = b.const(f"{base}_mult", np.array(mult, np.int32))
    x = b.op("Mul", [x, m], f"{base}_x{mult}")
    return b.cast(x, TensorProto.UINT8, f"{base}_w")
