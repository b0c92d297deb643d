"""PyTorch eager reference for the LeNet benchmarks: example 01's network with onnxqat's quantizer math written out
independently in torch (autograd Functions from docs / quantizer-math.md), trained with torch.optim.SGD.

It is what bench/accuracy_schedule.py and bench/train_lenet.py compare onnxqat with. It needs torch (and onnx, numpy;
not onnxruntime), so it also runs in the export environment:

    .venv-export/bin/python bench/torch_reference.py --mode fp32 --init lenet.onnx --epochs 50 --out fp32.onnx.npz

Modes: fp32; lsq4 (recipe lsq4: LSQ weights [-8, 7], first/last layer [-128, 127], LSQ activations [0, 15] after each
ReLU); sat4 (recipe sat4: DoReFa weights R = 15, first/last R = 255, scale-adjusted (ApplyScaling) on the fully
connected layers; CG-PACT activations R = 15 in place of each ReLU). Initial values as onnxqat's: weights from an
ONNX model (onnxqat's LeNet builder or a trained FP32 stage), LSQ weight steps 2 mean|W| / sqrt(Qp), activation
steps 2 <|x|> / sqrt(Qp) and SAT alphas the 99.99th percentile of the float model's activations on the first 256
training images in dataset order. Data: onnxqat's loader with the same seed, so both sides see the same batches.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

MODES = ("fp32", "lsq4", "sat4")
LAYERS = ("c1", "c2", "c3", "f1", "f2")
WEIGHT_RANGE = {"c1": 255, "c2": 15, "c3": 15, "f1": 15, "f2": 255}  # first and last layer 8-bit
ACT_RANGE = 15
# torch name -> onnxqat LeNet initializer name
ONNX_NAMES = {"c1.weight": "conv1.weight", "c2.weight": "conv2.weight", "c3.weight": "conv3.weight",
              "f1.weight": "fc1.weight", "f1.bias": "fc1.bias", "f2.weight": "fc2.weight", "f2.bias": "fc2.bias",
              **{f"b{i}.{t}": f"bn{i}.{o}" for i in (1, 2, 3)
                 for t, o in (("weight", "scale"), ("bias", "B"), ("running_mean", "mean"), ("running_var", "var"))}}


class Lsq(torch.autograd.Function):
    """v_hat = s round(clip(v/s, Qn, Qp)); dv = dy strictly inside (Qn, Qp); ds = g sum dy (Qn | Qp | round - v/s)."""

    @staticmethod
    def forward(ctx, v, s, qn: float, qp: float, g: float):
        vs = v / s
        ctx.save_for_backward(vs)
        ctx.qn, ctx.qp, ctx.g = qn, qp, g
        return torch.round(torch.clamp(vs, qn, qp)) * s

    @staticmethod
    def backward(ctx, dy):
        (vs,) = ctx.saved_tensors
        qn, qp = ctx.qn, ctx.qp
        inside = (vs > qn) & (vs < qp)
        local = torch.where(vs <= qn, torch.full_like(vs, qn),
                            torch.where(vs >= qp, torch.full_like(vs, qp), torch.round(vs) - vs))
        return dy * inside, (ctx.g * (dy * local).sum()).reshape(1), None, None, None


class SatWeight(torch.autograd.Function):
    """DoReFa: t = tanh(W), u = (t/M + 1)/2, Wq = 2 round(R u)/R - 1, optionally / sqrt(fan_out Var(Wq));
    dW = dWq sech^2(W) / (M S) with M, S constants and the rounding straight-through."""

    @staticmethod
    def forward(ctx, w, r: int, fan_out: int):
        t = torch.tanh(w)
        m = t.abs().max()
        wq = 2.0 * torch.round(r * (t / m + 1.0) / 2.0) / r - 1.0
        s = torch.sqrt(fan_out * wq.var(unbiased=True)) if fan_out else torch.ones((), dtype=w.dtype)
        ctx.save_for_backward(w, m, s)
        return wq / s

    @staticmethod
    def backward(ctx, dy):
        w, m, s = ctx.saved_tensors
        return dy / torch.cosh(w) ** 2 / (m * s), None, None


class SatAct(torch.autograd.Function):
    """CG-PACT: a = |alpha|, y = a round(R clip(x, 0, a)/a)/R; dx = dy 1[0 < x <= a];
    dalpha = sign(alpha) sum dy (1 if x >= a; round(R x/a)/R - x/a if 0 < x < a; 0 if x <= 0)."""

    @staticmethod
    def forward(ctx, x, alpha, r: int):
        a = alpha.abs()
        xa = torch.clamp(x, min=0.0) / a
        q = torch.round(r * torch.clamp(xa, max=1.0)) / r
        ctx.save_for_backward(x, alpha, xa, q)
        return a * q

    @staticmethod
    def backward(ctx, dy):
        x, alpha, xa, q = ctx.saved_tensors
        a = alpha.abs()
        dx = dy * ((x > 0) & (x <= a))
        local = torch.where(x >= a, torch.ones_like(x), torch.where(x > 0, q - xa, torch.zeros_like(x)))
        return dx, (torch.sign(alpha) * (dy * local).sum()).reshape(1), None


class LeNet(torch.nn.Module):
    """conv5x5x6 (pad 2) - BN - ReLU - pool, conv5x5x16 - BN - ReLU - pool, conv5x5x120 - BN - ReLU, dropout,
    fc84 - ReLU, dropout, fc10: onnxqat.models.lenet, with the quantizers of `mode` where the recipe puts them."""

    def __init__(self, mode: str = "fp32"):
        super().__init__()
        if mode not in MODES:
            raise ValueError(f"mode {mode!r} not in {MODES}")
        self.mode = mode
        self.c1 = torch.nn.Conv2d(1, 6, 5, padding=2, bias=False)
        self.b1 = torch.nn.BatchNorm2d(6, eps=1e-5, momentum=0.1)
        self.c2 = torch.nn.Conv2d(6, 16, 5, bias=False)
        self.b2 = torch.nn.BatchNorm2d(16, eps=1e-5, momentum=0.1)
        self.c3 = torch.nn.Conv2d(16, 120, 5, bias=False)
        self.b3 = torch.nn.BatchNorm2d(120, eps=1e-5, momentum=0.1)
        self.f1 = torch.nn.Linear(120, 84)
        self.f2 = torch.nn.Linear(84, 10)
        if mode == "lsq4":
            self.wsteps = torch.nn.ParameterDict({k: torch.nn.Parameter(torch.ones(1)) for k in LAYERS})
            self.asteps = torch.nn.ParameterList([torch.nn.Parameter(torch.tensor([0.4])) for _ in range(4)])
        elif mode == "sat4":
            self.alphas = torch.nn.ParameterList([torch.nn.Parameter(torch.tensor([6.0])) for _ in range(4)])
        self.record: list | None = None  # set to a list to collect the float activations (calibration)

    def quantizer_parameters(self) -> list:
        return list(self.wsteps.values()) + list(self.asteps) if self.mode == "lsq4" else \
            list(self.alphas) if self.mode == "sat4" else []

    def weight(self, k: str):
        w = getattr(self, k).weight
        r = WEIGHT_RANGE[k]
        if self.mode == "lsq4":
            qp = (r - 1) // 2
            return Lsq.apply(w, self.wsteps[k], float(-((r + 1) // 2)), float(qp), 1.0 / math.sqrt(w.numel() * qp))
        if self.mode == "sat4":
            return SatWeight.apply(w, r, w.shape[0] if k.startswith("f") else 0)  # ApplyScaling on Fc only
        return w

    def act(self, i: int, x):
        """The ReLU and the activation quantizer after it (SAT's replaces the ReLU)."""
        if self.record is not None:
            self.record.append(F.relu(x).detach().numpy().copy())
        if self.mode == "sat4":
            return SatAct.apply(x, self.alphas[i], ACT_RANGE)
        x = F.relu(x)
        if self.mode == "lsq4":
            return Lsq.apply(x, self.asteps[i], 0.0, float(ACT_RANGE), 1.0 / math.sqrt(x[0].numel() * ACT_RANGE))
        return x

    def forward(self, x):
        x = F.max_pool2d(self.act(0, self.b1(F.conv2d(x, self.weight("c1"), padding=2))), 2)
        x = F.max_pool2d(self.act(1, self.b2(F.conv2d(x, self.weight("c2")))), 2)
        x = F.dropout(self.act(2, self.b3(F.conv2d(x, self.weight("c3")))), 0.5, self.training).flatten(1)
        x = F.dropout(self.act(3, F.linear(x, self.weight("f1"), self.f1.bias)), 0.5, self.training)
        return F.linear(x, self.weight("f2"), self.f2.bias)

    def load(self, arrays: dict) -> None:
        """Float parameters and BN statistics from {onnxqat name: array} (an ONNX model's initializers)."""
        sd = self.state_dict()
        for k, v in ONNX_NAMES.items():
            sd[k] = torch.tensor(np.asarray(arrays[v], np.float32)).reshape(sd[k].shape)
        self.load_state_dict(sd)

    def export(self) -> dict:
        sd = self.state_dict()
        return {v: sd[k].numpy().copy() for k, v in ONNX_NAMES.items()}

    def init_quantizers(self, x: np.ndarray) -> None:
        """onnxqat's initial values: weight steps from the weights, activation steps / alphas from the float model's
        activations on `x` (onnxqat.passes.calibration.lsq_step / sat_alpha with the recipe's percentile)."""
        from onnxqat.passes.calibration import lsq_step, sat_alpha

        if self.mode == "fp32":
            return
        mode, self.mode, self.record = self.mode, "fp32", []
        was = self.training
        self.eval()
        with torch.no_grad():
            self(torch.from_numpy(x))
            if mode == "lsq4":
                for k, r in WEIGHT_RANGE.items():
                    w = getattr(self, k).weight.numpy()
                    self.wsteps[k].fill_(lsq_step(w, (r - 1) // 2))
                for p, a in zip(self.asteps, self.record):
                    p.fill_(lsq_step(a, ACT_RANGE))
            else:
                for p, a in zip(self.alphas, self.record):
                    p.fill_(sat_alpha(a, 99.99))
        self.mode, self.record = mode, None
        self.train(was)


def cosine(lr: float, step: int, total: int) -> float:
    """onnxqat's (and N2D2's) CosineDecay to 0 over `total` updates, step 0-based."""
    return lr * (1.0 + math.cos(math.pi * step / max(1, total))) / 2.0


def train(mode: str, init: dict, *, epochs: int, seed: int, lr: float = 0.05, momentum: float = 0.9,
          decay: float = 5e-4, batch_size: int = 256, limit: int | None = None, threads: int = 1,
          lr_policy: str = "cosine", dropout_seed: int | None = None, log=print) -> tuple[LeNet, dict]:
    """Trains LeNet(mode) from `init` on Fashion-MNIST: SGD (torch.optim.SGD, momentum and L2 decay on conv/fc
    weights and fc biases; none on BatchNorm nor quantizer parameters), lr per update (cosine to 0 or constant).
    The batches follow `seed` (onnxqat's loader), the dropout masks torch's generator seeded with dropout_seed
    (default: seed). Returns the model and {test_top1, seconds_per_epoch, cpu_seconds_per_epoch, images_per_s, ...}."""
    from onnxqat.training.data import Batches, resolve_data
    from onnxqat.training.transforms import default_transforms

    torch.set_num_threads(max(1, threads))
    torch.manual_seed(seed if dropout_seed is None else dropout_seed)
    net = LeNet(mode)
    net.load(init)
    train_ds, test_ds = resolve_data("fashion-mnist")
    train_ds = train_ds.limit(limit)
    tf = default_transforms()
    first = next(iter(Batches(train_ds, 256, tf, train=False, seed=seed).epoch(0)))[1]  # in dataset order
    net.init_quantizers(first)
    quant = {id(p) for p in net.quantizer_parameters()}
    decayed = [getattr(net, k).weight for k in LAYERS] + [net.f1.bias, net.f2.bias]
    rest = [p for p in net.parameters() if id(p) not in quant and all(p is not d for d in decayed)]
    opt = torch.optim.SGD([{"params": decayed, "weight_decay": decay}, {"params": rest, "weight_decay": 0.0},
                           {"params": net.quantizer_parameters(), "weight_decay": 0.0}], lr=lr, momentum=momentum)
    tb = Batches(train_ds, batch_size, tf, train=True, seed=seed)
    total, step, secs, cpus, n_img = epochs * len(tb), 0, [], [], 0
    for epoch in range(epochs):
        net.train()
        t0, c0, n_img = time.perf_counter(), time.process_time(), 0
        for _, x, y in tb.epoch(epoch):
            for g in opt.param_groups:
                g["lr"] = cosine(lr, step, total) if lr_policy == "cosine" else lr
            opt.zero_grad(set_to_none=True)
            F.cross_entropy(net(torch.from_numpy(x)), torch.from_numpy(y.astype(np.int64))).backward()
            opt.step()
            step, n_img = step + 1, n_img + len(y)
        secs.append(time.perf_counter() - t0)
        cpus.append(time.process_time() - c0)
    metrics = {"test_top1": evaluate(net, test_ds, tf), "seconds_per_epoch": float(np.mean(secs)),
               "cpu_seconds_per_epoch": float(np.mean(cpus)), "images_per_s": n_img / float(np.mean(secs)),
               "images_per_cpu_s": n_img / float(np.mean(cpus)), "torch": torch.__version__,
               "threads": torch.get_num_threads()}
    log(f"  torch {mode:<6} seed {seed} test top-1 {metrics['test_top1']:6.2f}%  "
        f"{metrics['seconds_per_epoch']:.2f} s/epoch (torch {torch.__version__}, {metrics['threads']} thread(s))")
    return net, metrics


def evaluate(net: LeNet, test_ds, tf) -> float:
    from onnxqat.training.data import Batches

    net.eval()
    correct = 0
    with torch.no_grad():
        for _, x, y in Batches(test_ds, 512, tf, train=False).epoch(0):
            correct += int((net(torch.from_numpy(x)).argmax(1).numpy() == y).sum())
    return 100.0 * correct / len(test_ds)


def onnx_arrays(path: str) -> dict:
    import onnx
    from onnx import numpy_helper

    return {i.name: numpy_helper.to_array(i) for i in onnx.load(path).graph.initializer}


def schedule(seed: int, fp32_epochs: int, qat_epochs: int, limit: int | None, threads: int, log=print,
             from_fp32: str | None = None, lenet_init: str = "he") -> dict:
    """Issue 16's schedule on the torch side: FP32 from onnxqat's LeNet init (build_lenet(seed)), then from it
    fine-tune, LSQ W4A4 and SAT W4A4 with the cosine restarted. from_fp32: an FP32 model (onnxqat's, of the same
    seed) replaces the FP32 phase, so only the fine-tune/QAT phases are compared. lenet_init: build_lenet's init
    ("he" or "torch"). Returns {row: test top-1}."""
    from onnx import numpy_helper

    from onnxqat.models.lenet import build_lenet

    kw = dict(seed=seed, limit=limit, threads=threads, log=log)
    if from_fp32:
        trained = onnx_arrays(from_fp32)
        net = LeNet("fp32")
        net.load(trained)
        from onnxqat.training.data import resolve_data
        from onnxqat.training.transforms import default_transforms

        rows = {"fp32": evaluate(net, resolve_data("fashion-mnist")[1], default_transforms())}
    else:
        init = {i.name: numpy_helper.to_array(i) for i in build_lenet(seed, init=lenet_init).graph.initializer}
        fp32, m = train("fp32", init, epochs=fp32_epochs, **kw)
        rows = {"fp32": m["test_top1"]}
        trained = fp32.export()
    for key, mode in (("fp32_finetune", "fp32"), ("lsq4", "lsq4"), ("sat4", "sat4")):
        rows[key] = train(mode, trained, epochs=qat_epochs, **kw)[1]["test_top1"]
    return rows


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--schedule", action="store_true", help="issue 16's FP32 + fine-tune/LSQ/SAT schedule")
    p.add_argument("--from-fp32", help="with --schedule: start the fine-tune/LSQ/SAT phases from this FP32 model "
                   "(onnxqat's) instead of training one")
    p.add_argument("--mode", choices=MODES, default="fp32")
    p.add_argument("--init", help="ONNX model whose initializers start the run (default: onnxqat's LeNet, --seed)")
    p.add_argument("--lenet-init", choices=("he", "torch"), default="he",
                   help="without --init: onnxqat's LeNet builder init (he) or PyTorch's default init (torch)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--epochs", type=int, default=1)
    p.add_argument("--fp32-epochs", type=int, default=50)
    p.add_argument("--qat-epochs", type=int, default=25)
    p.add_argument("--dropout-seed", type=int, default=None, help="seed of the dropout masks only (default: --seed, "
                   "which also orders the batches): runs that differ in it measure the noise of dropout alone")
    p.add_argument("--limit", type=int, default=None)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--json", type=Path, help="write the results here")
    a = p.parse_args(argv)
    if a.schedule:
        out = schedule(a.seed, a.fp32_epochs, a.qat_epochs, a.limit, a.threads, from_fp32=a.from_fp32,
                       lenet_init=a.lenet_init)
    else:
        if a.init:
            init = onnx_arrays(a.init)
        else:
            from onnx import numpy_helper

            from onnxqat.models.lenet import build_lenet

            init = {i.name: numpy_helper.to_array(i) for i in build_lenet(a.seed, init=a.lenet_init).graph.initializer}
        out = train(a.mode, init, epochs=a.epochs, seed=a.seed, limit=a.limit, threads=a.threads,
                    dropout_seed=a.dropout_seed)[1]
    if a.json:
        a.json.parent.mkdir(parents=True, exist_ok=True)
        a.json.write_text(json.dumps(out, indent=1))
    print(json.dumps(out))


if __name__ == "__main__":
    main()
