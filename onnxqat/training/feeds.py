"""From a batch of data to the feeds of every graph input of the training graph.

- the data input gets the batch in the model's layout: Batches yields images NCHW; a 4-D input whose last dim is a
  channel count (1-4) and whose dim 1 is not is NHWC (Keras/TF exports), and gets the batch transposed; inputs of
  other ranks get the arrays as they are;
- every other model input gets its per-sample array from the data (an .npz array named after the input), or a
  constant (API `inputs={name: value}`, CLI `--input name=value`): a value shaped like one sample is repeated over
  the batch, a scalar fills the input's shape, a value of the input's full rank is given as it is;
- `labels` for cross-entropy, and for distillation `<tensor>.target` from the teacher run on the same model inputs.
"""

from __future__ import annotations

import numpy as np

from onnxqat.errors import DataError

CHANNEL_COUNTS = (1, 2, 3, 4)


def input_layout(dims: tuple) -> str:
    """NCHW, NHWC (4-D image inputs) or 'raw' (anything else)."""
    if len(dims) != 4:
        return "raw"
    if dims[3] in CHANNEL_COUNTS and dims[1] not in CHANNEL_COUNTS:
        return "NHWC"
    return "NCHW"


def image_size(dims: tuple) -> tuple[int | None, int | None, int | None]:
    """(C, H, W) the model input expects (None where symbolic)."""
    if input_layout(dims) == "NHWC":
        return dims[3], dims[1], dims[2]
    return dims[1], dims[2], dims[3]


class Feeder:
    def __init__(self, plan, constants: dict | None = None, teacher=None):
        self.plan = plan
        self.teacher = teacher
        self.layout = input_layout(plan.input_shape)
        self.constants = {}
        for name, value in (constants or {}).items():
            if name not in plan.input_shapes:
                raise DataError(f"--input {name}: not a model input (inputs: {', '.join(plan.input_shapes)})")
            if name == plan.input_name:
                raise DataError(f"--input {name}: that input takes the data")
            self.constants[name] = np.asarray(value)

    def _constant(self, name: str, n: int) -> np.ndarray:
        v = self.constants[name]
        dims = self.plan.input_shapes[name]
        dtype = self.plan.input_types[name]
        if v.ndim == len(dims):
            if v.ndim and dims[0] is None and v.shape[0] == 1 and n > 1:
                v = np.broadcast_to(v, (n, *v.shape[1:]))
            return np.ascontiguousarray(v, dtype=dtype)
        if v.ndim == len(dims) - 1:
            return np.ascontiguousarray(np.broadcast_to(v, (n, *v.shape)), dtype=dtype)
        if v.ndim == 0:
            shape = [n if (k == 0 and d is None) else d for k, d in enumerate(dims)]
            if any(d is None for d in shape):
                raise DataError(f"--input {name}: a scalar cannot fill input {name} of shape "
                                f"{['?' if d is None else d for d in dims]} (give an array)")
            return np.full(shape, v, dtype=dtype)
        raise DataError(f"--input {name}: value of shape {list(v.shape)} fits neither input {name} "
                        f"{['?' if d is None else d for d in dims]} nor one sample of it")

    def model_inputs(self, x: np.ndarray, extras: dict | None = None) -> dict[str, np.ndarray]:
        """Feeds of the model's own inputs for one batch (x: NCHW images, or raw arrays)."""
        if self.layout == "NHWC" and x.ndim == 4:
            x = np.transpose(x, (0, 2, 3, 1))
        feeds = {self.plan.input_name: np.ascontiguousarray(x, dtype=self.plan.input_types[self.plan.input_name])}
        n = x.shape[0]
        extras = extras or {}
        for name in self.plan.io.extra_inputs:
            if name in self.constants:
                feeds[name] = self._constant(name, n)
            elif name in extras:
                feeds[name] = np.ascontiguousarray(extras[name], dtype=self.plan.input_types[name])
            else:
                raise DataError(f"model input {name} gets nothing: give it an array in the .npz (named {name}) or a "
                                f"constant (--input {name}=VALUE)")
        return feeds

    def __call__(self, x, y, extras=None) -> dict[str, np.ndarray]:
        feeds = self.model_inputs(x, extras)
        if self.plan.io.uses_labels:
            if y is None:
                raise DataError("the loss reads labels and the data has none")
            feeds["labels"] = np.asarray(y, np.int64)
        if self.plan.io.needs_teacher:
            targets = self.teacher(feeds)
            for t in self.plan.io.terms:
                if t.kind != "ce":
                    feeds[t.target] = targets[t.tensor]
        return feeds
