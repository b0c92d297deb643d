"""The `onnxqat` command: thin typer commands over the Python API.

Each sub-command lives in its own module and registers itself on `app`;
domain errors (OnnxqatError) become one line on stderr and exit code 1.
"""

from onnxqat.cli.app import app, main

__all__ = ["app", "main"]
