"""`onnxqat train`: quantization-aware (or float) training of an ONNX model with ONNX Runtime training: labels
(cross-entropy) or distillation from the float model (MSE, L1, KL), any number of inputs and outputs."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from onnxqat.cli.app import app, one_line_errors


@app.command("train")
def train_command(
    model: Annotated[Path, typer.Argument(help="ONNX model (float, or quantized by `onnxqat insert`).",
                                          show_default=False)],
    out: Annotated[Path, typer.Option("--out", "-o", help="Output folder (metrics, checkpoints, model.onnx, PNGs).")],
    data: Annotated[str, typer.Option("--data", "-d", help="fashion-mnist, an IDX folder, a .npz file or an image "
                                                          "folder.")] = "fashion-mnist",
    epochs: Annotated[Optional[int], typer.Option("--epochs", "-e", help="Epochs (each stage).")] = None,
    recipe: Annotated[Optional[str], typer.Option("--recipe", "-r", help="Recipe name or .toml: inserts its "
                                                  "quantizers (after its previous_stage, if any) and gives solver "
                                                  "defaults.")] = None,
    batch_size: Annotated[Optional[int], typer.Option("--batch-size", "-b", help="Physical batch size.")] = None,
    lr: Annotated[Optional[float], typer.Option("--lr", help="Learning rate.")] = None,
    momentum: Annotated[Optional[float], typer.Option("--momentum", help="SGD momentum.")] = None,
    decay: Annotated[Optional[float], typer.Option("--decay", help="Weight decay.")] = None,
    solver: Annotated[Optional[str], typer.Option("--solver", help="sgd or adamw.")] = None,
    lr_policy: Annotated[Optional[str], typer.Option("--lr-policy", help="none, cosine or step.")] = None,
    warmup: Annotated[Optional[float], typer.Option("--warmup", help="Linear warmup, in epochs.")] = None,
    iteration_size: Annotated[Optional[int], typer.Option("--iteration-size", help="Batches per update "
                                                          "(gradient accumulation).")] = None,
    quantizer_lr: Annotated[Optional[float], typer.Option("--quantizer-lr", help="Learning rate of quantizer "
                                                          "alpha/step.")] = None,
    quantizer_decay: Annotated[Optional[float], typer.Option("--quantizer-decay", help="Decay of quantizer "
                                                             "alpha/step.")] = None,
    norm_decay: Annotated[Optional[float], typer.Option("--norm-decay", help="Decay of BatchNorm/LayerNorm scale and "
                                                        "shift (default: --decay; 0 keeps decay off them).")] = None,
    momentum_form: Annotated[Optional[str], typer.Option("--momentum-form", help="n2d2 (lr inside the momentum "
                                                         "buffer, N2D2/Caffe; default) or pytorch (torch.optim.SGD); "
                                                         "the same at a constant lr.")] = None,
    calibration_data: Annotated[Optional[Path], typer.Option("--calibration-data", help="With --recipe: .npz/.npy "
                                                             "batch from which insert sets the quantizers' initial "
                                                             "alpha/step.")] = None,
    max_iterations: Annotated[Optional[int], typer.Option("--max-iterations", help="Stop after this many "
                                                          "updates.")] = None,
    limit_train: Annotated[Optional[int], typer.Option("--limit-train", help="Use the first N training "
                                                       "samples.")] = None,
    limit_test: Annotated[Optional[int], typer.Option("--limit-test", help="Use the first N test samples.")] = None,
    validation: Annotated[float, typer.Option("--validation", help="Fraction of the training set held out for "
                                              "validation (best checkpoint).")] = 0.1,
    resume: Annotated[bool, typer.Option("--resume", help="Continue from <out>/checkpoint_last.npz.")] = False,
    init_from: Annotated[Optional[Path], typer.Option("--init-from", help="Copy initializers (by name) from this "
                                                      "trained model first.")] = None,
    seed: Annotated[int, typer.Option("--seed", help="Seed of shuffling, augmentation and dropout.")] = 0,
    threads: Annotated[int, typer.Option("--threads", help="ORT intra-op threads (0: ORT's default).")] = 0,
    no_progress: Annotated[bool, typer.Option("--no-progress", help="No progress bar.")] = False,
    loss: Annotated[Optional[str], typer.Option("--loss", help="ce (labels), or mse, l1, kl (distillation). "
                                                "Default: ce with labels, mse without.")] = None,
    loss_output: Annotated[Optional[list[str]], typer.Option("--loss-output", help="NAME[:WEIGHT] of a model output "
                                                             "the loss reads (repeatable).")] = None,
    distill: Annotated[bool, typer.Option("--distill", help="Targets from the float model (the model without its "
                                          "quantizers) run on the same batch; no labels needed.")] = False,
    teacher: Annotated[Optional[Path], typer.Option("--teacher", help="A float ONNX model to distil from "
                                                    "(implies --distill).")] = None,
    temperature: Annotated[float, typer.Option("--temperature", help="Temperature of the kl loss.")] = 1.0,
    data_input: Annotated[Optional[str], typer.Option("--data-input", help="The model input that takes the "
                                                      "data (when the model has several).")] = None,
    input_value: Annotated[Optional[list[str]], typer.Option("--input", help="NAME=VALUE for another model input: "
                                                             "a number, or a .npy file (repeatable).")] = None,
    scale: Annotated[Optional[float], typer.Option("--scale", help="Divide the data by this first (default 255 for "
                                                   "8-bit images, else 1).")] = None,
    mean: Annotated[Optional[str], typer.Option("--mean", help="Then subtract this (one value or one per channel, "
                                                "comma-separated).")] = None,
    std: Annotated[Optional[str], typer.Option("--std", help="Then divide by this (one value or one per "
                                               "channel).")] = None,
    no_data_init: Annotated[bool, typer.Option("--no-data-init", help="Keep the recipe's initial alpha/step of "
                                               "activation quantizers insert left uncalibrated.")] = False,
) -> None:
    """Train MODEL on DATA; writes metrics.csv/json, checkpoint_best/last.npz, model.onnx, model_best.onnx and
    histograms/*.png into --out."""
    from onnxqat.training.run import train

    with one_line_errors():
        res = train(model, data, epochs=epochs, out=out, recipe=recipe, batch_size=batch_size, lr=lr,
                    momentum=momentum, decay=decay, lr_policy=lr_policy, warmup=warmup, iteration_size=iteration_size,
                    quantizer_lr=quantizer_lr, quantizer_decay=quantizer_decay, norm_decay=norm_decay,
                    momentum_form=momentum_form, calibration_data=calibration_data, solver=solver,
                    max_iterations=max_iterations, limit_train=limit_train, limit_test=limit_test,
                    validation=validation, resume=resume, init_from=init_from, seed=seed, threads=threads,
                    loss=loss, loss_outputs=tuple(loss_output or ()), distill=distill, teacher=teacher,
                    temperature=temperature, data_input=data_input, inputs=_input_values(input_value or []),
                    scale=scale, mean=_floats(mean, "--mean"), std=_floats(std, "--std"),
                    init_quantizers=not no_data_init, settings_source="command line",
                    progress=not no_progress, log=lambda m: typer.echo(m, err=True))
    from onnxqat.training.distributed import world

    if not world().is_root:  # under mpiexec: rank 0 reports
        return
    if res.test_top1 is not None:
        typer.echo(f"{res.model_path} (test top-1 {res.test_top1:.2f}%)")
    else:
        loss_text = f"{res.test_loss:.4f}" if res.test_loss is not None else "n/a"
        typer.echo(f"{res.model_path} (test loss {loss_text})")


def _floats(text: str | None, option: str):
    if text is None:
        return None
    from onnxqat.errors import DataError

    try:
        vals = [float(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise DataError(f"{option}: expected numbers separated by commas, got {text!r}") from None
    return vals[0] if len(vals) == 1 else vals


def _input_values(items: list[str]) -> dict:
    """--input NAME=VALUE: a number (filling the input) or a .npy file."""
    import numpy as np

    from onnxqat.errors import DataError

    out = {}
    for item in items:
        name, sep, value = item.partition("=")
        if not sep or not name:
            raise DataError(f"--input {item!r}: expected NAME=VALUE")
        if value.endswith(".npy"):
            try:
                out[name] = np.load(value, allow_pickle=False)
            except (OSError, ValueError) as exc:
                raise DataError(f"--input {name}: cannot read {value} ({exc.__class__.__name__})") from None
        else:
            try:
                out[name] = np.asarray(float(value), np.float32)
            except ValueError:
                raise DataError(f"--input {name}: {value!r} is neither a number nor a .npy file") from None
    return out
