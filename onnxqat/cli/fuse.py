"""`onnxqat fuse`: a trained QAT model -> integer-only ONNX (or QDQ) model; thin wrapper of onnxqat.fusion.api.fuse."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from onnxqat.cli.app import app, one_line_errors


@app.command("fuse")
def fuse_command(
    model: Annotated[Path, typer.Argument(help="QAT model (.onnx) with trained quantizers.", show_default=False)],
    output: Annotated[Optional[Path], typer.Option(
        "-o", "--output", help="Fused model path (default: MODEL with .int.onnx / .ort.onnx / .qdq.onnx).")] = None,
    format: Annotated[str, typer.Option(
        "--format", help="int (integer ops only, bit-exact: integer hardware, N2D2's IntegerOnly), ort "
        "(onnxruntime's int8 kernels QLinearConv/QGemm/QLinearAdd: the fastest on onnxruntime CPU, same codes; "
        "quantizers on residual branches make every conv one, recipes *-int) or qdq (QuantizeLinear/"
        "DequantizeLinear around float ops, portable).",
    )] = "int",
    rescale: Annotated[str, typer.Option(
        "--rescale", help="fixed-point (multiplier + rounding shift) or float.")] = "fixed-point",
    verify_data: Annotated[Optional[Path], typer.Option(
        "--verify-data", help="NPZ of inputs for the self-check (uint8 codes or float in the input range); "
        "default: random codes.")] = None,
    strict: Annotated[bool, typer.Option(
        "--strict", help="Fail when fused and fake-quantized outputs differ.")] = False,
    input_scale: Annotated[float, typer.Option(
        "--input-scale", help="Real value of one input code.", show_default="1/255")] = 1 / 255,
    input_type: Annotated[str, typer.Option(
        "--input-type", help="auto (uint8 image codes where the first layer reads the input unquantized, float where "
        "the model quantizes its input itself), uint8 (the first input holds whole codes x input scale), or float "
        "(codes made by the graph's QuantizeLinear).")] = "auto",
    keep_float: Annotated[Optional[list[str]], typer.Option(
        "--keep-float", help="Node to keep in float between Dequantize/Quantize (repeatable); nodes with no "
        "integer form are kept in float anyway and listed.")] = None,
    integer_only: Annotated[bool, typer.Option(
        "--integer-only", help="Fail instead of keeping any node in float (hardware targets, N2D2's IntegerOnly).",
    )] = False,
    min_agreement: Annotated[float, typer.Option(
        "--min-agreement", help="Fail when, layer by layer (each layer of the fake-quantized model fed the fused "
        "model's codes), fewer codes of a quantizer or of the outputs agree than this fraction (0 writes the model anyway).")] = 0.9,
    verbose: Annotated[bool, typer.Option(
        "--verbose", "-v", help="List every node kept in float (the JSON report beside the output has them too).",
    )] = False,
    samples: Annotated[int, typer.Option("--samples", help="Self-check batch size.")] = 64,
    no_verify: Annotated[bool, typer.Option(
        "--no-verify", help="Skip the self-check (--strict runs it anyway).")] = False,
    verify_engine: Annotated[str, typer.Option(
        "--verify-engine", help="Runs the fake-quantized model: onnxruntime (with the op library) or reference "
        "(onnx.reference + the numpy quantizers, the spec; slow).")] = "onnxruntime",
    force: Annotated[bool, typer.Option("--force", help="Allow the output to replace the input model.")] = False,
    dequantize_output: Annotated[bool, typer.Option(
        "--dequantize-output/--integer-output", help="Float logits (last DequantizeLinear) or int32 codes.")] = True,
) -> None:
    """Fold BatchNorm and quantizers into an integer ONNX model of standard ops (runs on stock onnxruntime).

    Nodes with no integer form stay in float between DequantizeLinear and the next quantizer; the summary lists them by op type, and OUTPUT.json beside the output has the full list and the self-check figures."""
    from onnxqat.fusion.api import fuse

    if output is None:
        output = model.with_name(model.stem + {"qdq": ".qdq.onnx", "ort": ".ort.onnx"}.get(format, ".int.onnx"))
    with one_line_errors():
        from onnxqat.files import check_not_input

        check_not_input(output, model, verify_data, force=force)
        result = fuse(model, output, format=format, rescale=rescale, verify_data=verify_data, strict=strict,
                      input_scale=input_scale, input_type=input_type, keep_float=keep_float or (),
                      verify_samples=samples, check=not no_verify or strict, verify_engine=verify_engine,
                      dequantize_output=dequantize_output, integer_only=integer_only, min_agreement=min_agreement)
    typer.echo(result.summary(verbose=verbose))
    if format == "int":
        typer.echo("note: to deploy on onnxruntime CPU, --format ort runs the same codes on its int8 kernels "
                   "(3-14x faster than this integer-only graph there; bench/fused_latency.py)")
