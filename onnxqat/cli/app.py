from __future__ import annotations

import importlib
import sys
from collections.abc import Iterator
from contextlib import contextmanager

import typer

from onnxqat.errors import OnnxqatError

app = typer.Typer(
    name="onnxqat",
    help="Quantization-aware training for ONNX models: insert quantizers, train, fuse to integers.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)

@contextmanager
def one_line_errors() -> Iterator[None]:
    """Inside a command: an OnnxqatError becomes `onnxqat: error: <message>` on stderr and exit code 1.

    Each command uses it (not only main()) because typer's CliRunner and other embedders call `app` directly,
    where main()'s handler does not run. SystemExit rather than typer.Exit: it keeps its code in standalone_mode=False.
    """
    from onnxqat.training.distributed import abort_job, rank_prefix

    try:
        yield
    except OnnxqatError as exc:
        typer.echo(f"onnxqat: error: {rank_prefix()}{exc}", err=True)
        abort_job(1)  # under mpiexec: end the other ranks too
        raise SystemExit(1) from None
    except KeyboardInterrupt:
        abort_job(130)
        raise


# One module per command group; each registers its commands on `app` when imported.
_COMMAND_MODULES = ("insert", "train", "fuse")


def _register_commands() -> None:
    for name in _COMMAND_MODULES:
        importlib.import_module(f"onnxqat.cli.{name}")


_register_commands()


def main() -> None:
    # Standalone mode: typer itself handles --help, usage errors and exit codes. Domain errors that a
    # command did not turn into a message itself still end as one line and exit code 1, never a traceback.
    try:
        app()
    except OnnxqatError as exc:
        print(f"onnxqat: error: {exc}", file=sys.stderr)
        sys.exit(1)
    except KeyboardInterrupt:
        print("onnxqat: interrupted", file=sys.stderr)
        sys.exit(130)
    except Exception:
        from onnxqat.training.distributed import abort_job

        abort_job(1)  # an unexpected error on one rank must not leave the others waiting
        raise
