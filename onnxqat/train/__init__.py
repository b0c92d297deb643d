"""Training on ONNX Runtime training artifacts: data, transforms, solvers, loop, checkpoints; `run.train()`."""
