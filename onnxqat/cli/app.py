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
    """Inside a command: an OnnxqatError (and an OSError: full disk, read-only folder; a MemoryError) becomes
    `onnxqat: error: <message>` on stderr and exit code 1.

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
    except OSError as exc:  # a full disk, a read-only or vanished folder, while reading or writing files
        where = f"{exc.filename}: " if getattr(exc, "filename", None) else ""
        typer.echo(f"onnxqat: error: {rank_prefix()}{where}{exc.strerror or exc}", err=True)
        abort_job(1)
        raise SystemExit(1) from None
    except MemoryError:
        typer.echo(f"onnxqat: error: {rank_prefix()}out of memory (a smaller batch size or model?)", err=True)
        abort_job(1)
        raise SystemExit(1) from None


# One module per command group; each registers its commands on `app` when imported.
_COMMAND_MODULES = ("insert", "train", "fuse")


def _register_commands() -> None:
    for name in _COMMAND_MODULES:
        importlib.import_module(f"onnxqat.cli.{name}")


_register_commands()


def main() -> None:
    # Typer (click) runs non-standalone so that its own errors (an unknown option, a missing argument, a bad value)
    # end as one `onnxqat: error:` line with exit code 2 like click's, not a five-line box, and Ctrl-C as one line
    # with exit code 130. Domain errors a command did not turn into a message itself end as one line and exit 1.
    cx, abort_types, exit_types = _click_exceptions()
    try:
        rc = app(standalone_mode=False)
    except cx.NoArgsIsHelpError as exc:  # `onnxqat` alone: the help, as asked
        typer.echo(exc.ctx.get_help() if exc.ctx else str(exc))
        sys.exit(0)
    except cx.UsageError as exc:
        where = f" (see `{exc.ctx.command_path if exc.ctx else 'onnxqat'} --help`)"
        print(f"onnxqat: error: {exc.format_message()}{where}", file=sys.stderr)
        sys.exit(exc.exit_code)
    except exit_types as exc:
        sys.exit(getattr(exc, "exit_code", 0))
    except (*abort_types, KeyboardInterrupt):
        print("onnxqat: interrupted", file=sys.stderr)
        sys.exit(130)
    except cx.ClickException as exc:
        print(f"onnxqat: error: {exc.format_message()}", file=sys.stderr)
        sys.exit(exc.exit_code)
    except OnnxqatError as exc:
        print(f"onnxqat: error: {exc}", file=sys.stderr)
        sys.exit(1)
    except Exception:
        from onnxqat.training.distributed import abort_job

        abort_job(1)  # an unexpected error on one rank must not leave the others waiting
        raise
    if rc == 130:  # typer turns Ctrl-C into Exit(130), returned in non-standalone mode
        print("onnxqat: interrupted", file=sys.stderr)
    sys.exit(rc if isinstance(rc, int) else 0)


def _click_exceptions():
    """(the exceptions module, Abort types, Exit types) of the click typer runs on: typer >= 0.2x vendors it as
    typer._click (Abort and Exit in typer.exceptions), older typer uses click itself."""
    import typer.exceptions as tx

    try:
        from typer._click import exceptions as cx
    except ImportError:  # typer on click
        from click import exceptions as cx
    abort = tuple({t for t in (getattr(cx, "Abort", None), getattr(tx, "Abort", None)) if t is not None})
    exit_ = tuple({t for t in (getattr(cx, "Exit", None), getattr(tx, "Exit", None)) if t is not None})
    return cx, abort, exit_
