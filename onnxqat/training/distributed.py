"""Data parallelism over MPI (mpi4py): which process this is, and the few collectives training needs.

`mpiexec -n N onnxqat train ...` starts N copies of the same command. Every rank builds the same model from the same
files and seed; rank 0's parameters are broadcast anyway (a model whose initialisation depends on the machine stays
one model). Each update, every rank runs its shard of the global batch and the gradients are averaged with one
in-place allreduce of the flat float32 vector, so every rank applies the same solver step to the same vector.

Without a launcher (no PMI_SIZE / OMPI_COMM_WORLD_SIZE / PMIX / Slurm step of more than one task) mpi4py is never
imported and `Single` does nothing: one process trains exactly as before.
"""

from __future__ import annotations

import functools
import os
import sys
import zlib

import numpy as np

from onnxqat.errors import TrainingError

# environment variables by which MPI launchers announce the job's size (MPICH/Hydra, Open MPI, PMIx, Slurm srun)
LAUNCHER_SIZE_VARS = ("PMI_SIZE", "OMPI_COMM_WORLD_SIZE", "PMIX_SIZE", "MPI_LOCALNRANKS", "SLURM_STEP_NUM_TASKS")


def launcher_size() -> int:
    """The number of processes a launcher started (1 when none did)."""
    for var in LAUNCHER_SIZE_VARS:
        try:
            n = int(os.environ.get(var, "1"))
        except ValueError:
            continue
        if n > 1:
            return n
    return 1


class Single:
    """One process: every collective is the identity."""

    rank, size, local_size = 0, 1, 1

    @property
    def is_root(self) -> bool:
        return self.rank == 0

    def average_(self, vec: np.ndarray) -> None:
        pass

    def sum(self, values: np.ndarray) -> np.ndarray:
        return np.asarray(values, np.float64)

    def broadcast_(self, vec: np.ndarray) -> None:
        pass

    def broadcast_object(self, obj):
        return obj

    def check_same(self, vec: np.ndarray, what: str) -> None:
        pass

    def barrier(self) -> None:
        pass

    def abort(self, code: int = 1) -> None:
        pass

    def shard(self, n: int) -> slice:
        return slice(0, n)


class Mpi(Single):
    """N processes of one MPI job (mpi4py's COMM_WORLD)."""

    def __init__(self, comm, mpi):
        self.comm, self.MPI = comm, mpi
        self.rank, self.size = comm.Get_rank(), comm.Get_size()
        node = comm.Split_type(mpi.COMM_TYPE_SHARED)
        self.local_size = node.Get_size()
        node.Free()

    def average_(self, vec: np.ndarray) -> None:
        """vec <- mean over ranks, in place (one allreduce of the whole flat vector)."""
        self.comm.Allreduce(self.MPI.IN_PLACE, vec, op=self.MPI.SUM)
        vec *= np.float32(1.0 / self.size)

    def sum(self, values: np.ndarray) -> np.ndarray:
        buf = np.array(values, np.float64).reshape(-1)
        self.comm.Allreduce(self.MPI.IN_PLACE, buf, op=self.MPI.SUM)
        return buf

    def broadcast_(self, vec: np.ndarray) -> None:
        self.comm.Bcast(vec, root=0)

    def broadcast_object(self, obj):
        return self.comm.bcast(obj, root=0)

    def check_same(self, vec: np.ndarray, what: str) -> None:
        """Raises on every rank when the ranks' copies of vec differ (a silent drift would train N models)."""
        crc = zlib.crc32(np.ascontiguousarray(vec).view(np.uint8))
        crcs = self.comm.allgather(crc)
        if len(set(crcs)) > 1:
            bad = [r for r, c in enumerate(crcs) if c != crcs[0]]
            raise TrainingError(f"{what}: the parameters of rank(s) {bad} differ from rank 0's (the ranks diverged; "
                                "every rank must run the same onnxruntime build, model and options)")

    def barrier(self) -> None:
        self.comm.Barrier()

    def abort(self, code: int = 1) -> None:
        self.comm.Abort(code)

    def shard(self, n: int) -> slice:
        """This rank's rows of a batch of n: contiguous, sizes differing by at most one."""
        lo = self.rank * n // self.size
        return slice(lo, (self.rank + 1) * n // self.size)


_WORLD: Single | None = None


def world() -> Single:
    """The job this process belongs to (cached): Mpi under a launcher with N > 1, else Single."""
    global _WORLD
    if _WORLD is None:
        n = launcher_size()
        if n == 1:
            _WORLD = Single()
        else:
            try:
                from mpi4py import MPI
            except ImportError:
                raise TrainingError(f"started by an MPI launcher with {n} processes, but mpi4py is not installed: "
                                    "pip install 'onnxqat[mpi]' (mpi4py and the mpich wheel)") from None
            _WORLD = Mpi(MPI.COMM_WORLD, MPI) if MPI.COMM_WORLD.Get_size() > 1 else Single()
    return _WORLD


def default_threads(comm: Single) -> int:
    """ONNX Runtime intra-op threads per rank when the user gave none: the cores of this machine shared by the ranks
    on it (ORT's default, every core per process, oversubscribes N-fold)."""
    if comm.size == 1:
        return 0
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return max(1, cores // max(comm.local_size, 1))


def abort_job(code: int = 1) -> None:
    """Ends every rank of a running MPI job (the others would wait in their next allreduce forever); no-op otherwise.
    Called after this rank printed its error."""
    if isinstance(_WORLD, Mpi):
        sys.stderr.flush()
        _WORLD.abort(code)
        # MPICH's MPI_Abort can return to the caller before the process manager kills it (seen 1 run in ~10): the
        # exception would then print its traceback under the one-line error
        os._exit(code)


def rank_prefix() -> str:
    """"[rank r/N] " under MPI with N > 1 (whose rank an error line comes from), else ""."""
    return f"[rank {_WORLD.rank}/{_WORLD.size}] " if isinstance(_WORLD, Mpi) else ""


def fail_fast(fn):
    """Under MPI with N > 1: an exception on one rank prints one line and ends the whole job (MPI_Abort); the other
    ranks would otherwise wait in their next collective forever (measured: an uncaught Python exception on one of two
    MPICH ranks hung the job until it was killed). With one process the exception propagates as usual."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        comm = world()
        if comm.size == 1:
            return fn(*args, **kwargs)
        try:
            return fn(*args, **kwargs)
        except BaseException as exc:  # KeyboardInterrupt and SystemExit too: the job must not hang
            text = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
            print(f"onnxqat: error: {rank_prefix()}{text}", file=sys.stderr)
            abort_job(130 if isinstance(exc, KeyboardInterrupt) else 1)
            raise
    return wrapper
