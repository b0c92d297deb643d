"""LeNet (N2D2's SAT tutorial) on Fashion-MNIST: FP32, SAT clamp, SAT W4A4, LSQ W4A4 trained with onnxqat,
and the same LeNet with the same LSQ math in PyTorch (CPU) for a throughput comparison.

    python bench/train_lenet.py --epochs 2 --limit 12000 [--threads 1] [--no-torch] [--out runs/bench_lenet]

Procedure (same batch, solver and epochs for every variant):
- FP32: the float LeNet from its seeded initialisation.
- SAT clamp (N2D2 phase one, recipe sat4-clamp): from the same initialisation.
- SAT W4A4 (recipe sat4: 4-bit DoReFa weights, first/last layers 8-bit, 4-bit CG-PACT activations): phase two,
  initialised from the SAT clamp result (`init_from`, as N2D2's `-w weights_clamped`); alpha starts at 6.
- LSQ W4A4 (recipe lsq4, first/last weights 8-bit): inserted on the FP32 result (usual LSQ fine-tuning; weight
  steps initialised from the trained weights, activation steps 0.4).
- PyTorch: the same LeNet with the LSQ W4A4 quantizers written as autograd functions (forward/backward of
  quantizer-math.md), trained on the same batches; images/s of onnxqat LSQ / PyTorch LSQ.
Seconds per epoch are training time only (no evaluation), wall clock and process CPU time (the CPU figure is the
steadier one on a shared machine; with --threads 1 both frameworks use one compute thread). Prints a table and writes <out>/results.json.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def run_onnxqat(args, out: Path) -> dict:
    import onnxqat
    from onnxqat.models.lenet import build_lenet
    from onnxqat.passes.insert import insert

    common = dict(epochs=args.epochs, batch_size=args.batch_size, iteration_size=1, momentum=0.9, decay=args.decay,
                  lr_policy="cosine", limit_train=args.limit, limit_test=args.limit_test, validation=0.0,
                  seed=args.seed, threads=args.threads, progress=False, histograms=True, eval_test=False)
    lenet = build_lenet(args.seed)
    res = {}

    class Done:  # a variant finished by an earlier invocation with --reuse
        def __init__(self, d):
            self.metrics = json.loads((d / "metrics.json").read_text())
            self.model_path = d / "model.onnx"
            self.test_top1 = json.loads((d / "done.json").read_text())["test_top1"]

    def run(key, *a, **k):
        d = out / key
        if args.reuse and (d / "done.json").is_file():
            return Done(d)
        return onnxqat.train(*a, out=d, **k)

    def record(key, r):
        secs = [m["epoch_seconds"] for m in r.metrics]
        res[key] = {"test_top1": r.test_top1, "seconds_per_epoch": float(np.mean(secs)),
                    "cpu_seconds_per_epoch": float(np.mean([m["cpu_seconds"] for m in r.metrics])),
                    "images_per_s": float(np.mean([m["images_per_s"] for m in r.metrics])),
                    "train_loss": r.metrics[-1]["train_loss"], "model": str(r.model_path)}
        print(f"  {key:<10} test top-1 {r.test_top1:6.2f}%  {res[key]['seconds_per_epoch']:.2f} s/epoch  "
              f"(CPU {res[key]['cpu_seconds_per_epoch']:.2f} s)  {res[key]['images_per_s']:.0f} img/s", flush=True)

    print("onnxqat:", flush=True)
    fp32 = run("fp32", lenet, "fashion-mnist", lr=args.lr, **common)
    record("fp32", fp32)
    clamp = run("sat_clamp", insert(lenet, "sat4-clamp"), "fashion-mnist", lr=args.lr, quantizer_lr=args.lr, **common)
    record("sat_clamp", clamp)
    sat4 = run("sat4", lenet, "fashion-mnist", recipe="sat4", lr=args.lr, quantizer_lr=args.lr,
               init_from=clamp.model_path, **common)
    record("sat4", sat4)
    lsq = run("lsq4", lenet, "fashion-mnist", recipe="lsq4", lr=args.lsq_lr, quantizer_lr=args.lsq_lr,
              init_from=fp32.model_path, **common)
    record("lsq4", lsq)
    return res


# ------------------------------------------------------------------------------------------------ PyTorch

def run_torch(args, fp32_model: str | None) -> dict:
    import onnx
    import torch
    import torch.nn.functional as F
    from onnx import numpy_helper

    from onnxqat.training.data import Batches, resolve_data
    from onnxqat.training.transforms import default_transforms

    torch.set_num_threads(max(1, args.threads or 1))
    torch.manual_seed(args.seed)

    class Lsq(torch.autograd.Function):
        """v_hat = s round(clip(v/s, Qn, Qp)); dv STE inside; ds = g sum dy (Qn | Qp | round(v/s) - v/s)."""

        @staticmethod
        def forward(ctx, v, s, qn, qp, g):
            vs = v / s
            ctx.save_for_backward(vs)
            ctx.qn, ctx.qp, ctx.g = qn, qp, g
            return torch.round(torch.clamp(vs, qn, qp)) * s

        @staticmethod
        def backward(ctx, dy):
            (vs,) = ctx.saved_tensors
            qn, qp = ctx.qn, ctx.qp
            inside = (vs >= qn) & (vs <= qp)
            local = torch.where(vs <= qn, torch.full_like(vs, qn),
                                torch.where(vs >= qp, torch.full_like(vs, qp), torch.round(vs) - vs))
            return dy * inside, (ctx.g * (dy * local).sum()).reshape(1), None, None, None

    def wq(w, s, r):
        qn, qp = -((r + 1) // 2), (r - 1) // 2
        return Lsq.apply(w, s, float(qn), float(qp), 1.0 / np.sqrt(w.numel() * qp))

    def aq(x, s, r):
        return Lsq.apply(x, s, 0.0, float(r), 1.0 / np.sqrt(x[0].numel() * r))

    init = {}
    if fp32_model:
        init = {i.name: torch.tensor(numpy_helper.to_array(i).copy()) for i in onnx.load(fp32_model).graph.initializer}

    class LeNet(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.c1 = torch.nn.Conv2d(1, 6, 5, padding=2, bias=False)
            self.b1 = torch.nn.BatchNorm2d(6, momentum=0.1)
            self.c2 = torch.nn.Conv2d(6, 16, 5, bias=False)
            self.b2 = torch.nn.BatchNorm2d(16, momentum=0.1)
            self.c3 = torch.nn.Conv2d(16, 120, 5, bias=False)
            self.b3 = torch.nn.BatchNorm2d(120, momentum=0.1)
            self.f1 = torch.nn.Linear(120, 84)
            self.f2 = torch.nn.Linear(84, 10)
            self.ranges = {"c1": 255, "c2": 15, "c3": 15, "f1": 15, "f2": 255}
            self.wsteps = torch.nn.ParameterDict({k: torch.nn.Parameter(torch.ones(1)) for k in self.ranges})
            self.asteps = torch.nn.ParameterList([torch.nn.Parameter(torch.tensor([0.4])) for _ in range(4)])

        def init_steps(self):  # LSQ: s_w = 2 mean|W| / sqrt(Qp), from the (loaded) weights
            with torch.no_grad():
                for k, r in self.ranges.items():
                    w = getattr(self, k).weight
                    self.wsteps[k].fill_(2 * w.abs().mean().item() / float(np.sqrt((r - 1) // 2)))

        def forward(self, x):
            r = self.ranges
            x = F.conv2d(x, wq(self.c1.weight, self.wsteps["c1"], r["c1"]), padding=2)
            x = F.max_pool2d(aq(F.relu(self.b1(x)), self.asteps[0], 15), 2)
            x = F.conv2d(x, wq(self.c2.weight, self.wsteps["c2"], r["c2"]))
            x = F.max_pool2d(aq(F.relu(self.b2(x)), self.asteps[1], 15), 2)
            x = F.conv2d(x, wq(self.c3.weight, self.wsteps["c3"], r["c3"]))
            x = F.dropout(aq(F.relu(self.b3(x)), self.asteps[2], 15), 0.5, self.training).flatten(1)
            x = F.linear(x, wq(self.f1.weight, self.wsteps["f1"], r["f1"]), self.f1.bias)
            x = F.dropout(aq(F.relu(x), self.asteps[3], 15), 0.5, self.training)
            return F.linear(x, wq(self.f2.weight, self.wsteps["f2"], r["f2"]), self.f2.bias)

    net = LeNet()
    if init:
        names = {"c1.weight": "conv1.weight", "c2.weight": "conv2.weight", "c3.weight": "conv3.weight",
                 "f1.weight": "fc1.weight", "f1.bias": "fc1.bias", "f2.weight": "fc2.weight", "f2.bias": "fc2.bias"}
        for i in (1, 2, 3):
            names.update({f"b{i}.weight": f"bn{i}.scale", f"b{i}.bias": f"bn{i}.B", f"b{i}.running_mean": f"bn{i}.mean",
                          f"b{i}.running_var": f"bn{i}.var"})
        sd = net.state_dict()
        for k, v in names.items():
            sd[k] = init[v].reshape(sd[k].shape)
        net.load_state_dict(sd)
    net.init_steps()
    opt = torch.optim.SGD(net.parameters(), lr=args.lsq_lr, momentum=0.9, weight_decay=args.decay)
    train_ds, test_ds = resolve_data("fashion-mnist")
    train_ds, test_ds = train_ds.limit(args.limit), test_ds.limit(args.limit_test)
    tf = default_transforms()
    tb = Batches(train_ds, args.batch_size, tf, train=True, seed=args.seed)
    secs, cpus, n_img = [], [], 0
    for epoch in range(args.epochs):
        net.train()
        t0, c0 = time.perf_counter(), time.process_time()
        n = 0
        for _, x, y in tb.epoch(epoch):
            opt.zero_grad(set_to_none=True)
            loss = F.cross_entropy(net(torch.from_numpy(x)), torch.from_numpy(y))
            loss.backward()
            opt.step()
            n += len(y)
        secs.append(time.perf_counter() - t0)
        cpus.append(time.process_time() - c0)
        n_img = n
    net.eval()
    correct = 0
    with torch.no_grad():
        for _, x, y in Batches(test_ds, 512, tf, train=False).epoch(0):
            correct += int((net(torch.from_numpy(x)).argmax(1).numpy() == y).sum())
    out = {"test_top1": 100.0 * correct / len(test_ds), "seconds_per_epoch": float(np.mean(secs)),
           "images_per_s": n_img / float(np.mean(secs)), "cpu_seconds_per_epoch": float(np.mean(cpus)),
           "images_per_cpu_s": n_img / float(np.mean(cpus)), "torch": torch.__version__,
           "threads": torch.get_num_threads()}
    print(f"  {'torch lsq4':<10} test top-1 {out['test_top1']:6.2f}%  {out['seconds_per_epoch']:.2f} s/epoch  "
          f"(CPU {out['cpu_seconds_per_epoch']:.2f} s)  {out['images_per_s']:.0f} img/s (torch {torch.__version__}, "
          f"{out['threads']} thread(s))", flush=True)
    return out


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--epochs", type=int, default=2)
    p.add_argument("--limit", type=int, default=None, help="training samples (default: all 60000)")
    p.add_argument("--limit-test", type=int, default=None, help="test samples (default: all 10000)")
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--lr", type=float, default=0.05)
    p.add_argument("--lsq-lr", type=float, default=0.01)
    p.add_argument("--decay", type=float, default=4e-5)
    p.add_argument("--threads", type=int, default=1, help="CPU threads for ORT and PyTorch")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--no-torch", action="store_true")
    p.add_argument("--reuse", action="store_true", help="keep variants already finished in --out (same arguments)")
    p.add_argument("--out", type=Path, default=ROOT / "runs" / "bench_lenet")
    a = p.parse_args(argv)
    t0 = time.time()
    res = run_onnxqat(a, a.out)
    if not a.no_torch:
        try:
            res["torch_lsq4"] = run_torch(a, res["fp32"]["model"])
        except ImportError as exc:
            print(f"  PyTorch comparison skipped ({exc}); pip install torch==2.13.0", flush=True)
    fp = res["fp32"]
    summary = {
        "sat4_minus_fp32_top1": res["sat4"]["test_top1"] - fp["test_top1"],
        "lsq4_minus_fp32_top1": res["lsq4"]["test_top1"] - fp["test_top1"],
        "epoch_time_ratio": {k: res[k]["seconds_per_epoch"] / fp["seconds_per_epoch"]
                             for k in ("sat_clamp", "sat4", "lsq4")},
        "epoch_cpu_time_ratio": {k: res[k]["cpu_seconds_per_epoch"] / fp["cpu_seconds_per_epoch"]
                                 for k in ("sat_clamp", "sat4", "lsq4")},
    }
    if "torch_lsq4" in res:
        t = res["torch_lsq4"]
        summary["lsq4_images_per_s_onnxqat_over_torch"] = res["lsq4"]["images_per_s"] / t["images_per_s"]
        summary["lsq4_cpu_time_torch_over_onnxqat"] = t["cpu_seconds_per_epoch"] / res["lsq4"]["cpu_seconds_per_epoch"]
    res["summary"] = summary
    res["args"] = {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(a).items()}
    res["wall_seconds"] = time.time() - t0
    a.out.mkdir(parents=True, exist_ok=True)
    (a.out / "results.json").write_text(json.dumps(res, indent=1))
    print("summary:")
    print(f"  SAT W4A4 - FP32 top-1: {summary['sat4_minus_fp32_top1']:+.2f} pt (target >= -0.5)")
    print(f"  LSQ W4A4 - FP32 top-1: {summary['lsq4_minus_fp32_top1']:+.2f} pt")
    for k, v in summary["epoch_time_ratio"].items():
        print(f"  epoch time {k}/fp32: {v:.2f}x wall, {summary['epoch_cpu_time_ratio'][k]:.2f}x CPU (target <= 1.3)")
    if "lsq4_images_per_s_onnxqat_over_torch" in summary:
        print(f"  LSQ images/s onnxqat/PyTorch: {summary['lsq4_images_per_s_onnxqat_over_torch']:.2f} wall, "
              f"{summary['lsq4_cpu_time_torch_over_onnxqat']:.2f} by CPU time (target >= 1.0)")
    print(f"  results: {a.out / 'results.json'}")


if __name__ == "__main__":
    main()
