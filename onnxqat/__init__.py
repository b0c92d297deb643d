"""onnxqat: quantization-aware training for ONNX models.

    model = onnxqat.insert("resnet18.onnx", recipe="sat4")      # quantizer nodes on weights/activations
    result = onnxqat.train(model, data="fashion-mnist", ...)     # QAT in ONNX Runtime training
    fused = onnxqat.fuse(result.model_path)                       # integer-only ONNX of standard ops

    sess = onnxruntime.InferenceSession(path, onnxqat.session_options())  # run a quantized model yourself

Heavy modules are imported on first use, so `import onnxqat` stays fast.
"""

from __future__ import annotations

import importlib

__version__ = "0.1.0"

_API = {
    "library_path": "onnxqat.ops.library",
    "session_options": "onnxqat.ops.library",
    "insert": "onnxqat.passes.insert",
    "plan": "onnxqat.passes.insert",
    "strip_quantizers": "onnxqat.passes.insert",
    "inspect": "onnxqat.passes.inspect",
    "load_recipe": "onnxqat.recipes",
    "list_recipes": "onnxqat.recipes",
    "train": "onnxqat.training.run",
    "fuse": "onnxqat.fusion.api",
}

__all__ = sorted(_API) + ["__version__"]


def __getattr__(name: str):
    module = _API.get(name)
    if module is None:
        raise AttributeError(f"module 'onnxqat' has no attribute {name!r}")
    return getattr(importlib.import_module(module), name)


def __dir__():
    return __all__
