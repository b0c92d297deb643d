"""`onnxqat train`: quantization-aware (or float) training of an ONNX classifier with ONNX Runtime training."""

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
) -> None:
    """Train MODEL on DATA; writes metrics.csv/json, checkpoint_best/last.npz, model.onnx, model_best.onnx and
    histograms/*.png into --out."""
    from onnxqat.training.run import train

    with one_line_errors():
        res = train(model, data, epochs=epochs, out=out, recipe=recipe, batch_size=batch_size, lr=lr,
                    momentum=momentum, decay=decay, lr_policy=lr_policy, warmup=warmup, iteration_size=iteration_size,
                    quantizer_lr=quantizer_lr, quantizer_decay=quantizer_decay, solver=solver,
                    max_iterations=max_iterations, limit_train=limit_train, limit_test=limit_test,
                    validation=validation, resume=resume, init_from=init_from, seed=seed, threads=threads,
                    progress=not no_progress, log=lambda m: typer.echo(m, err=True))
    top1 = f"{res.test_top1:.2f}%" if res.test_top1 is not None else "n/a"
    typer.echo(f"{res.model_path} (test top-1 {top1})")
