"""Image-like random inputs for the corpus (numpy only; imported by the export script inside the export venv too).

Uniform noise is a poor stand-in for images: after global pooling every noise image gives the same features,
so a classifier's logits hardly vary over a batch. These are smooth images instead: per sample and channel a
random brightness plus a few random low-frequency waves and a little pixel noise, clipped to the value range.
"""

from __future__ import annotations

import numpy as np


def image_like(rng: np.random.Generator, batch: int, c: int, h: int, w: int) -> np.ndarray:
    """[batch, c, h, w] float32 in [0, 1]."""
    yy, xx = np.meshgrid(np.linspace(0, 1, h), np.linspace(0, 1, w), indexing="ij")
    img = rng.uniform(0.2, 0.8, (batch, c, 1, 1)) + np.zeros((batch, c, h, w))
    for _ in range(3):
        amp = rng.uniform(0.05, 0.3, (batch, c, 1, 1))
        fy, fx = rng.uniform(-4, 4, (2, batch, 1, 1, 1))
        phase = rng.uniform(0, 2 * np.pi, (batch, c, 1, 1))
        img += amp * np.sin(2 * np.pi * (fy * yy + fx * xx) + phase)
    img += 0.03 * rng.standard_normal(img.shape)
    return np.clip(img, 0.0, 1.0).astype(np.float32)


def sample_inputs(spec, batch: int, rng: np.random.Generator) -> list[np.ndarray]:
    """One array per input of `spec` (a catalog.Spec): images for NCHW/NHWC data inputs, uniform otherwise."""
    xs = []
    for i in spec.inputs:
        lo, hi = i.value_range
        dims = tuple(i.shape[1:])
        if i.role == "data" and i.layout in ("NCHW", "NHWC") and len(dims) == 3:
            c, h, w = dims if i.layout == "NCHW" else (dims[2], dims[0], dims[1])
            x = image_like(rng, batch, c, h, w)
            if i.layout == "NHWC":
                x = x.transpose(0, 2, 3, 1)
        else:
            x = rng.random((batch,) + dims)
        xs.append(np.ascontiguousarray(lo + (hi - lo) * x, dtype=np.float32))
    return xs
