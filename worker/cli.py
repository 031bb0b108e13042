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


@main.command()
@click.argument("bundle", type=click.Path(exists=True, file_okay=False, path_type=Path))
def inspect(bundle: Path) -> None:
    """Print a bundle's sidecar in a readable form."""
    click.echo(summarize(ModelSpec.load(bundle), bundle))


@main.command()
@click.argument("inputs", nargs=-1, required=True)
@click.option(
    "--model",
    "model_dir",
    type=click.Path(exists=True, file_okay=False, path_type=Path),
    help="Model bundle (default: the embedded ResNet-50, built on first use).",
)
@click.option(
    "--out",
    "out_path",
    type=click.Path(dir_okay=False, path_type=Path),
    default="results.jsonl",
    show_default=True,
    help="JSON-lines results file.",
)
@click.option(
    "--allowed-root",
    "allowed_roots",
    multiple=True,
    type=click.Path(path_type=Path),
    help="Only read files under this directory (repeatable).",
)
@click.option("--resume", is_flag=True, help="Skip inputs that already have a record in --out.")
@click.option(
    "--retry-errors",
    is_flag=True,
    help="With --resume: drop the error records from --out first, so those images are tried again.",
)
@click.option("--top-k", type=int, default=5, show_default=True)
@click.option("--embeddings", is_flag=True, help="Add the 2048-d pooled features to each record.")
@click.option(
    "--batch-size",
    type=int,
    help="Largest engine batch [32 on the CPU; 128 on a GPU backend, capped by the engine].",
)
@click.option(
    "--max-wait-ms", type=float, default=20.0, show_default=True, help="Longest wait to fill a batch."
)
@click.option("--decode-threads", type=int, default=0, help="Decode threads (0: one per core).")
@click.option("--threads", type=int, default=0, help="ONNX Runtime intra-op threads (0: one per core).")
@click.option("--precision", default="fp32", show_default=True, help="Which model of the bundle to run.")
@click.option(
    "--backend",
    type=click.Choice(["auto", "onnxruntime", "tensorrt", "torch-cuda"]),
    default="auto",
    show_default=True,
    help="auto: a TensorRT engine for this GPU, else PyTorch CUDA, else ONNX Runtime on the CPU.",
)
@click.option("--max-bytes", type=int, default=64 * 1024 * 1024, show_default=True, help="Largest file read.")
@click.option(
    "--max-pixels",
    type=int,
    default=128 * 1024 * 1024,
    show_default=True,
    help="Largest image decoded (decompression-bomb guard).",
)
@click.option("--progress/--no-progress", default=None, help="Progress bar (default: when stderr is a TTY).")
def run(
    inputs: tuple[str, ...],
    model_dir: Path | None,
    out_path: Path,
    allowed_roots: tuple[Path, ...],
    resume: bool,
    retry_errors: bool,
    top_k: int,
    embeddings: bool,
    batch_size: int | None,
    max_wait_ms: float,
    decode_threads: int,
    threads: int,
    precision: str,
    backend: str,
    max_bytes: int,
    max_pixels: int,
    progress: bool | None,
) -> None:
    """Label INPUTS (files, directories, @list files, - for stdin) into a JSONL file."""
    from tqdm import tqdm

    from worker.inputs import iter_input_paths
    from worker.local_run import run_local
    from worker.reading import ReadPolicy
    from worker.runners import RunnerError, create_runner
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
    try:
        runner = create_runner(model_dir, backend, variant=precision, intra_op_threads=threads or None)
    except RunnerError as exc:
        raise click.ClickException(str(exc)) from None
    options = ServiceOptions(
        max_batch_size=batch_size or runner.default_batch_size,
        max_wait_s=max_wait_ms / 1000.0,
        decode_threads=decode_threads,
        top_k=top_k,
        embeddings=embeddings,
        read_policy=ReadPolicy.create([str(r) for r in allowed_roots], max_bytes),
        max_pixels=max_pixels,
    )
    if retry_errors:
        from worker.results import drop_error_records

        resume = True
        click.echo(f"{drop_error_records(out_path)} error records dropped from {out_path} to retry", err=True)
    show = sys.stderr.isatty() if progress is None else progress
    bar = tqdm(total=0, unit="img", disable=not show, dynamic_ncols=True, smoothing=0.1)

    def on_total(total: int) -> None:
        bar.total = total
        bar.refresh()

    try:
        summary = run_local(
            iter_input_paths(inputs),
            runner,
            out_path,
            options,
            resume,
            on_record=lambda _rec: bar.update(1),
            on_total=on_total,
        )
    except (RunnerError, OSError) as exc:
        raise click.ClickException(str(exc)) from None
    except KeyboardInterrupt:
        bar.close()
        click.echo(
            f"interrupted: images in flight were finished and written to {out_path}; "
            "run the same command with --resume to go on",
            err=True,
        )
        sys.exit(130)
    finally:
        bar.close()
    for line in summary.lines():
        click.echo(line, err=True)
    click.echo(f"results in {os.path.abspath(out_path)}", err=True)
    for warning in spec.warnings:
        click.secho(f"WARNING: {warning}", fg="red", bold=True, err=True)
    if not summary.complete:
        sys.exit(1)


# Subcommands that live with the code they drive: each module defines one click command (or a
# list of them) and is registered here, so `labeler --help` shows them all.
_COMMAND_MODULES = (
    "engine_build.cli_build",
    "worker.cli_distributed",
    "worker.cli_report",
    "engine_build.cli_finetune",
)


def _register_commands() -> None:
    import importlib

    for module_name in _COMMAND_MODULES:
        module = importlib.import_module(module_name)
        for command in module.COMMANDS:
            main.add_command(command)


_register_commands()

if __name__ == "__main__":
    main()
