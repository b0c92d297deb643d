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
- PyTorch: the same LeNet with the LSQ W4A4 quantizers written as autograd functions (bench/torch_reference.py,
  forward/backward of quantizer-math.md), trained on the same batches; images/s of onnxqat LSQ / PyTorch LSQ.
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

def run_torch(args, fp32_model: str) -> dict:
    """The LSQ W4A4 LeNet of bench/torch_reference.py from the same FP32 model, same batches and solver settings."""
    sys.path.insert(0, str(ROOT / "bench"))
    from torch_reference import onnx_arrays, train

    return train("lsq4", onnx_arrays(fp32_model), epochs=args.epochs, seed=args.seed, lr=args.lsq_lr,
                 decay=args.decay, batch_size=args.batch_size, limit=args.limit, threads=args.threads,
                 log=lambda line: print(line, flush=True))[1]


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
