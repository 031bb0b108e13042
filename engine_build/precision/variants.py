"""`labeler build BUNDLE --precision ...`: add gated FP16/INT8 models to an existing bundle.

Each variant is written beside model.onnx as model.<precision>.onnx, checked against FP32 on the
held-out crops, and only then recorded in the sidecar's `variants` dict (which the runners read
with `precision=`). A variant below the gate is not written and the build fails.

INT8 comes in two forms from the same calibration crops: `int8`, shaped for TensorRT (int8.py), and
`cpu-int8`, shaped for ONNX Runtime's CPU kernels (cpu_int8.py). When one misses the gate, the
fallback search chooses how many layers stay FP32 on one half of the held-out crops, and the other
half, which took no part in the choice, gives the verdict: a figure that holds for new photos
within its stated 95% interval, instead of one picked as the first to pass on the images it is
reported on.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np

from engine_build.errors import BuildError
from engine_build.precision.calibration import (
    CALIBRATION_FILE,
    HELDOUT_FILE,
    CropSet,
    image_paths,
    load_crops,
    split_images,
)
from engine_build.precision.evaluate import run_onnx
from engine_build.precision.fallback import FallbackSettings
from engine_build.precision.gate import (
    REPORT_FILE,
    GateResult,
    GateThresholds,
    compare,
    default_thresholds,
    format_table,
    margin_failures,
    write_report,
)
from worker.sidecar import ModelSpec, sha256_file

PRECISIONS = ("fp16", "int8", "cpu-int8")
INT8_FORMS = ("int8", "cpu-int8")  # TensorRT's Q/DQ form, ONNX Runtime CPU's
RUNS_ON = {"fp16": "any backend", "int8": "tensorrt", "cpu-int8": "onnxruntime (CPU)"}


@dataclass(frozen=True)
class PrecisionRequest:
    precisions: tuple[str, ...]
    calib_dir: Path | None = None
    calib_count: int = 500
    heldout_dir: Path | None = None  # default: the --calib images not used for calibration
    heldout_count: int = 500
    calib_method: str = "minmax"
    threshold_overrides: dict[str, float | int | None] = field(default_factory=dict)
    seed: int = 0
    fallback: FallbackSettings = field(default_factory=FallbackSettings)
    reduce_range: bool = True  # cpu-int8: 7-bit weights, the same numbers with and without VNNI

    def thresholds(self, precision: str) -> GateThresholds:
        return replace(default_thresholds(precision), **self.threshold_overrides)


def add_precision_variants(
    bundle_dir: Path, request: PrecisionRequest, echo: Callable[[str], None] = print
) -> tuple[ModelSpec, list[GateResult]]:
    """Convert, gate and record each requested precision; raise BuildError if any fails the gate."""
    bundle_dir = Path(bundle_dir)
    spec = ModelSpec.load(bundle_dir)
    unknown = set(request.precisions) - set(PRECISIONS)
    if unknown:
        raise BuildError(f"unknown precision {sorted(unknown)}; choose from {', '.join(PRECISIONS)}")
    fp32_path = bundle_dir / spec.model_file
    if sha256_file(fp32_path) != spec.checksum_sha256:
        raise BuildError(f"{fp32_path} does not match its sidecar checksum; rebuild the bundle first")
    calibration, heldout = _crop_sets(bundle_dir, spec, request, echo)
    if set(INT8_FORMS) & set(request.precisions) and calibration is None:
        raise BuildError(
            "INT8 needs calibration images: pass --calib DIR (about 500 images like the ones you will "
            f"label); a bundle that already has {CALIBRATION_FILE} reuses it"
        )
    if heldout is None or len(heldout) == 0:
        raise BuildError(
            "the accuracy gate needs held-out images: pass --calib DIR with more images than "
            "--calib-count, or --gate-images DIR"
        )
    reference = run_onnx(fp32_path, spec.input.name, heldout.crops)
    results: list[GateResult] = []
    details: dict[str, dict[str, Any]] = {}
    variants = dict(spec.variants)
    for precision in request.precisions:
        target = bundle_dir / f"model.{precision}.onnx"
        staging = target.with_name(target.name + ".tmp")
        try:
            recipe = _convert(precision, fp32_path, staging, spec, calibration, request)
            result = compare(
                reference,
                run_onnx(staging, spec.input.name, heldout.crops),
                precision,
                request.thresholds(precision),
            )
            if precision in INT8_FORMS and not result.passed and request.fallback.mode == "auto":
                result, recipe["fallback"] = _int8_fallback(
                    precision,
                    bundle_dir,
                    staging,
                    spec,
                    calibration,
                    reference,
                    heldout,
                    request,
                    result,
                    echo,
                )
                details[precision] = {"fallback": recipe["fallback"]}
            results.append(result)
            if result.passed:
                staging.replace(target)
                variants[precision] = {
                    "file": target.name,
                    "sha256": sha256_file(target),
                    "precision": precision,
                    "runs_on": RUNS_ON[precision],
                    "from_sha256": spec.checksum_sha256,
                    "recipe": recipe,
                    "gate": {k: v for k, v in result.to_dict().items() if k != "thresholds"},
                }
                if precision in INT8_FORMS:  # the one line a reader of the sidecar looks for
                    variants[precision]["fp32_layers"] = [
                        layer["layer"] for layer in recipe.get("fallback", {}).get("fp32_layers", [])
                    ]
        finally:
            staging.unlink(missing_ok=True)
    write_report(bundle_dir, results, {"images": len(heldout), "names": heldout.names[:20]}, details)
    spec = replace(spec, variants=variants)
    spec.save(bundle_dir)
    echo(format_table(results))
    failed = [r.precision for r in results if not r.passed]
    if failed:
        raise BuildError(
            f"{', '.join(failed)} below the accuracy gate (see {bundle_dir / REPORT_FILE}); not added. "
            "Try --calib-method entropy or percentile, more --calib images, a larger --int8-fallback-budget, "
            "or adjust --gate-* thresholds if you accept the loss"
        )
    return spec, results


def _int8_fallback(
    precision: str,
    bundle_dir: Path,
    staging: Path,
    spec: ModelSpec,
    calibration: CropSet | None,
    reference: np.ndarray,
    heldout: CropSet,
    request: PrecisionRequest,
    all_int8: GateResult,
    echo: Callable[[str], None],
) -> tuple[GateResult, dict[str, Any]]:
    """INT8 missed the gate: keep its most harmful layers in FP32 (fallback.py), the count chosen
    on the search half of the held-out crops, the verdict given by the other half; rewrite
    `staging` with the mixed model when the verdict passes. Returns the verdict and the record."""
    import onnx

    from engine_build.precision.fallback import search_fallback
    from engine_build.precision.graph_parts import prepared_copy
    from engine_build.precision.sensitivity import load_ranking, ranking_key, save_ranking

    assert calibration is not None
    thresholds = request.thresholds(precision)
    search, verdict = split_heldout(len(heldout))
    echo(
        f"{precision} missed the gate ({'; '.join(all_int8.failures)}): measuring each layer's sensitivity; "
        f"the layers kept in FP32 are chosen on {len(search)} held-out images, judged on the other {len(verdict)}"
    )
    started = time.monotonic()
    search_limits = replace(thresholds, min_images=1)  # a chooser; the verdict holds the minimum

    def gate(model: onnx.ModelProto) -> GateResult:
        found = run_onnx(model, spec.input.name, heldout.crops[search])
        result = compare(reference[search], found, precision, search_limits)
        result.failures += margin_failures(result, search_limits)
        return result

    qdq = onnx.load(str(staging))
    settings = request.fallback
    sensitivity_crops = calibration.crops[: settings.sensitivity_images]
    key = ranking_key(qdq, spec.checksum_sha256, sensitivity_crops)
    key += f"-coarse{settings.coarse_images}-refine{settings.refine_layers}"
    cached = load_ranking(bundle_dir, precision, key)
    if cached is not None:
        echo(
            f"{precision}: layer sensitivity read from the bundle (measured before on the same model and crops)"
        )
    fp32 = prepared_copy(str(bundle_dir / spec.model_file))
    found = search_fallback(
        qdq, fp32, spec.input.name, calibration.crops, gate, thresholds, request.fallback, echo, cached
    )
    if cached is None:
        save_ranking(bundle_dir, precision, key, found.ranking, time.monotonic() - started)
    record = found.recipe(request.fallback)
    record["all_int8_gate"] = {k: v for k, v in all_int8.to_dict().items() if k != "thresholds"}
    record["ranking_cached"] = cached is not None
    record["search_images"] = [heldout.names[i] for i in search]
    record["verdict_images"] = [heldout.names[i] for i in verdict]
    if not found.passed or found.model is None:
        record["search_seconds"] = round(time.monotonic() - started, 1)
        return all_int8 if found.gate is None else found.gate, record
    record["search_gate"] = {k: v for k, v in found.gate.to_dict().items() if k != "thresholds"}
    result = compare(
        reference[verdict],
        run_onnx(found.model, spec.input.name, heldout.crops[verdict]),
        precision,
        thresholds,
    )
    record["search_seconds"] = round(time.monotonic() - started, 1)
    echo(
        f"{precision} verdict with {len(found.layers)} layer(s) in FP32 on {len(verdict)} images the search "
        f"did not see: top-1 {result.top1_agreement:.4f}, top-5 {result.top5_overlap:.4f}"
        + (" PASS" if result.passed else " FAIL")
    )
    if not result.passed:
        hint = (
            f"give --gate-count at least {2 * thresholds.min_images}: the search and the verdict take half each"
            if len(verdict) < thresholds.min_images
            else "more held-out images (--gate-count) narrow both halves' noise"
        )
        result.failures.append(
            f"passed on the {len(search)} images that chose the layers, not on {len(verdict)} others ({hint})"
        )
        return result, record
    _check_form(precision, found.model, request)
    onnx.save(found.model, str(staging))
    return result, record


def split_heldout(count: int) -> tuple[np.ndarray, np.ndarray]:
    """Indexes of the search and verdict halves (alternating, so both see the seeded order's mix)."""
    indexes = np.arange(count)
    return indexes[0::2], indexes[1::2]


def _check_form(precision: str, model: Any, request: PrecisionRequest) -> None:
    if precision == "cpu-int8":
        from engine_build.precision.cpu_int8 import check_cpu_form

        check_cpu_form(model, request.reduce_range)
    else:
        from engine_build.precision.int8 import check_tensorrt_form

        check_tensorrt_form(model)


def _convert(
    precision: str,
    src: Path,
    dst: Path,
    spec: ModelSpec,
    calibration: CropSet | None,
    request: PrecisionRequest,
) -> dict[str, Any]:
    if precision == "fp16":
        from engine_build.precision.fp16 import convert_fp16

        return convert_fp16(src, dst)
    assert calibration is not None
    if precision == "cpu-int8":
        from engine_build.precision.cpu_int8 import quantize_cpu_int8

        recipe = quantize_cpu_int8(
            src, dst, calibration.crops, spec.input.name, request.calib_method, request.reduce_range
        )
    else:
        from engine_build.precision.int8 import quantize_int8

        recipe = quantize_int8(src, dst, calibration.crops, spec.input.name, request.calib_method)
    recipe["calibration_file"] = CALIBRATION_FILE
    recipe["calibration_sha256"] = sha256_file(dst.parent / CALIBRATION_FILE)
    return recipe


HOLDOUT_SHARE = 0.3  # of a --calib folder too small for both counts, held out for the gate


def _split_counts(available: int, request: PrecisionRequest) -> tuple[int, int]:
    """(calibration, held-out) counts from one --calib folder of `available` images.

    With --gate-images the folder only calibrates. Otherwise, when it holds too few images for
    --calib-count plus --gate-count, a share of it (at least the gate's minimum, at most
    --gate-count) is held out and the rest calibrates, instead of leaving the gate nothing.
    """
    if request.heldout_dir is not None:
        return min(available, request.calib_count), 0
    if available >= request.calib_count + request.heldout_count:
        return request.calib_count, request.heldout_count
    minimum = max(request.thresholds(p).min_images for p in request.precisions)
    held = max(available - request.calib_count, round(available * HOLDOUT_SHARE), minimum)
    held = min(held, request.heldout_count, available - 1)
    return available - held, held


def _crop_sets(
    bundle_dir: Path, spec: ModelSpec, request: PrecisionRequest, echo: Callable[[str], None] = print
) -> tuple[CropSet | None, CropSet | None]:
    """Fresh crops from --calib / --gate-images (stored in the bundle), else the stored ones."""
    prep = spec.preprocessing
    calibration = heldout = None
    if request.calib_dir is not None:
        paths = image_paths(request.calib_dir)
        calib_count, held_count = _split_counts(len(paths), request)
        if (
            request.heldout_dir is None
            and calib_count + held_count < request.calib_count + request.heldout_count
        ):
            echo(
                f"--calib {request.calib_dir}: {len(paths)} images, fewer than --calib-count "
                f"{request.calib_count} + --gate-count {request.heldout_count}: calibrating on "
                f"{calib_count}, holding out {held_count} for the accuracy gate"
            )
        calib_paths, held_paths = split_images(paths, calib_count, held_count, request.seed)
        calibration = load_crops(calib_paths, prep)
        if len(calibration) == 0:
            raise BuildError(f"no decodable images in {request.calib_dir}")
        calibration.save(bundle_dir / CALIBRATION_FILE)
        if held_paths:
            heldout = load_crops(held_paths, prep)
    elif (bundle_dir / CALIBRATION_FILE).is_file():
        calibration = CropSet.load(bundle_dir / CALIBRATION_FILE)
    if request.heldout_dir is not None:
        _, held_paths = split_images(image_paths(request.heldout_dir), 0, request.heldout_count, request.seed)
        heldout = load_crops(held_paths, prep)
    if heldout is not None and len(heldout):
        heldout.save(bundle_dir / HELDOUT_FILE)
    elif (bundle_dir / HELDOUT_FILE).is_file():
        heldout = CropSet.load(bundle_dir / HELDOUT_FILE)
    return calibration, heldout
