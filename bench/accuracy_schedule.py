"""LeNet (example 01) on Fashion-MNIST with issue 16's schedule, onnxqat side: the table its PyTorch column is
compared with.

    python bench/accuracy_schedule.py [--seeds 0 1 2] [--fp32-epochs 50] [--qat-epochs 25] [--limit N] [--out DIR]

Schedule (one seed each row): FP32 from scratch for --fp32-epochs; then from that model, --qat-epochs each with the
cosine restarted: FP32 fine-tune, LSQ W4A4 (recipe lsq4, first/last weights 8-bit), SAT W4A4 (recipe sat4 inserted
on the FP32 model: no clamp phase). Solver: SGD momentum 0.9 in PyTorch's form (momentum_form pytorch), lr 0.05,
per-iteration cosine to 0, batch 256, weight decay 5e-4 on conv/fc weights and biases, none on BatchNorm
(norm_decay 0) nor on quantizer parameters (quantizer_decay 0), pixels in [0, 1], no augmentation, no validation
split (the figure is the last epoch's model on the 10,000 test images). Prints the table and writes
<out>/results.json. The issue's PyTorch reference: FP32 91.33, fine-tune 91.62, LSQ W4A4 91.58, SAT W4A4 91.43.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

REFERENCE = {"fp32": 91.33, "fp32_finetune": 91.62, "lsq4": 91.58, "sat4": 91.43}  # issue 16's PyTorch column


def run_seed(args, seed: int, out: Path) -> dict:
    import warnings

    import onnxqat
    from onnxqat.models.lenet import build_lenet
    from onnxqat.passes.insert import insert

    solver = dict(batch_size=256, iteration_size=1, lr=0.05, momentum=0.9, momentum_form="pytorch", decay=5e-4,
                  norm_decay=0.0, quantizer_decay=0.0, lr_policy="cosine", validation=0.0, limit_train=args.limit,
                  seed=seed, threads=args.threads, progress=False, histograms=False, eval_test=False,
                  log=lambda *_: None)
    res = {}

    def run(key, model, epochs):
        r = onnxqat.train(model, "fashion-mnist", epochs=epochs, out=out / key, quantizer_lr=0.05, **solver)
        res[key] = float(r.test_top1)
        print(f"  seed {seed} {key:<14} test top-1 {r.test_top1:6.2f}%", flush=True)
        return r

    fp32 = run("fp32", build_lenet(seed), args.fp32_epochs)
    run("fp32_finetune", str(fp32.model_path), args.qat_epochs)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        lsq = insert(str(fp32.model_path), "lsq4")
        sat = insert(str(fp32.model_path), "sat4")
    run("lsq4", lsq, args.qat_epochs)
    run("sat4", sat, args.qat_epochs)
    return res


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--seeds", type=int, nargs="+", default=[0])
    p.add_argument("--fp32-epochs", type=int, default=50)
    p.add_argument("--qat-epochs", type=int, default=25)
    p.add_argument("--limit", type=int, default=None, help="training samples (default: all 60000)")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--out", type=Path, default=ROOT / "runs" / "accuracy_schedule")
    args = p.parse_args(argv)
    rows = {s: run_seed(args, s, args.out / f"seed{s}") for s in args.seeds}
    print(f"\nLeNet / Fashion-MNIST, FP32 {args.fp32_epochs} epochs then {args.qat_epochs} each"
          + (f", {args.limit} training images" if args.limit else "") + f", seeds {args.seeds}:")
    print(f"| mode | onnxqat (mean over seeds) | per seed | PyTorch reference (issue 16) |\n|---|---|---|---|")
    for key, label in (("fp32", "FP32"), ("fp32_finetune", "FP32 fine-tune"), ("lsq4", "LSQ W4A4"),
                       ("sat4", "SAT W4A4 (no clamp phase)")):
        vals = [rows[s][key] for s in args.seeds]
        print(f"| {label} | {np.mean(vals):.2f} | {', '.join(f'{v:.2f}' for v in vals)} | {REFERENCE[key]:.2f} |")
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "results.json").write_text(json.dumps({"args": {k: str(v) for k, v in vars(args).items()},
                                                       "rows": rows, "reference": REFERENCE}, indent=1))


if __name__ == "__main__":
    main()
