"""Writing a bundle: the classifier with preprocessing prepended, checked, checksummed, described.

A bundle directory holds `model.onnx` (uint8 crops in, probabilities [and features] out, dynamic
batch) and `model.json` (the sidecar). Later issues add precision variants and engines beside them.
"""

from __future__ import annotations

import shutil
import tempfile
from dataclasses import replace
from pathlib import Path
from typing import Any

import onnx

from engine_build.preprocess_graph import prepend_preprocessing
from worker.sidecar import ModelInput, ModelSpec, Preprocessing, sha256_file


def write_bundle(
    out_dir: Path,
    classifier: onnx.ModelProto,
    prep: Preprocessing,
    classes: list[str],
    source: dict[str, Any],
    probabilities_output: str = "probabilities",
    features_output: str | None = None,
    feature_size: int | None = None,
    warnings: tuple[str, ...] = (),
) -> ModelSpec:
    """Prepend preprocessing, check the graph, and write model.onnx + model.json atomically."""
    out_dir = Path(out_dir)
    model_input = ModelInput(height=prep.crop_size[0], width=prep.crop_size[1])
    full = prepend_preprocessing(classifier, prep, model_input)
    full.producer_name = "resnet-labeler"
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=".bundle-", dir=out_dir.parent))
    try:
        model_path = staging / "model.onnx"
        onnx.save(full, str(model_path))
        onnx.checker.check_model(str(model_path), full_check=True)
        spec = ModelSpec(
            preprocessing=prep,
            classes=tuple(classes),
            input=model_input,
            probabilities_output=probabilities_output,
            features_output=features_output,
            feature_size=feature_size,
            precision="fp32",
            checksum_sha256=sha256_file(model_path),
            source=source,
            warnings=warnings,
        )
        spec.save(staging)
        if out_dir.exists():
            shutil.rmtree(out_dir)
        staging.rename(out_dir)
    finally:
        if staging.exists():
            shutil.rmtree(staging, ignore_errors=True)
    return spec


def record_verification(out_dir: Path, spec: ModelSpec, verification: dict[str, Any]) -> ModelSpec:
    """Store the parity check's figures in the sidecar's source section."""
    source = dict(spec.source)
    source["verification"] = verification
    updated = replace(spec, source=source)
    updated.save(out_dir)
    return updated
