"""The `labeler build` options for precision variants and TensorRT engines, as one decorator.

`labeler build BUNDLE --precision fp16 --precision int8 --calib DIR` adds gated variants to an
existing bundle (`--precision cpu-int8`: the INT8 model for ONNX Runtime on the CPU); `labeler build --out DIR --weights ... --precision fp16` builds and then adds them;
`--tensorrt` (on a GPU node with TensorRT) builds an engine for each requested precision. Kept here so
the build command's own module stays about building bundles.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from pathlib import Path
from typing import Any

import click

from engine_build.precision.fallback import DEFAULT_MAX_LAYERS, DEFAULT_SENSITIVITY_IMAGES

_SOURCE_OPTIONS = ("weights", "onnx_file", "keras", "keras_file", "keras_model")


def precision_options(command: Callable[..., None]) -> Callable[..., None]:
    """Wrap the build command: optional BUNDLE argument plus the precision/engine options."""

    @functools.wraps(command)
    def wrapper(
        *args: Any,
        bundle: Path | None,
        precisions: tuple[str, ...],
        calib: Path | None,
        calib_count: int,
        calib_method: str,
        int8_fallback: str,
        int8_fallback_budget: int,
        int8_sensitivity_images: int,
        reduce_range: bool,
        gate_images: Path | None,
        gate_count: int,
        gate_top1: float | None,
        gate_top5: float | None,
        gate_mean_diff: float | None,
        gate_min_images: int | None,
        tensorrt: bool,
        min_batch: int,
        opt_batch: int,
        max_batch: int,
        workspace_mib: int,
        opt_level: int,
        **kwargs: Any,
    ) -> None:
        from engine_build.errors import BuildError

        if tensorrt and "cpu-int8" in precisions:
            raise click.UsageError(
                "cpu-int8 is the INT8 model for ONNX Runtime on the CPU (uint8 activations with zero "
                "points, which TensorRT rejects); TensorRT engines are built from --precision int8"
            )
        if bundle is not None:
            if kwargs.get("out_dir") or any(kwargs.get(k) for k in _SOURCE_OPTIONS):
                raise click.UsageError(
                    "BUNDLE adds variants or engines to an existing bundle; to build a new one use --out "
                    "with --weights or --onnx (--precision works there too)"
                )
            if not precisions and not tensorrt:
                raise click.UsageError("nothing to add to BUNDLE: give --precision and/or --tensorrt")
            target = bundle
        else:
            if kwargs.get("out_dir") is None:
                raise click.UsageError(
                    "give --out DIR to build a bundle, or an existing BUNDLE to add variants to"
                )
            command(*args, **kwargs)
            target = kwargs["out_dir"]
        overrides = {
            key: value
            for key, value in (
                ("min_top1_agreement", gate_top1),
                ("min_top5_overlap", gate_top5),
                ("max_mean_score_diff", gate_mean_diff),
                ("min_images", gate_min_images),
            )
            if value is not None
        }
        try:
            if precisions:
                from engine_build.precision.fallback import FallbackSettings
                from engine_build.precision.variants import PrecisionRequest, add_precision_variants

                request = PrecisionRequest(
                    precisions=tuple(dict.fromkeys(precisions)),
                    calib_dir=calib,
                    calib_count=calib_count,
                    heldout_dir=gate_images,
                    heldout_count=gate_count,
                    calib_method=calib_method,
                    threshold_overrides=overrides,
                    fallback=FallbackSettings(int8_fallback, int8_fallback_budget, int8_sensitivity_images),
                    reduce_range=reduce_range,
                )
                add_precision_variants(target, request, echo=click.echo)
            if tensorrt:
                from engine_build.tensorrt_engine import EngineSettings, build_engine

                for precision in dict.fromkeys(precisions or ("fp32",)):
                    settings = EngineSettings(
                        precision, min_batch, opt_batch, max_batch, workspace_mib, opt_level
                    )
                    build_engine(target, settings, echo=click.echo)
        except ImportError as exc:
            raise click.ClickException(
                f"{exc.name} is not installed: TensorRT engines are built on a GPU node with "
                "TensorRT (pip install 'resnet-labeler[tensorrt]')"
            ) from None
        except (BuildError, ValueError) as exc:
            raise click.ClickException(str(exc)) from None

    options = [
        click.argument(
            "bundle", required=False, type=click.Path(exists=True, file_okay=False, path_type=Path)
        ),
        click.option(
            "--precision",
            "precisions",
            multiple=True,
            type=click.Choice(["fp16", "int8", "cpu-int8"]),
            help="Add a gated reduced-precision model (repeatable); int8 is shaped for TensorRT, "
            "cpu-int8 for ONNX Runtime on the CPU (what --precision int8 runs there when present).",
        ),
        click.option(
            "--calib",
            type=click.Path(exists=True, file_okay=False, path_type=Path),
            help="Images for INT8 calibration; the rest are held out for the gate (30% when too few for both counts).",
        ),
        click.option(
            "--calib-count", type=int, default=500, show_default=True, help="Calibration images used."
        ),
        click.option(
            "--calib-method",
            type=click.Choice(["minmax", "entropy", "percentile"]),
            default="minmax",
            show_default=True,
        ),
        click.option(
            "--int8-fallback",
            type=click.Choice(["auto", "none"]),
            default="auto",
            show_default=True,
            help="When INT8 misses the gate, keep its most sensitive layers in FP32 until it passes (auto).",
        ),
        click.option(
            "--int8-fallback-budget",
            type=click.IntRange(min=1),
            default=DEFAULT_MAX_LAYERS,
            show_default=True,
            help="Most layers --int8-fallback auto may keep in FP32.",
        ),
        click.option(
            "--int8-sensitivity-images",
            type=click.IntRange(min=1),
            default=DEFAULT_SENSITIVITY_IMAGES,
            show_default=True,
            help="Calibration crops each layer's sensitivity is measured on (ranked once, cached in the bundle).",
        ),
        click.option(
            "--reduce-range/--no-reduce-range",
            default=True,
            show_default=True,
            help="cpu-int8: 7-bit weights, so CPUs without VNNI (whose u8 x s8 sums can saturate) "
            "compute what the gate measured.",
        ),
        click.option(
            "--gate-images",
            type=click.Path(exists=True, file_okay=False, path_type=Path),
            help="Held-out images for the accuracy gate (default: --calib images not used to calibrate).",
        ),
        click.option("--gate-count", type=int, default=500, show_default=True, help="Held-out images used."),
        click.option(
            "--gate-top1", type=float, help="Minimum top-1 agreement with FP32 [fp16 0.99, int8 0.97]."
        ),
        click.option(
            "--gate-top5", type=float, help="Minimum top-5 overlap with FP32 [fp16 0.98, int8 0.95]."
        ),
        click.option(
            "--gate-mean-diff", type=float, help="Maximum mean top-1 score difference [0.005 / 0.03]."
        ),
        click.option("--gate-min-images", type=int, help="Fewest held-out images the gate accepts [50]."),
        click.option("--tensorrt", is_flag=True, help="Build a TensorRT engine per precision for this GPU."),
        click.option(
            "--min-batch", type=int, default=1, show_default=True, help="Engine profile minimum batch."
        ),
        click.option(
            "--opt-batch", type=int, default=128, show_default=True, help="Engine profile optimal batch."
        ),
        click.option(
            "--max-batch", type=int, default=256, show_default=True, help="Engine profile maximum batch."
        ),
        click.option(
            "--workspace-mib", type=int, default=4096, show_default=True, help="TensorRT workspace limit."
        ),
        click.option(
            "--opt-level", type=int, default=3, show_default=True, help="Builder optimization level 0-5."
        ),
    ]
    for option in reversed(options):
        wrapper = option(wrapper)
    return wrapper
