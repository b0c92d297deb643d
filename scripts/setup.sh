#!/usr/bin/env bash
# One-time set-up on a fresh machine: a virtual environment with onnxqat built and installed
# (compiles the quantizer op library), test tools, and the Fashion-MNIST data set (Debian package).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$PY" -m venv .venv
fi
.venv/bin/python -m pip install -q --upgrade pip
.venv/bin/python -m pip install -q -e ".[test,mpi]"
if [ ! -d /usr/share/datasets/fashion-mnist ]; then
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
    echo "setup: installing Debian package dataset-fashion-mnist"
    (apt-get update -qq && apt-get install -y -qq dataset-fashion-mnist) >/dev/null
  else
    echo "setup: Fashion-MNIST is missing; install it with: sudo apt-get install dataset-fashion-mnist" >&2
  fi
fi
echo "setup: done (.venv ready, library at $(.venv/bin/python -c 'import onnxqat; print(onnxqat.library_path())'))"
