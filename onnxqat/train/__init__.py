"""Training on ONNX Runtime training artifacts: data, transforms, solvers, loop, checkpoints; `run.train()`.

`onnxqat.train` is both this package and the public function: once a submodule such as `onnxqat.train.data` is
imported, Python binds the package to the attribute `onnxqat.train`, so the package itself is callable and
`onnxqat.train(model, data=..., ...)` always runs `onnxqat.train.run.train`.
"""

import sys as _sys
import types as _types


class _CallableModule(_types.ModuleType):
    def __call__(self, *args, **kwargs):
        from onnxqat.train.run import train

        return train(*args, **kwargs)


_sys.modules[__name__].__class__ = _CallableModule
