#!/usr/bin/env bash
# Creates .venv-stock: the latest stock `onnxruntime` (what serving stacks install) + numpy, nothing else.
# onnxruntime-training-cpu (in .venv) ships its own `onnxruntime` module, so the two cannot share an environment;
# the fuse tests run exported integer models here to prove they need no op library and no training build.
# Usage: bash scripts/make_stock_env.sh [DEST]   (default: <repo>/.venv-stock; idempotent)
set -euo pipefail
cd "$(dirname "$0")/.."
DEST="${1:-.venv-stock}"
PY="${PYTHON:-}"
if [ -z "$PY" ]; then
  if [ -x .venv/bin/python ]; then
    # same interpreter as the project's venv (its pyvenv.cfg names it)
    PY="$(sed -n 's/^executable = //p' .venv/pyvenv.cfg)"
  fi
  [ -n "$PY" ] && [ -x "$PY" ] || PY="$(command -v python3)"
fi
if [ -x "$DEST/bin/python" ] && "$DEST/bin/python" -c "import onnxruntime, numpy" 2>/dev/null; then
  echo "stock env ready: $DEST ($("$DEST/bin/python" -c 'import onnxruntime; print(onnxruntime.__version__)'))"
  exit 0
fi
"$PY" -m venv "$DEST"
printf '*\n' > "$DEST/.gitignore"   # keep the env out of git status
"$DEST/bin/python" -m pip install -q --disable-pip-version-check --upgrade onnxruntime numpy
echo "stock env ready: $DEST ($("$DEST/bin/python" -c 'import onnxruntime; print(onnxruntime.__version__)'))"
