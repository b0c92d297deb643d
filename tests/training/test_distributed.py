"""mpiexec -n 2 on localhost (the mpich wheel's launcher): data-parallel training against one process.

Equivalence: N ranks x batch B compute, update for update, what one process computes with iteration size N (the
same batches of the same shuffled order, the gradient averaged over them): trainable parameters are bit-identical
after 20 updates (sums of two float32 gradients in the same order). Against one process x batch 2B they differ by
float32 summation order only on a model without BatchNorm (<= 1e-6: 20 updates x a few ulps of |w| ~ 1); with
BatchNorm, batch statistics over B or 2B samples are different functions (as in PyTorch's DDP without SyncBatchNorm).
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import numpy_helper

from onnxqat.training.checkpoint import load_checkpoint
from tests.training.train_helpers import synthetic_npz

pytest.importorskip("mpi4py", reason="the [mpi] extra (mpi4py, mpich) is not installed")
MPIEXEC = Path(sys.executable).parent / "mpiexec"
if not MPIEXEC.exists() and shutil.which("mpiexec") is None:
    pytest.skip("no mpiexec (the mpich wheel provides one)", allow_module_level=True)
MPIEXEC = str(MPIEXEC) if MPIEXEC.exists() else shutil.which("mpiexec")
DRIVER = Path(__file__).with_name("mpi_train.py")
REPO = Path(__file__).resolve().parents[2]
TRAINABLE = ("conv.weight", "bn.scale", "bn.B", "fc.weight", "fc.bias", "fc_wquant.step", "relu_aquant.alpha")


@pytest.fixture(scope="module")
def npz(tmp_path_factory):
    return synthetic_npz(tmp_path_factory.mktemp("mpi") / "d.npz", 256, seed=0)


def run(out: Path, npz: Path, *args, ranks: int = 1, timeout: int = 240) -> subprocess.CompletedProcess:
    cmd = [sys.executable, str(DRIVER), str(out), str(npz), *map(str, args)]
    if ranks > 1:
        cmd = [MPIEXEC, "-n", str(ranks)] + cmd
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PMI_", "OMPI_", "PMIX_", "MPI_"))}
    env["PYTHONPATH"] = str(REPO)
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env)


def inits(path: Path) -> dict:
    return {t.name: numpy_helper.to_array(t) for t in onnx.load(str(path)).graph.initializer}


def test_two_ranks_equal_one_process_accumulating(tmp_path, npz):
    two = run(tmp_path / "r2", npz, 32, 1, 20, "--epochs", 5, ranks=2)
    assert two.returncode == 0, two.stderr[-2000:]
    assert "data parallel: 2 ranks x batch 32 = global batch 64" in two.stderr
    one = run(tmp_path / "r1", npz, 32, 2, 20, "--epochs", 5)
    assert one.returncode == 0, one.stderr[-2000:]
    a, b = inits(tmp_path / "r2" / "model.onnx"), inits(tmp_path / "r1" / "model.onnx")
    start = inits_after_insert(tmp_path)
    for name in TRAINABLE:
        assert not np.array_equal(a[name], start[name]), name  # 20 updates moved it
        np.testing.assert_array_equal(a[name], b[name], err_msg=name)
    # the files come from rank 0 only, and its log: one "done" per rank on stdout, one log on stderr
    assert two.stdout.count("done 5") == 2 and two.stderr.count("epoch 5/5") == 1
    assert not list((tmp_path / "r2").glob("*.tmp"))


def inits_after_insert(tmp_path: Path) -> dict:
    import onnxqat
    from tests.training.mpi_train import RECIPE
    from tests.training.train_helpers import small_cnn

    (tmp_path / "recipe.toml").write_text(RECIPE)
    m = onnxqat.insert(small_cnn(3, bn=True), str(tmp_path / "recipe.toml"))
    return {t.name: numpy_helper.to_array(t) for t in m.graph.initializer}


def test_two_ranks_equal_one_process_with_the_global_batch_without_batchnorm(tmp_path, npz):
    two = run(tmp_path / "n2", npz, 32, 1, 20, "--no-bn", "--epochs", 5, ranks=2)
    one = run(tmp_path / "n64", npz, 64, 1, 20, "--no-bn", "--epochs", 5)
    assert two.returncode == 0 and one.returncode == 0, two.stderr[-1500:] + one.stderr[-1500:]
    a, b = inits(tmp_path / "n2" / "model.onnx"), inits(tmp_path / "n64" / "model.onnx")
    for name in ("conv.weight", "conv.bias", "fc.weight", "fc.bias", "fc_wquant.step", "relu_aquant.alpha"):
        np.testing.assert_allclose(a[name], b[name], rtol=0, atol=1e-6, err_msg=name)


@pytest.mark.parametrize("first,second", [(2, 1), (1, 2)])
def test_resume_with_another_number_of_ranks(tmp_path, npz, first, second):
    out = tmp_path / "run"
    r = run(out, npz, 32, 1, 0, "--epochs", 2, ranks=first)
    assert r.returncode == 0, r.stderr[-2000:]
    assert load_checkpoint(out / "checkpoint_last.npz")[2]["ranks"] == first
    r = run(out, npz, 32, 1, 0, "--epochs", 4, "--resume", ranks=second)
    assert r.returncode == 0, r.stderr[-2000:]
    assert f"written by {first} rank(s), this run has {second}" in r.stderr
    assert "resuming after epoch 2" in r.stderr
    _, _, meta = load_checkpoint(out / "checkpoint_last.npz")
    assert meta["epoch"] == 4 and meta["ranks"] == second and len(meta["history"]) == 4
    per_epoch = {1: 8, 2: 4}  # 256 training samples: 8 batches of 32, an update reads one batch per rank
    assert meta["step"] == 2 * per_epoch[second] + 2 * per_epoch[second]


def test_a_killed_rank_ends_the_job(tmp_path, npz):
    t0 = time.monotonic()
    r = run(tmp_path / "k", npz, 32, 1, 0, "--epochs", 50, "--die-at-batch", 5, "--die-rank", 1, ranks=2,
            timeout=120)
    assert r.returncode != 0
    assert time.monotonic() - t0 < 60
    assert "done" not in r.stdout


def test_an_error_on_one_rank_ends_the_job_with_one_line(tmp_path, npz):
    """Without MPI_Abort the other rank would wait in its allreduce forever."""
    t0 = time.monotonic()
    r = run(tmp_path / "f", npz, 32, 1, 0, "--epochs", 50, "--die-at-batch", 5, "--die-rank", 1, "--fail", ranks=2,
            timeout=120)
    assert r.returncode != 0 and time.monotonic() - t0 < 60
    assert "onnxqat: error: [rank 1/2] a test failure on one rank" in r.stderr
    assert "Traceback" not in r.stderr


def test_no_launcher_means_one_process(monkeypatch):
    from onnxqat.training import distributed

    for var in distributed.LAUNCHER_SIZE_VARS:
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setattr(distributed, "_WORLD", None)
    assert isinstance(distributed.world(), distributed.Single) and distributed.world().size == 1
    assert distributed.default_threads(distributed.world()) == 0


def test_launcher_without_mpi4py_is_one_line(monkeypatch):
    from onnxqat.errors import TrainingError
    from onnxqat.training import distributed

    monkeypatch.setenv("PMI_SIZE", "4")
    monkeypatch.setattr(distributed, "_WORLD", None)
    monkeypatch.setitem(sys.modules, "mpi4py", None)  # import fails as if not installed
    with pytest.raises(TrainingError, match=r"4 processes, but mpi4py is not installed: pip install 'onnxqat\[mpi\]'"):
        distributed.world()
    monkeypatch.setattr(distributed, "_WORLD", None)


def test_running_statistics_are_averaged_over_ranks():
    """_average_running_stats: the mean of the ranks' BatchNorm running statistics (a fake two-rank job)."""
    from onnxqat.training import loop
    from onnxqat.training.distributed import Single

    class Param:
        def __init__(self, v):
            self.data = np.asarray(v, np.float32)

    class FakeEngine:
        def __init__(self, mean, var):
            self.plan = type("P", (), {"frozen": ["bn.mean", "bn.var"]})()
            self.all_params = ["bn.mean", "bn.var", "w"]
            self.state = type("S", (), {"parameters": {"bn.mean": Param(mean), "bn.var": Param(var), "w": Param([9])}})()

    class TwoRanks(Single):
        size = 2
        other = np.array([1.0, 3.0, 2.0, 6.0], np.float32)  # rank 1's [mean, var] vector

        def average_(self, vec):
            vec += self.other
            vec *= np.float32(0.5)

    e = FakeEngine([3.0, 5.0], [4.0, 8.0])
    loop._average_running_stats(e, TwoRanks())
    np.testing.assert_array_equal(e.state.parameters["bn.mean"].data, [2.0, 4.0])
    np.testing.assert_array_equal(e.state.parameters["bn.var"].data, [3.0, 7.0])
    np.testing.assert_array_equal(e.state.parameters["w"].data, [9])
