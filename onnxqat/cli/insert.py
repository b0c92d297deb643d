"""`onnxqat insert`, `onnxqat recipes`, `onnxqat inspect`: thin commands over onnxqat.passes and onnxqat.recipes."""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Annotated, Optional

import typer

from onnxqat.cli.app import app, one_line_errors
from onnxqat.errors import OnnxqatError

ModelArg = Annotated[Path, typer.Argument(help="ONNX model file.", show_default=False)]


def _echo_warnings(caught) -> None:
    from onnxqat.passes.insert import QuantizationWarning

    for w in caught:
        if issubclass(w.category, QuantizationWarning):
            typer.echo(f"onnxqat: warning: {w.message}", err=True)
        else:
            warnings.showwarning(w.message, w.category, w.filename, w.lineno)


@app.command("insert")
def insert_command(
    model: ModelArg,
    recipe: Annotated[str, typer.Option("--recipe", "-r", help="Recipe name (see `onnxqat recipes`) or .toml path.")],
    output: Annotated[
        Optional[Path], typer.Option("--output", "-o", help="Output QAT model (required unless --dry-run).")
    ] = None,
    dry_run: Annotated[bool, typer.Option("--dry-run", help="Print the plan; write nothing.")] = False,
    force: Annotated[bool, typer.Option("--force", help="Allow the output to replace the input model.")] = False,
    calibration_data: Annotated[
        Optional[Path],
        typer.Option(
            "--calibration-data",
            help=".npz (an array per model input) or .npy (one input): activation alpha/step from a float run on it.",
        ),
    ] = None,
) -> None:
    """Insert SAT/LSQ quantizer nodes into MODEL as RECIPE says."""
    from onnxqat.passes import insert as passes

    with one_line_errors():
        if output is None and not dry_run:
            raise OnnxqatError("missing --output/-o (or use --dry-run)")
        if not dry_run:
            from onnxqat.files import check_not_input

            check_not_input(output, model, calibration_data, force=force)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            if dry_run:
                plan = passes.plan(model, recipe, calibration_data)
                typer.echo(plan.format(), nl=False)
            else:
                plan = passes.insert_file(model, recipe, output, calibration_data)
        _echo_warnings(caught)
    if not dry_run:
        typer.echo(
            f"wrote {output}: {len(plan.weights)} weight quantizers, {len(plan.activations)} activation quantizers "
            f"(recipe {plan.recipe})"
        )


@app.command("recipes")
def recipes_command() -> None:
    """List the shipped recipes, one line each."""
    from onnxqat.recipes import list_recipes

    with one_line_errors():
        recipes = list_recipes()
    width = max((len(r.name) for r in recipes), default=0)
    for r in recipes:
        stage = f" (after {r.previous_stage})" if r.previous_stage else ""
        typer.echo(f"{r.name.ljust(width)}  {r.description}{stage}")


@app.command("inspect")
def inspect_command(model: ModelArg) -> None:
    """Print MODEL's quantizers (node, method, bits, parameters) and its weight memory at those bits."""
    from onnxqat.passes.inspect import inspect

    with one_line_errors():
        report = inspect(model)
    if not report.rows:
        typer.echo(f"onnxqat: {model}: no quantizer nodes (run `onnxqat insert` first)", err=True)
    typer.echo(report.format(), nl=False)


__all__ = ["insert_command", "recipes_command", "inspect_command"]
