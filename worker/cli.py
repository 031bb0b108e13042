"""The `labeler` command line. Each subcommand is also `python -m worker SUBCOMMAND`."""

from __future__ import annotations

import logging
import os
import sys
from pathlib import Path

import click

from worker.sidecar import ModelSpec, summarize


@click.group(context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.option("-v", "--verbose", is_flag=True, help="Log debug detail to stderr.")
@click.version_option(package_name="resnet-labeler")
def main(verbose: bool) -> None:
    """Label images with a trained ResNet-50: locally, or over Celery and Redis on many GPUs."""
    logging.basicConfig(
        level=logging.DEBUG if verbose else logging.WARNING,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )


def _triple(text: str | None) -> tuple[float, float, float] | None:
    if text is None:
        return None
    values = tuple(float(v) for v in text.replace(",", " ").split())
    if len(values) != 3:
        raise click.BadParameter("give three numbers, e.g. 0.485,0.456,0.406")
    return values  # type: ignore[return-value]


@main.command()
@click.option("--out", "out_dir", type=click.Path(path_type=Path), required=True, help="Bundle directory to write.")
@click.option("--weights", help="FILE (torchvision-style state_dict or checkpoint), 'imagenet', or 'random'.")
@click.option("--onnx", "onnx_file", type=click.Path(exists=True, dir_okay=False, path_type=Path),
              help="Import any one-input NCHW/NHWC float image classifier.")
@click.option("--labels", type=click.Path(exists=True, dir_okay=False, path_type=Path),
              help="Class names, one per line, in class-index order.")
@click.option("--num-classes", type=int, default=1000, show_default=True, help="Classes for --weights random.")
@click.option("--seed", type=int, default=0, show_default=True, help="Seed for --weights random.")
@click.option("--input-size", type=int, default=224, show_default=True, help="Crop size fed to the model.")
@click.option("--resize-size", type=int, default=256, show_default=True, help="Shorter side before the crop.")
@click.option("--resize", type=click.Choice(["shorter_side", "exact"]), default="shorter_side", show_default=True)
@click.option("--mean", help="Per-channel mean in 0..1 units, model channel order [ImageNet].")
@click.option("--std", help="Per-channel std in 0..1 units [ImageNet].")
@click.option("--channel-order", type=click.Choice(["RGB", "BGR"]), default="RGB", show_default=True,
              help="Channel order the model expects.")
@click.option("--layout", type=click.Choice(["NCHW", "NHWC"]), default="NCHW", show_default=True,
              help="Layout the imported ONNX model expects.")
@click.option("--output", "output_name", help="ONNX output to use (default: the first).")
@click.option("--output-kind", type=click.Choice(["logits", "probabilities"]), default="logits",
              show_default=True, help="What the imported ONNX output holds.")
@click.option("--verify-images", type=click.Path(exists=True, file_okay=False, path_type=Path),
              help="Photos to check the bundle against its source (default: packaged samples).")
def build(out_dir: Path, weights: str | None, onnx_file: Path | None, labels: Path | None, num_classes: int,
          seed: int, input_size: int, resize_size: int, resize: str, mean: str | None, std: str | None,
          channel_order: str, layout: str, output_name: str | None, output_kind: str,
          verify_images: Path | None) -> None:
    """Build a model bundle (model.onnx + model.json) from PyTorch weights or an ONNX file."""
    from engine_build.errors import BuildError
    from worker.inputs import iter_input_paths
    from worker.sidecar import Preprocessing

    if (weights is None) == (onnx_file is None):
        raise click.UsageError("give exactly one of --weights or --onnx")
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
        if onnx_file is not None:
            from engine_build.build import build_from_onnx

            spec = build_from_onnx(onnx_file, out_dir, prep, labels, output_name, output_kind == "logits", images)
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
    click.echo(f"verified    {check.get('images')} photos, max |diff| {check.get('max_abs_diff', 0):.2e} "
               f"against the source model, top-1 agreement {check.get('top1_agreement', 0):.0%}")


@main.command()
@click.argument("bundle", type=click.Path(exists=True, file_okay=False, path_type=Path))
def inspect(bundle: Path) -> None:
    """Print a bundle's sidecar in a readable form."""
    click.echo(summarize(ModelSpec.load(bundle), bundle))


@main.command()
@click.argument("inputs", nargs=-1, required=True)
@click.option("--model", "model_dir", type=click.Path(exists=True, file_okay=False, path_type=Path),
              help="Model bundle (default: the embedded ResNet-50, built on first use).")
@click.option("--out", "out_path", type=click.Path(dir_okay=False, path_type=Path), default="results.jsonl",
              show_default=True, help="JSON-lines results file.")
@click.option("--allowed-root", "allowed_roots", multiple=True, type=click.Path(path_type=Path),
              help="Only read files under this directory (repeatable).")
@click.option("--resume", is_flag=True, help="Skip inputs that already have a record in --out.")
@click.option("--top-k", type=int, default=5, show_default=True)
@click.option("--embeddings", is_flag=True, help="Add the 2048-d pooled features to each record.")
@click.option("--batch-size", type=int, default=32, show_default=True)
@click.option("--max-wait-ms", type=float, default=20.0, show_default=True, help="Longest wait to fill a batch.")
@click.option("--decode-threads", type=int, default=0, help="Decode threads (0: one per core).")
@click.option("--threads", type=int, default=0, help="ONNX Runtime intra-op threads (0: one per core).")
@click.option("--precision", default="fp32", show_default=True, help="Which model of the bundle to run.")
@click.option("--max-bytes", type=int, default=64 * 1024 * 1024, show_default=True, help="Largest file read.")
@click.option("--max-pixels", type=int, default=128 * 1024 * 1024, show_default=True,
              help="Largest image decoded (decompression-bomb guard).")
@click.option("--progress/--no-progress", default=None, help="Progress bar (default: when stderr is a TTY).")
def run(inputs: tuple[str, ...], model_dir: Path | None, out_path: Path, allowed_roots: tuple[Path, ...],
        resume: bool, top_k: int, embeddings: bool, batch_size: int, max_wait_ms: float, decode_threads: int,
        threads: int, precision: str, max_bytes: int, max_pixels: int, progress: bool | None) -> None:
    """Label INPUTS (files, directories, @list files, - for stdin) into a JSONL file."""
    from tqdm import tqdm

    from worker.inputs import iter_input_paths
    from worker.local_run import run_local
    from worker.reading import ReadPolicy
    from worker.runners import RunnerError
    from worker.runners.onnxruntime_runner import OnnxRuntimeRunner
    from worker.service import ServiceOptions

    if model_dir is None:
        from engine_build.default_bundle import ensure_default_bundle
        from engine_build.errors import BuildError

        try:
            model_dir = ensure_default_bundle(echo=lambda m: click.echo(m, err=True))
        except BuildError as exc:
            raise click.ClickException(str(exc)) from None
    spec = ModelSpec.load(model_dir)
    for warning in spec.warnings:
        click.secho(f"WARNING: {warning}", fg="red", bold=True, err=True)
    options = ServiceOptions(
        max_batch_size=batch_size,
        max_wait_s=max_wait_ms / 1000.0,
        decode_threads=decode_threads,
        top_k=top_k,
        embeddings=embeddings,
        read_policy=ReadPolicy.create([str(r) for r in allowed_roots], max_bytes),
        max_pixels=max_pixels,
    )
    runner = OnnxRuntimeRunner(model_dir, spec, variant=precision, intra_op_threads=threads or None)
    show = sys.stderr.isatty() if progress is None else progress
    bar = tqdm(total=0, unit="img", disable=not show, dynamic_ncols=True, smoothing=0.1)

    def on_total(total: int) -> None:
        bar.total = total
        bar.refresh()

    try:
        summary = run_local(iter_input_paths(inputs), runner, out_path, options, resume,
                            on_record=lambda _rec: bar.update(1), on_total=on_total)
    except (RunnerError, OSError) as exc:
        raise click.ClickException(str(exc)) from None
    finally:
        bar.close()
    for line in summary.lines():
        click.echo(line, err=True)
    click.echo(f"results in {os.path.abspath(out_path)}", err=True)
    for warning in spec.warnings:
        click.secho(f"WARNING: {warning}", fg="red", bold=True, err=True)


if __name__ == "__main__":
    main()
