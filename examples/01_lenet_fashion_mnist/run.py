"""examples/01 with the Python API: the same steps as run.sh (which uses the `onnxqat` CLI), for use in pipelines.

    python examples/01_lenet_fashion_mnist/run.py [--quick] [--out DIR] [--epochs N] [--seed S]
                                                  [--limit-train N] [--limit-test N]

Same settings and defaults as run.sh (full: 8 epochs per stage on all training images; --quick: 1 epoch on the first
30000), so with the same seed it trains the same models. Outputs default to runs/ex01-py(-quick).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import onnx

import onnxqat
from onnxqat.models.lenet import build_lenet

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
import report  # noqa: E402  (this example's table: evaluation of every stage, fused model on stock onnxruntime)

# the recipes' solver settings (N2D2 tutorial values), given explicitly to the FP32 run so the baseline trains alike
FP32_SOLVER = dict(lr=0.05, momentum=0.9, decay=4e-5, lr_policy="cosine", iteration_size=2)


def run(out: Path, epochs: int, seed: int = 0, limit_train: int | None = None, limit_test: int | None = None,
        log=print) -> dict:
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    lenet = out / "lenet.onnx"
    onnx.save(build_lenet(seed), str(lenet))
    common = dict(data="fashion-mnist", epochs=epochs, seed=seed, limit_train=limit_train, limit_test=limit_test,
                  progress=False, log=log)

    log("== FP32 baseline")
    fp32 = onnxqat.train(lenet, out=out / "fp32", **FP32_SOLVER, **common)
    log("== SAT phase 1: clamped weights (recipe sat4-clamp), from scratch")
    clamp = onnxqat.train(lenet, recipe="sat4-clamp", out=out / "clamp", **common)
    log("== SAT phase 2: W4A4, first/last layer 8-bit (recipe sat4), from the clamped weights")
    sat4 = onnxqat.train(lenet, recipe="sat4", init_from=clamp.model_path, out=out / "sat4", **common)
    log(f"train top-1: FP32 {fp32.test_top1:.2f}%, clamp {clamp.test_top1:.2f}%, W4A4 {sat4.test_top1:.2f}%")

    log("== fuse to integer-only")
    fused = onnxqat.fuse(sat4.model_path, out / report.FUSED)
    log(fused.summary())

    log("== evaluate (fused model on stock onnxruntime)")
    res = report.evaluate(out, limit_test)
    res["seconds"] = round(time.perf_counter() - t0, 1)
    (out / "results.json").write_text(json.dumps(res, indent=1))
    return res


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="1 epoch per stage on the first 30000 training images")
    p.add_argument("--out", type=Path, default=None)
    p.add_argument("--epochs", type=int, default=None)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--limit-train", type=int, default=None)
    p.add_argument("--limit-test", type=int, default=None)
    a = p.parse_args(argv)
    epochs = a.epochs or (1 if a.quick else 8)
    limit_train = a.limit_train or (30000 if a.quick else None)
    out = a.out or Path("runs") / ("ex01-py-quick" if a.quick else "ex01-py")
    res = run(out, epochs, a.seed, limit_train, a.limit_test)
    print(report.table(res))
    print(f"results: {out / 'results.json'}; total time {res['seconds']:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
