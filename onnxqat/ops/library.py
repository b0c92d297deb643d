"""Locate and load the compiled quantizer op library (libonnxqat_ops.so).

    sess = onnxruntime.InferenceSession(path, onnxqat.session_options())

`library_path()` looks, in order, at: the environment variable ONNXQAT_OPS_LIBRARY; the installed package
(onnxqat/lib); the site-packages copy of an editable install (`pip install -e .`: onnxqat.__path__, then the
interpreter's site-packages folders); the repository's build/ folder (any CMake build of custom_ops/ below it,
newest first). It raises OpLibraryError, with the fix, when none holds the library.
"""

from __future__ import annotations

import os
import sys
import sysconfig
from pathlib import Path

from onnxqat.errors import OpLibraryError

ENV_VAR = "ONNXQAT_OPS_LIBRARY"

if sys.platform == "win32":
    LIBRARY_NAME = "onnxqat_ops.dll"
elif sys.platform == "darwin":
    LIBRARY_NAME = "libonnxqat_ops.dylib"
else:
    LIBRARY_NAME = "libonnxqat_ops.so"

_PACKAGE_DIR = Path(__file__).resolve().parent.parent  # .../onnxqat
_REPO_DIR = _PACKAGE_DIR.parent


def _site_dirs() -> list[Path]:
    dirs: list[str] = []
    for key in ("platlib", "purelib"):
        try:
            dirs.append(sysconfig.get_paths()[key])
        except KeyError:
            pass
    try:
        import site

        dirs.extend(site.getsitepackages())
        dirs.append(site.getusersitepackages())
    except (AttributeError, ImportError):
        pass
    return list(dict.fromkeys(Path(d) for d in dirs))  # first occurrence wins, order kept


def _package_dirs() -> list[Path]:
    """The onnxqat package folders: this one, then every entry of onnxqat.__path__ (an editable install by
    scikit-build-core lists the site-packages folder that holds the built library there)."""
    dirs = [_PACKAGE_DIR]
    try:
        import onnxqat

        dirs += [Path(p).resolve() for p in getattr(onnxqat, "__path__", [])]
    except ImportError:
        pass
    return list(dict.fromkeys(dirs))


def candidate_paths() -> list[Path]:
    """Every place library_path() looks at (the environment variable aside), in order."""
    paths = [d / "lib" / LIBRARY_NAME for d in _package_dirs()]
    for site_dir in _site_dirs():
        p = site_dir / "onnxqat" / "lib" / LIBRARY_NAME
        if p not in paths:
            paths.append(p)
    build = _REPO_DIR / "build"
    if build.is_dir():
        found = sorted(build.glob(f"**/{LIBRARY_NAME}"), key=lambda p: p.stat().st_mtime, reverse=True)
        paths.extend(found)
    return paths


def library_path() -> str:
    """Absolute path of libonnxqat_ops.so; OpLibraryError (with the fix) when it is nowhere."""
    env = os.environ.get(ENV_VAR)
    if env:
        p = Path(env).expanduser()
        if not p.is_file():
            raise OpLibraryError(f"{ENV_VAR}={env} is not a file: unset it, or point it at {LIBRARY_NAME}")
        return str(p.resolve())
    for p in candidate_paths():
        if p.is_file():
            return str(p.resolve())
    raise OpLibraryError(
        f"{LIBRARY_NAME} (the onnxqat quantizer ops) is not built: run `pip install .` in the onnxqat repository "
        f"(or set {ENV_VAR} to the library's path)"
    )


def session_options(options=None):
    """An onnxruntime.SessionOptions with the quantizer op library registered (or `options` with it added)."""
    import onnxruntime as ort

    so = ort.SessionOptions() if options is None else options
    path = library_path()
    try:
        so.register_custom_ops_library(path)
    except Exception as e:  # onnxruntime raises its own exception types
        raise OpLibraryError(f"cannot load {path}: {e}") from e
    return so
