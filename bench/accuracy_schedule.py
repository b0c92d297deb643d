"""LeNet (example 01) on Fashion-MNIST with issue 16's schedule, onnxqat beside a PyTorch eager implementation of
the same network, quantizers and solver (bench/torch_reference.py), seed by seed.

    python bench/accuracy_schedule.py [--seeds 0 1 2] [--sides onnxqat torch torch-same-start] [--fp32-epochs 50]
                                      [--qat-epochs 25] [--limit N] [--out DIR] [--torch-python PY]
                                      [--init he|torch]

Schedule (one seed each row): FP32 from scratch for --fp32-epochs; then from that model, --qat-epochs each with the
cosine restarted: FP32 fine-tune, LSQ W4A4 (recipe lsq4, first/last weights 8-bit), SAT W4A4 (recipe sat4 inserted
on the FP32 model: no clamp phase). Solver: SGD momentum 0.9 in PyTorch's form (momentum_form pytorch), lr 0.05,
per-iteration cosine to 0, batch 256, weight decay 5e-4 on conv/fc weights and biases, none on BatchNorm
(norm_decay 0) nor on quantizer parameters (quantizer_decay 0), pixels in [0, 1], no augmentation, no validation
split (the figure is the last epoch's model on the 10,000 test images). Both sides start from the same weights
(onnxqat's LeNet builder with the seed; --init torch: PyTorch's default Conv2d/Linear initialisation, which a
PyTorch script that sets none starts from), read the same batches in the same order and initialise the activation
quantizers from the same first 256 images; dropout masks differ. The torch-same-start side runs only the PyTorch
fine-tune/LSQ/SAT phases, from onnxqat's FP32 model of the seed: the QAT implementations from the same weights,
without the FP32 phase's seed-to-seed spread between them. The torch sides run in this interpreter when torch
imports, else in --torch-python (default: the export environment, .venv-export/bin/python), else it is skipped.
Each (seed, side) is written to <out>/seed<S>/<side>.json as it finishes and reused by a later call (--again to
rerun), so seeds can be run in separate processes; the table is printed from all the seeds asked for and written
to <out>/results.json. The issue's PyTorch figures (one seed): FP32 91.33, fine-tune 91.62, LSQ 91.58, SAT 91.43.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

REFERENCE = {"fp32": 91.33, "fp32_finetune": 91.62, "lsq4": 91.58, "sat4": 91.43}  # issue 16's PyTorch column
SIDES = ("onnxqat", "torch", "torch-same-start")
ROWS = (("fp32", "FP32"), ("fp32_finetune", "FP32 fine-tune"), ("lsq4", "LSQ W4A4"), ("sat4", "SAT W4A4 (no clamp phase)"))


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

    fp32 = run("fp32", build_lenet(seed, init=args.init), args.fp32_epochs)
    run("fp32_finetune", str(fp32.model_path), args.qat_epochs)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        lsq = insert(str(fp32.model_path), "lsq4")
        sat = insert(str(fp32.model_path), "sat4")
    run("lsq4", lsq, args.qat_epochs)
    run("sat4", sat, args.qat_epochs)
    return res


def torch_python(explicit: str | None) -> str | None:
    """The interpreter that runs bench/torch_reference.py: --torch-python, this one if torch imports, the export
    environment's; None when none has torch."""
    if explicit:
        return explicit
    try:
        import torch  # noqa: F401

        return sys.executable
    except ImportError:
        pass
    py = ROOT / ".venv-export" / "bin" / "python"
    if py.exists() and subprocess.run([str(py), "-c", "import torch"], capture_output=True).returncode == 0:
        return str(py)
    return None


def run_torch_seed(args, seed: int, py: str, path: Path, from_fp32: Path | None = None) -> dict:
    cmd = [py, str(ROOT / "bench" / "torch_reference.py"), "--schedule", "--seed", str(seed),
           "--fp32-epochs", str(args.fp32_epochs), "--qat-epochs", str(args.qat_epochs),
           "--threads", str(args.threads), "--lenet-init", args.init, "--json", str(path)]
    if from_fp32 is not None:
        cmd += ["--from-fp32", str(from_fp32)]
    if args.limit:
        cmd += ["--limit", str(args.limit)]
    subprocess.run(cmd, check=True)
    return json.loads(path.read_text())


def seed_side(args, seed: int, side: str, py: str | None) -> dict | None:
    path = args.out / f"seed{seed}" / f"{side}.json"
    if path.exists() and not args.again:
        return json.loads(path.read_text())
    if side == "torch":
        return run_torch_seed(args, seed, py, path) if py else None
    if side == "torch-same-start":
        fp32 = args.out / f"seed{seed}" / "fp32" / "model.onnx"
        if py is None or not fp32.exists():
            return None  # needs torch, and the onnxqat side's FP32 model of this seed
        return run_torch_seed(args, seed, py, path, from_fp32=fp32)
    rows = run_seed(args, seed, args.out / f"seed{seed}")
    path.write_text(json.dumps(rows, indent=1))
    return rows


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--seeds", type=int, nargs="+", default=[0])
    p.add_argument("--sides", nargs="+", choices=SIDES, default=["onnxqat", "torch"],
                   help="run these sides (all are tabulated from what <out> holds); torch-same-start: the PyTorch "
                        "fine-tune/LSQ/SAT phases from onnxqat's FP32 model of the seed (its FP32 row is that "
                        "model's accuracy), so the two QAT implementations start from the same weights")
    p.add_argument("--fp32-epochs", type=int, default=50)
    p.add_argument("--qat-epochs", type=int, default=25)
    p.add_argument("--init", choices=("he", "torch"), default="he",
                   help="LeNet's initial weights: he (onnxqat's builder) or torch (PyTorch's default init)")
    p.add_argument("--limit", type=int, default=None, help="training samples (default: all 60000)")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--out", type=Path, default=ROOT / "runs" / "accuracy_schedule")
    p.add_argument("--torch-python", help="interpreter with torch for the reference side")
    p.add_argument("--again", action="store_true", help="rerun (seed, side) pairs <out> already holds")
    args = p.parse_args(argv)
    wants_torch = bool({"torch", "torch-same-start"} & set(args.sides))
    py = torch_python(args.torch_python) if wants_torch else None
    if wants_torch and py is None:
        print("PyTorch side skipped: no interpreter with torch (pip install torch, or --torch-python)", flush=True)
    rows: dict = {side: {} for side in SIDES}
    for s in args.seeds:
        (args.out / f"seed{s}").mkdir(parents=True, exist_ok=True)
        for side in SIDES:
            got = seed_side(args, s, side, py) if side in args.sides else None
            path = args.out / f"seed{s}" / f"{side}.json"
            if got is None and path.exists():
                got = json.loads(path.read_text())
            if got is not None:
                rows[side][s] = got
    print(f"\nLeNet ({args.init} init) / Fashion-MNIST, FP32 {args.fp32_epochs} epochs then {args.qat_epochs} each"
          + (f", {args.limit} training images" if args.limit else "") + ", test top-1 % (last epoch):")
    same = bool(rows["torch-same-start"])
    print("| mode | onnxqat mean (per seed) | PyTorch same run mean (per seed) | onnxqat - PyTorch | "
          + ("PyTorch from onnxqat's FP32 (per seed) | onnxqat - that | " if same else "") + "issue's PyTorch |")
    print("|---|---|---|---|---|" + ("---|---|" if same else ""))

    def cell(side, key):
        vals = {s: r[key] for s, r in rows[side].items()}
        return (f"{np.mean(list(vals.values())):.2f} ({', '.join(f'{v:.2f}' for v in vals.values())})"
                if vals else "-"), vals

    def diff(va, vb):
        both = sorted(set(va) & set(vb))
        return f"{np.mean([va[s] - vb[s] for s in both]):+.2f} over seeds {both}" if both else "-"

    for key, label in ROWS:
        (a, va), (b, vb), (c, vc) = cell("onnxqat", key), cell("torch", key), cell("torch-same-start", key)
        extra = f"{c} | {diff(va, vc)} | " if same else ""
        print(f"| {label} | {a} | {b} | {diff(va, vb)} | {extra}{REFERENCE[key]:.2f} |")
    (args.out / "results.json").write_text(json.dumps({"args": {k: str(v) for k, v in vars(args).items()},
                                                       "rows": {k: {str(s): r for s, r in v.items()}
                                                                for k, v in rows.items()},
                                                       "reference": REFERENCE}, indent=1))


if __name__ == "__main__":
    main()
