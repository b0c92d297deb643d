"""Solvers as in N2D2, done in numpy on ORT's gradients: SGD with momentum and weight decay, AdamW; LR policies.

ORT's own SGD has neither momentum nor decay (training notes), so the loop reads the gradients out of the ORT
checkpoint state, updates a flat float32 copy of the trainable parameters here, and writes it back in one
contiguous copy (Module.copy_buffer_to_parameters).

SGD, momentum_form "n2d2" (N2D2/Caffe, lr inside the momentum buffer):
    v <- momentum * v + lr * (g + decay * w);   w <- w - v
SGD, momentum_form "pytorch" (torch.optim.SGD, lr outside it; the same steps at a constant lr, not under a schedule):
    v <- momentum * v + (g + decay * w);        w <- w - lr * v
AdamW (decoupled decay, PyTorch form):
    m <- b1 m + (1-b1) g;  s <- b2 s + (1-b2) g^2;  w <- w - lr * (m_hat / (sqrt(s_hat) + eps) + decay * w)

Two parameter groups: ordinary parameters (lr, decay) and quantizer parameters (SAT alpha, LSQ step) with their own
learning rate and decay (N2D2's QActSolver / QWeightSolver), both following the same policy. Normalization parameters
(BatchNormalization and LayerNorm scale and shift) can have their own decay (norm_decay: 0 keeps weight decay off them,
as the usual PyTorch recipes do; None: the decay of ordinary parameters).

Quantizer parameters stay positive: after every update each quantizer element is clamped to its floor,
max(QUANT_FLOOR_FRACTION * |initial value|, QUANT_FLOOR_MIN) (see quantizer_floor): a high quantizer learning rate can
otherwise push an LSQ step or a SAT alpha to <= 0, where the ops refuse it ("must be finite and > 0"). The floor is a
fraction of the initial value (1e-3) so that it scales with the parameter; 1e-8 bounds it for an initial value of 0.

Gradient accumulation (N2D2 IterationSize): gradients of `iteration_size` physical batches are summed by ORT (the
gradient buffers are reset lazily only before the first one) and divided by iteration_size here, so with the mean
cross-entropy a batch of 64 with iteration size 2 gives the gradient of one batch of 128 (N2D2 divides its rate by
batch size x IterationSize: the same average). BatchNorm statistics are still those of each physical batch.
"""

from __future__ import annotations

import math

import numpy as np

from onnxqat.errors import RecipeError

POLICIES = ("none", "cosine", "step")
MOMENTUM_FORMS = ("n2d2", "pytorch")
_POLICY_ALIASES = {"none": "none", "constant": "none", "cosine": "cosine", "cosinedecay": "cosine",
                   "cosine-decay": "cosine", "step": "step", "stepdecay": "step", "step-decay": "step"}


def normalize_policy(policy: str) -> str:
    key = str(policy).replace("_", "").lower() if policy else "none"
    key = _POLICY_ALIASES.get(key, _POLICY_ALIASES.get(str(policy).lower()))
    if key is None:
        raise RecipeError(f"unknown learning-rate policy {policy!r} (none, cosine, step)")
    return key


class LRSchedule:
    """Learning rate at optimizer update `step` (0-based).

    warmup: linear from lr/warmup_steps to lr over the first warmup_steps updates (N2D2 WarmUpDuration);
    none: constant; cosine: lr_min + (lr - lr_min) (1 + cos(pi t / T)) / 2 with t, T counted after the warmup
    (N2D2 CosineDecay); step: lr * gamma^floor(t / step_size) (N2D2 StepDecay).
    """

    def __init__(self, lr: float, policy: str = "none", total_steps: int = 1, warmup_steps: int = 0,
                 step_size: int | None = None, gamma: float = 0.1, lr_min: float = 0.0):
        if lr < 0:
            raise RecipeError(f"learning rate must be >= 0, got {lr}")
        self.lr, self.policy = float(lr), normalize_policy(policy)
        self.total_steps, self.warmup_steps = max(1, int(total_steps)), max(0, int(warmup_steps))
        self.step_size = int(step_size) if step_size else max(1, (self.total_steps - self.warmup_steps) // 3)
        self.gamma, self.lr_min = float(gamma), float(lr_min)

    def __call__(self, step: int) -> float:
        if step < self.warmup_steps:
            return self.lr * (step + 1) / self.warmup_steps
        t = step - self.warmup_steps
        if self.policy == "none":
            return self.lr
        if self.policy == "step":
            return self.lr * self.gamma ** (t // self.step_size)
        span = max(1, self.total_steps - self.warmup_steps)
        return self.lr_min + (self.lr - self.lr_min) * 0.5 * (1.0 + math.cos(math.pi * min(t, span) / span))


QUANT_FLOOR_FRACTION = 1e-3
QUANT_FLOOR_MIN = 1e-8


def quantizer_floor(w0: np.ndarray, quant_mask: np.ndarray) -> np.ndarray:
    """Lower bounds of the quantizer elements of `w0` (the initial flat parameters), in mask order:
    max(QUANT_FLOOR_FRACTION * |w0|, QUANT_FLOOR_MIN), float32."""
    q = np.abs(np.asarray(w0, np.float32)[np.asarray(quant_mask, bool)])
    return np.maximum(np.float32(QUANT_FLOOR_FRACTION) * q, np.float32(QUANT_FLOOR_MIN)).astype(np.float32)


class Solver:
    """Updates a flat parameter vector in place. `quant_mask` marks the quantizer-parameter elements; after every
    update they are clamped to `quant_floor` (one value per quantizer element, in mask order, or a scalar; None:
    no clamp; the training loop passes quantizer_floor(initial parameters))."""

    def __init__(self, kind: str, size: int, quant_mask: np.ndarray | None = None, momentum: float = 0.9,
                 decay: float = 0.0, quantizer_decay: float | None = None, betas=(0.9, 0.999), eps: float = 1e-8,
                 quant_floor: np.ndarray | float | None = None, norm_mask: np.ndarray | None = None,
                 norm_decay: float | None = None, momentum_form: str = "n2d2"):
        kind = str(kind).lower()
        if kind not in ("sgd", "adamw"):
            raise RecipeError(f"unknown solver {kind!r} (sgd, adamw)")
        if not 0.0 <= momentum < 1.0:
            raise RecipeError(f"momentum must be in [0, 1), got {momentum}")
        if decay < 0 or any(d is not None and d < 0 for d in (quantizer_decay, norm_decay)):
            raise RecipeError("weight decay must be >= 0")
        if momentum_form not in MOMENTUM_FORMS:
            raise RecipeError(f"unknown momentum_form {momentum_form!r} ({', '.join(MOMENTUM_FORMS)})")
        self.kind, self.size, self.momentum_form = kind, int(size), momentum_form
        self.momentum, self.betas, self.eps = float(momentum), (float(betas[0]), float(betas[1])), float(eps)
        self.quant_mask = np.zeros(size, bool) if quant_mask is None else np.asarray(quant_mask, bool)
        qd = decay if quantizer_decay is None else quantizer_decay
        self.decay_vec = np.where(self.quant_mask, np.float32(qd), np.float32(decay)).astype(np.float32)
        if norm_mask is not None and norm_decay is not None:
            self.decay_vec[np.asarray(norm_mask, bool) & ~self.quant_mask] = np.float32(norm_decay)
        self.has_quant = bool(self.quant_mask.any())
        self.quant_idx = np.nonzero(self.quant_mask)[0] if quant_floor is not None else np.zeros(0, np.int64)
        self.quant_floor = np.broadcast_to(np.asarray(quant_floor if quant_floor is not None else 0, np.float32),
                                           self.quant_idx.shape).copy()
        if quant_floor is not None and not np.all(self.quant_floor > 0):
            raise RecipeError("the quantizer parameter floor must be > 0")
        self.t = 0
        self.buf = np.zeros(size, np.float32)  # SGD momentum / Adam first moment
        self.buf2 = np.zeros(size, np.float32) if kind == "adamw" else None

    def _lr_vec(self, lr: float, qlr: float):
        if not self.has_quant or lr == qlr:
            return np.float32(lr)
        return np.where(self.quant_mask, np.float32(qlr), np.float32(lr)).astype(np.float32)

    def step(self, w: np.ndarray, g: np.ndarray, lr: float, qlr: float | None = None) -> None:
        self._update(w, g, lr, qlr)
        if self.quant_idx.size:
            w[self.quant_idx] = np.maximum(w[self.quant_idx], self.quant_floor)

    def _update(self, w: np.ndarray, g: np.ndarray, lr: float, qlr: float | None) -> None:
        lrv = self._lr_vec(lr, lr if qlr is None else qlr)
        self.t += 1
        if self.kind == "sgd":
            d = g + self.decay_vec * w
            if not self.momentum:
                w -= lrv * d
            elif self.momentum_form == "pytorch":
                self.buf *= np.float32(self.momentum)
                self.buf += d
                w -= lrv * self.buf
            else:
                self.buf *= np.float32(self.momentum)
                self.buf += lrv * d
                w -= self.buf
            return
        b1, b2 = self.betas
        self.buf *= np.float32(b1)
        self.buf += np.float32(1 - b1) * g
        self.buf2 *= np.float32(b2)
        self.buf2 += np.float32(1 - b2) * g * g
        mhat = self.buf / np.float32(1 - b1 ** self.t)
        shat = self.buf2 / np.float32(1 - b2 ** self.t)
        w -= lrv * (mhat / (np.sqrt(shat) + np.float32(self.eps)) + self.decay_vec * w)

    def state_dict(self) -> dict:
        d = {"solver.t": np.array(self.t, np.int64), "solver.buf": self.buf}
        if self.buf2 is not None:
            d["solver.buf2"] = self.buf2
        return d

    def load_state_dict(self, d: dict) -> None:
        if d["solver.buf"].shape != self.buf.shape:
            raise RecipeError("the checkpoint's solver state does not match this model's parameters")
        self.t = int(d["solver.t"])
        self.buf = np.array(d["solver.buf"], np.float32)
        if self.buf2 is not None:
            self.buf2 = np.array(d["solver.buf2"], np.float32)
