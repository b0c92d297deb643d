"""Atomic file writes shared by training (checkpoints, metrics, models) and the reports (PNGs).

A temporary file in the destination folder, fsync, then rename: a kill at any moment leaves either the previous
file or the new one, never a partial one (rename is atomic only within one file system, hence the same folder).
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path


def default_file_mode() -> int:
    """0o666 less the process umask: what open() would give. mkstemp makes its file 0o600, and the rename keeps that."""
    mask = os.umask(0)
    os.umask(mask)
    return 0o666 & ~mask


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, default_file_mode())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise
    # the rename itself survives a power cut only once the folder's entry is on disk; best effort
    try:
        dfd = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(dfd)
        finally:
            os.close(dfd)
    except OSError:
        pass


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    atomic_write_bytes(path, text.encode())


def check_not_input(output: str | os.PathLike | None, *inputs, force: bool = False, option: str = "--force") -> None:
    """OnnxqatError when `output` is one of the input files (writing it would replace the user's model), unless
    force. Paths are compared as files (a symlink or another spelling of the same file counts)."""
    if output is None or force:
        return
    from onnxqat.errors import OnnxqatError

    out = Path(output)
    for src in inputs:
        if src is None or not isinstance(src, (str, os.PathLike)):
            continue
        src = Path(src)
        same = out.exists() and src.exists() and os.path.samefile(out, src)
        if same or out.resolve() == src.resolve():
            raise OnnxqatError(f"the output {out} is the input model {src}: give another output path "
                               f"(or {option} to replace it)")


LOCK_NAME = ".onnxqat.lock"


class FolderLock:
    """An output folder owned by one run: `<folder>/.onnxqat.lock` holds the owner's host and pid, created with
    O_EXCL. A second run into the same folder is refused while the owner lives; a lock left by a dead process (kill -9)
    is stale and taken over, and then the temporary files its atomic writes left (.NAME.XXXX.tmp) are removed.
    A folder the lock created and that is still empty at release is removed again (a run refused at the start
    leaves nothing)."""

    def __init__(self, folder: str | os.PathLike, what: str = "a run"):
        self.folder, self.what = Path(folder), what
        self.path = self.folder / LOCK_NAME
        self.created = False
        self.stale: str | None = None

    def __enter__(self) -> "FolderLock":
        import socket

        from onnxqat.errors import OnnxqatError

        self.created = not self.folder.exists()
        try:
            self.folder.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise OnnxqatError(f"cannot write {self.folder}: {exc.strerror or exc}") from None
        me = f"{socket.gethostname()} {os.getpid()}"
        for _ in range(2):
            try:
                fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                owner = self.path.read_text(errors="replace").strip() if self.path.exists() else ""
                if _alive(owner):
                    raise OnnxqatError(f"{self.folder} is in use by {self.what} (host and pid {owner}); wait for it "
                                       "to end or choose another output folder") from None
                self.stale = owner or "unknown"
                self.path.unlink(missing_ok=True)
                continue
            except OSError as exc:
                raise OnnxqatError(f"cannot write {self.folder}: {exc.strerror or exc}") from None
            with os.fdopen(fd, "w") as f:
                f.write(me)
            break
        else:
            raise OnnxqatError(f"cannot take the lock {self.path}")
        if self.stale is not None:
            for tmp in self.folder.rglob(".*.tmp"):
                tmp.unlink(missing_ok=True)
        return self

    def __exit__(self, *exc) -> None:
        self.path.unlink(missing_ok=True)
        if self.created:
            try:
                self.folder.rmdir()  # only when empty
            except OSError:
                pass


def _alive(owner: str) -> bool:
    """Whether the lock's owner ("host pid") still runs; another host's lock counts as alive (not checkable)."""
    import socket

    parts = owner.split()
    if len(parts) != 2 or not parts[1].isdigit():
        return False
    if parts[0] != socket.gethostname():
        return True
    try:
        os.kill(int(parts[1]), 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True
