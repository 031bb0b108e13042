"""`labeler build`: make a model bundle from PyTorch weights or an ONNX file."""

from __future__ import annotations

from pathlib import Path

import click

from engine_build.precision.cli_options import precision_options
from worker.sidecar import summarize


def _triple(text: str | None) -> tuple[float, float, float] | None:
    if text is None:
        return None
    values = tuple(float(v) for v in text.replace(",", " ").split())
    if len(values) != 3:
        raise click.BadParameter("give three numbers, e.g. 0.485,0.456,0.406")
    return values  # type: ignore[return-value]


@click.command()
@click.option("--out", "out_dir", type=click.Path(path_type=Path), help="Bundle directory to write.")
@click.option("--weights", help="FILE (torchvision-style state_dict or checkpoint), 'imagenet', or 'random'.")
@click.option(
    "--onnx",
    "onnx_file",
    type=click.Path(exists=True, dir_okay=False, path_type=Path),
    help="Import any one-input NCHW/NHWC float image classifier.",
)
@click.option(
    "--keras",
    "keras_file",
    type=click.Path(exists=True, dir_okay=False, path_type=Path),
    help="A Keras 3 model (MODEL.keras, e.g. from labeler finetune); caffe-style NHWC preprocessing.",
)
@click.option(
    "--labels",
    type=click.Path(exists=True, dir_okay=False, path_type=Path),
    help="Class names, one per line, in class-index order.",
)
@click.option(
    "--num-classes", type=int, default=1000, show_default=True, help="Classes for --weights random."
)
@click.option("--seed", type=int, default=0, show_default=True, help="Seed for --weights random.")
@click.option("--input-size", type=int, default=224, show_default=True, help="Crop size fed to the model.")
@click.option("--resize-size", type=int, default=256, show_default=True, help="Shorter side before the crop.")
@click.option(
    "--resize", type=click.Choice(["shorter_side", "exact"]), default="shorter_side", show_default=True
)
@click.option("--mean", help="Per-channel mean in 0..1 units, model channel order [ImageNet].")
@click.option("--std", help="Per-channel std in 0..1 units [ImageNet].")
@click.option(
    "--channel-order",
    type=click.Choice(["RGB", "BGR"]),
    default="RGB",
    show_default=True,
    help="Channel order the model expects.",
)
@click.option(
    "--layout",
    type=click.Choice(["NCHW", "NHWC"]),
    default="NCHW",
    show_default=True,
    help="Layout the imported ONNX model expects.",
)
@click.option("--output", "output_name", help="ONNX output to use (default: the first).")
@click.option(
    "--output-kind",
    type=click.Choice(["logits", "probabilities"]),
    default="logits",
    show_default=True,
    help="What the imported ONNX output holds.",
)
@click.option(
    "--verify-images",
    type=click.Path(exists=True, file_okay=False, path_type=Path),
    help="Photos to check the bundle against its source (default: packaged samples).",
)
@precision_options  # BUNDLE argument, --precision/--calib/--tensorrt (engine_build/precision)
def build(
    out_dir: Path,
    weights: str | None,
    onnx_file: Path | None,
    keras_file: Path | None,
    labels: Path | None,
    num_classes: int,
    seed: int,
    input_size: int,
    resize_size: int,
    resize: str,
    mean: str | None,
    std: str | None,
    channel_order: str,
    layout: str,
    output_name: str | None,
    output_kind: str,
    verify_images: Path | None,
) -> None:
    """Build a model bundle (model.onnx + model.json) from PyTorch weights, ONNX or a Keras model."""
    from engine_build.errors import BuildError
    from worker.pipeline.inputs import iter_input_paths
    from worker.sidecar import Preprocessing

    if [weights, onnx_file, keras_file].count(None) != 2:
        raise click.UsageError("give exactly one of --weights, --onnx or --keras")
    defaults = Preprocessing()
    prep = Preprocessing(
        crop_size=(input_size, input_size),
        resize_size=resize_size if resize == "shorter_side" else input_size,
        resize=resize,  # type: ignore[arg-type]
        mean=_triple(mean) or defaults.mean,
        std=_triple(std) or defaults.std,
        model_channel_order=channel_order,  # type: ignore[arg-type]
        model_layout=layout if onnx_file else "NCHW",  # type: ignore[arg-type]
    )
    images = [Path(p) for p in iter_input_paths([str(verify_images)])] if verify_images else None
    try:
        if keras_file is not None:
            from engine_build.keras_export import build_from_keras_cli

            spec = build_from_keras_cli(keras_file, out_dir, labels, images, click.get_current_context())
        elif onnx_file is not None:
            from engine_build.build import build_from_onnx

            spec = build_from_onnx(
                onnx_file, out_dir, prep, labels, output_name, output_kind == "logits", images
            )
        else:
            from engine_build.build import build_from_weights
            from engine_build.default_bundle import labeler_home
            from engine_build.weights import imagenet_weights, load_weights_file, random_weights

            if weights == "imagenet":
                loaded = imagenet_weights(labeler_home() / "weights")
            elif weights == "random":
                loaded = random_weights(num_classes, seed)
            else:
                loaded = load_weights_file(Path(weights))
            spec = build_from_weights(loaded, out_dir, prep, labels, images)
    except BuildError as exc:
        raise click.ClickException(str(exc)) from None
    click.echo(summarize(spec, out_dir))
    check = spec.source.get("verification", {})
    click.echo(
        f"verified    {check.get('images')} photos, max |diff| {check.get('max_abs_diff', 0):.2e} "
        f"against the source model, top-1 agreement {check.get('top1_agreement', 0):.0%}"
    )


COMMANDS = [build]
