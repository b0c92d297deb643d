#!/usr/bin/env bash
# examples/01: N2D2's LeNet SAT tutorial on Fashion-MNIST, with the onnxqat CLI (README.md explains each step).
#
#   bash examples/01_lenet_fashion_mnist/run.sh [--quick] [--out DIR] [--epochs N] [--seed S]
#
# full:    all 60000 training images (54000 train + 6000 validation), 8 epochs per stage, out runs/ex01 (7-15 min)
# --quick: the first 30000 training images (27000 + 3000), 1 epoch per stage, out runs/ex01-quick (a few minutes)
# Both evaluate on the full 10000-image test set and end with the results table (report.py).
# Needs scripts/setup.sh done (.venv with onnxqat); the fused model's check makes .venv-stock on first use.
set -euo pipefail
# (the body is one function, so bash has read all of it before running: editing this file mid-run is safe)

quiet() {  # ONNX Runtime's training-graph builder prints its optimizer passes at INFO level; keep the log readable
  local rc
  set +e
  "$@" 2>&1 | grep --line-buffered -v -E '^[0-9-]+ [0-9:.]+ \[I:onnxruntime'
  rc=${PIPESTATUS[0]}
  set -e
  return "$rc"
}
step() { echo; echo "== $*"; }

main() {
  QUICK=0 OUT="" EPOCHS="" SEED=0
  while [ $# -gt 0 ]; do
    case "$1" in
      --quick) QUICK=1 ;;
      --out) OUT="$2"; shift ;;
      --epochs) EPOCHS="$2"; shift ;;
      --seed) SEED="$2"; shift ;;
      -h|--help) sed -n '2,9p' "$0" | sed 's/^# \{0,1\}//'; exit 0 ;;
      *) echo "run.sh: unknown option '$1' (see --help)" >&2; exit 2 ;;
    esac
    shift
  done
  case "$OUT" in /*|"") ;; *) OUT="$PWD/$OUT" ;; esac  # --out is relative to where you run this from
  cd "$(dirname "$0")/../.."  # the repository root (default outputs go to its runs/)
  HERE=examples/01_lenet_fashion_mnist
  if [ "$QUICK" = 1 ]; then
    EPOCHS=${EPOCHS:-1}; OUT=${OUT:-runs/ex01-quick}; DATA_OPTS=(--limit-train 30000)
  else
    EPOCHS=${EPOCHS:-8}; OUT=${OUT:-runs/ex01}; DATA_OPTS=()
  fi

  export PATH="$PWD/.venv/bin:$PATH"
  if ! command -v onnxqat >/dev/null; then
    echo "run.sh: no 'onnxqat' command: run 'bash scripts/setup.sh' first" >&2
    exit 1
  fi
  mkdir -p "$OUT"

  T0=$SECONDS
  COMMON=(--data fashion-mnist --epochs "$EPOCHS" --seed "$SEED" --no-progress "${DATA_OPTS[@]}")

  step "1/6 LeNet of the N2D2 tutorial as ONNX"
  python -m onnxqat.models.lenet "$OUT/lenet.onnx" --seed "$SEED"

  step "2/6 FP32 baseline (the recipes' solver: SGD lr 0.05, momentum 0.9, decay 4e-5, cosine, batch 128 x 2)"
  quiet onnxqat train "$OUT/lenet.onnx" --out "$OUT/fp32" "${COMMON[@]}" \
    --lr 0.05 --momentum 0.9 --decay 4e-5 --lr-policy cosine --iteration-size 2

  step "3/6 SAT phase 1: clamped weights, float activations (recipe sat4-clamp), from scratch as in the tutorial"
  quiet onnxqat train "$OUT/lenet.onnx" --recipe sat4-clamp --out "$OUT/clamp" "${COMMON[@]}"

  step "4/6 SAT phase 2: W4A4, first/last layer weights 8-bit (recipe sat4), from the clamped weights"
  quiet onnxqat train "$OUT/lenet.onnx" --recipe sat4 --init-from "$OUT/clamp/model.onnx" --out "$OUT/sat4" "${COMMON[@]}"

  step "5/6 fuse to an integer-only ONNX graph (BatchNorm folded, quantizers removed)"
  onnxqat fuse "$OUT/sat4/model.onnx" -o "$OUT/lenet.int.onnx"

  step "6/6 evaluate every stage on the test set; fused model on stock onnxruntime"
  python "$HERE/report.py" "$OUT"
  echo "total time: $((SECONDS - T0)) s"
}

main "$@"
exit
