"""Small reference models built as ONNX graphs (used by tests, examples and benchmarks)."""
