"""Training on ONNX Runtime training artifacts: data, transforms, solvers, loop, checkpoints.

The public entry point is `onnxqat.train()` (defined in `run.py`); this package is named `training` so that
importing one of its modules never shadows that function on the `onnxqat` package.
"""
