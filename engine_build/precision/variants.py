"""`labeler build BUNDLE --precision ...`: add gated FP16/INT8 models to an existing bundle.

Each variant is written beside model.onnx as model.<precision>.onnx, checked against FP32 on the
held-out crops, and only then recorded in the sidecar's `variants` dict (which the ONNX Runtime
runner reads with `precision=`). A variant below the gate is not written and the build fails.
"""

from __future__ import annotations

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
from engine_build.precision.gate import (
    REPORT_FILE,
    GateResult,
    GateThresholds,
    compare,
    default_thresholds,
    format_table,
    write_report,
)
from worker.sidecar import ModelSpec, sha256_file

PRECISIONS = ("fp16", "int8")
EVAL_BATCH = 32


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
    calibration, heldout = _crop_sets(bundle_dir, spec, request)
    if "int8" in request.precisions and calibration is None:
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
            results.append(result)
            if result.passed:
                staging.replace(target)
                variants[precision] = {
                    "file": target.name,
                    "sha256": sha256_file(target),
                    "precision": precision,
                    "from_sha256": spec.checksum_sha256,
                    "recipe": recipe,
                    "gate": {k: v for k, v in result.to_dict().items() if k != "thresholds"},
                }
        finally:
            staging.unlink(missing_ok=True)
    write_report(bundle_dir, results, {"images": len(heldout), "names": heldout.names[:20]})
    spec = replace(spec, variants=variants)
    spec.save(bundle_dir)
    echo(format_table(results))
    failed = [r.precision for r in results if not r.passed]
    if failed:
        raise BuildError(
            f"{', '.join(failed)} below the accuracy gate (see {bundle_dir / REPORT_FILE}); not added. "
            "Try --calib-method entropy or percentile, more --calib images, or adjust --gate-* thresholds "
            "if you accept the loss"
        )
    return spec, results


def run_onnx(path: Path, input_name: str, crops: np.ndarray) -> np.ndarray:
    """Probabilities from any bundle-shaped ONNX file on the CPU (first output)."""
    import onnxruntime as ort

    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    out_name = session.get_outputs()[0].name
    rows = [
        session.run([out_name], {input_name: crops[i : i + EVAL_BATCH]})[0]
        for i in range(0, len(crops), EVAL_BATCH)
    ]
    return np.concatenate(rows).astype(np.float32)


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
    from engine_build.precision.int8 import quantize_int8

    assert calibration is not None
    recipe = quantize_int8(src, dst, calibration.crops, spec.input.name, request.calib_method)
    recipe["calibration_file"] = CALIBRATION_FILE
    recipe["calibration_sha256"] = sha256_file(dst.parent / CALIBRATION_FILE)
    return recipe


def _crop_sets(
    bundle_dir: Path, spec: ModelSpec, request: PrecisionRequest
) -> tuple[CropSet | None, CropSet | None]:
    """Fresh crops from --calib / --gate-images (stored in the bundle), else the stored ones."""
    prep = spec.preprocessing
    calibration = heldout = None
    if request.calib_dir is not None:
        paths = image_paths(request.calib_dir)
        held_count = 0 if request.heldout_dir else request.heldout_count
        calib_paths, held_paths = split_images(paths, request.calib_count, held_count, request.seed)
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
