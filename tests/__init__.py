"""onnxqat's test suite (a package so that `tests.corpus` imports the same way under pytest and from bench/)."""
