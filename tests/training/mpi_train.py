"""Run by tests/training/test_distributed.py under `mpiexec -n N` (and alone): one training of a small model with
BatchNorm, SAT (weights, activations) and LSQ (weights) quantizers through the Python API.

    python tests/training/mpi_train.py OUT NPZ BATCH ITERATION_SIZE MAX_ITERATIONS [--no-bn] [--resume] [--epochs E]
    [--die-at-batch K --die-rank R]
"""

from __future__ import annotations

import argparse
import os
import signal
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from tests.training.train_helpers import small_cnn  # noqa: E402

RECIPE = """
name = "mixed-test"
[weights]
method = "sat"
range = 15
apply_scaling = true
[op_types.Gemm]
method = "lsq"
range = 15
[activations]
enabled = true
method = "sat"
range = 15
alpha = 4.0
"""


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("out")
    ap.add_argument("npz")
    ap.add_argument("batch", type=int)
    ap.add_argument("iteration_size", type=int)
    ap.add_argument("max_iterations", type=int)
    ap.add_argument("--no-bn", action="store_true")
    ap.add_argument("--resume", action="store_true")
    ap.add_argument("--epochs", type=int, default=1)
    ap.add_argument("--die-at-batch", type=int)
    ap.add_argument("--die-rank", type=int, default=1)
    ap.add_argument("--fail", action="store_true", help="raise a TrainingError instead of SIGKILL")
    a = ap.parse_args()
    import onnxqat
    from onnxqat.training import loop

    recipe = Path(a.out).parent / "mixed-test.toml"
    if not recipe.exists():
        recipe.write_text(RECIPE)
    model = onnxqat.insert(small_cnn(3, bn=not a.no_bn), str(recipe))
    if a.die_at_batch is not None:
        rank = int(os.environ.get("PMI_RANK", "0"))
        real = loop.Engine.train_step
        count = [0]

        def step(self, feeds, rng):
            count[0] += 1
            if rank == a.die_rank and count[0] == a.die_at_batch:
                if a.fail:
                    from onnxqat.errors import TrainingError

                    raise TrainingError("a test failure on one rank")
                os.kill(os.getpid(), signal.SIGKILL)
            return real(self, feeds, rng)

        loop.Engine.train_step = step
    res = onnxqat.train(model, a.npz, out=a.out, epochs=a.epochs, batch_size=a.batch,
                        iteration_size=a.iteration_size, max_iterations=a.max_iterations or None, lr=0.05,
                        momentum=0.9, decay=1e-4, lr_policy="cosine", validation=0.0, transforms=[], seed=7,
                        threads=1, progress=False, histograms=False, resume=a.resume, init_quantizers=False,
                        log=lambda m: print(m, file=sys.stderr))
    print(f"done {len(res.metrics)} {res.test_top1}")


if __name__ == "__main__":
    main()
