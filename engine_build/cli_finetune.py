"""`labeler finetune`: train a ResNet-50 classifier on your own image folders with Keras."""

from __future__ import annotations

import sys
from pathlib import Path

import click


@click.command()
@click.argument("data_dir", type=click.Path(exists=True, file_okay=False, path_type=Path))
@click.option(
    "--out",
    "out_path",
    type=click.Path(dir_okay=False, path_type=Path),
    required=True,
    help="Model file to write (MODEL.keras); MODEL.labels.txt and MODEL.training.json go beside it.",
)
@click.option(
    "--weights",
    default="imagenet",
    show_default=True,
    help="Backbone weights: 'imagenet' (downloaded by Keras), a local Keras weights FILE, or 'none'.",
)
@click.option("--input-size", type=int, default=224, show_default=True, help="Square input size in pixels.")
@click.option("--epochs", type=int, default=5, show_default=True, help="Epochs of the first phase.")
@click.option(
    "--fine-tune-epochs",
    type=int,
    default=0,
    show_default=True,
    help="Then unfreeze the last stage (conv5) for this many epochs (pretrained weights only).",
)
@click.option("--batch-size", type=int, default=32, show_default=True)
@click.option("--learning-rate", type=float, default=1e-3, show_default=True)
@click.option("--fine-tune-learning-rate", type=float, default=1e-5, show_default=True)
@click.option(
    "--held-out", type=float, default=0.2, show_default=True, help="Fraction of each class kept for checking."
)
@click.option(
    "--augment/--no-augment", default=True, show_default=True, help="Random flip, shift, brightness."
)
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--workers", type=int, default=2, show_default=True, help="Image decoding threads.")
@click.option("--progress/--no-progress", default=None, help="Progress bar (default: when stdout is a TTY).")
def finetune(
    data_dir: Path,
    out_path: Path,
    weights: str,
    input_size: int,
    epochs: int,
    fine_tune_epochs: int,
    batch_size: int,
    learning_rate: float,
    fine_tune_learning_rate: float,
    held_out: float,
    augment: bool,
    seed: int,
    workers: int,
    progress: bool | None,
) -> None:
    """Train on DATA_DIR (one folder per class) with Keras 3 on PyTorch; no TensorFlow needed.

    Then `labeler build --keras MODEL.keras --out BUNDLE` makes a bundle that `labeler run` uses.
    """
    from engine_build.errors import BuildError
    from engine_build.keras_finetune import FinetuneOptions
    from engine_build.keras_finetune import finetune as train

    if weights == "none" and fine_tune_epochs:
        raise click.UsageError("--fine-tune-epochs needs pretrained --weights; from scratch all layers train")
    options = FinetuneOptions(
        weights=weights,
        input_size=input_size,
        epochs=epochs,
        fine_tune_epochs=fine_tune_epochs,
        batch_size=batch_size,
        learning_rate=learning_rate,
        fine_tune_learning_rate=fine_tune_learning_rate,
        held_out_fraction=held_out,
        augment=augment,
        seed=seed,
        workers=workers,
        progress=sys.stdout.isatty() if progress is None else progress,
    )
    try:
        result = train(data_dir, out_path, options, echo=click.echo)
    except BuildError as exc:
        raise click.ClickException(str(exc)) from None
    click.echo(f"next: labeler build --keras {result.model_path} --out BUNDLE_DIR")


COMMANDS = [finetune]
