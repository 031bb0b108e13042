"""Which engine in a bundle fits this node, and is it safe to load?

A TensorRT engine is native code for one GPU model and one TensorRT version, and deserializing one
from an untrusted source is unsafe (NVIDIA's own warning). So the worker only looks in the bundle's
engines/ folder (no path from the command line or a task), ignores links that lead out of it,
checks the engine's SHA-256 against its record, and checks the record's ONNX checksum against the
bundle's current model, so a stale engine is refused instead of silently serving an old model.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from worker.runners.base import RunnerError
from worker.runners.gpu_info import GpuInfo
from worker.sidecar import ModelSpec

ENGINE_DIR = "engines"


@dataclass(frozen=True)
class EngineChoice:
    record: dict[str, Any]
    path: Path


def expected_onnx_sha(spec: ModelSpec, precision: str) -> str | None:
    """The checksum an engine's record must carry for `precision` (None: no such model)."""
    try:
        return spec.model_for(precision)[1]
    except KeyError:
        return None


def load_records(bundle_dir: Path) -> list[dict[str, Any]]:
    """Every engine record in the bundle (unreadable records are skipped)."""
    folder = Path(bundle_dir) / ENGINE_DIR
    records = []
    for path in sorted(folder.glob("*.json")) if folder.is_dir() else []:
        try:
            record = json.loads(path.read_text())
        except (OSError, ValueError):
            continue
        if isinstance(record, dict) and "engine_file" in record:
            records.append(record)
    return records


def mismatches(
    record: dict[str, Any], spec: ModelSpec, precision: str, gpu: GpuInfo, trt_version: str | None
) -> list[str]:
    """Why this record does not fit (empty: it fits)."""
    reasons = []
    if record.get("precision") != precision:
        reasons.append(f"precision {record.get('precision')}")
    if record.get("gpu_name") != gpu.name:
        reasons.append(f"built for {record.get('gpu_name')}")
    if record.get("compute_capability") != gpu.compute_capability:
        reasons.append(f"compute capability {record.get('compute_capability')}")
    if trt_version is not None and record.get("tensorrt_version") != trt_version:
        reasons.append(f"TensorRT {record.get('tensorrt_version')}")
    if record.get("onnx_sha256") != expected_onnx_sha(spec, precision):
        reasons.append("built from an older model (ONNX checksum differs)")
    return reasons


def rebuild_hint(bundle_dir: Path, precision: str) -> str:
    return f"build one on this node: labeler build {bundle_dir} --tensorrt --precision {precision}"


def choose_engine(
    bundle_dir: Path, spec: ModelSpec, precision: str, gpu: GpuInfo, trt_version: str | None
) -> EngineChoice:
    """The engine for this GPU, TensorRT version, precision and model, or a RunnerError that says
    what was found and how to rebuild."""
    bundle_dir = Path(bundle_dir)
    found = []
    for record in load_records(bundle_dir):
        reasons = mismatches(record, spec, precision, gpu, trt_version)
        if not reasons:
            return EngineChoice(record, trusted_engine_path(bundle_dir, record["engine_file"]))
        found.append(f"{record['engine_file']} ({', '.join(reasons)})")
    have = "; ".join(found) if found else "no engines"
    raise RunnerError(
        f"no TensorRT engine in {bundle_dir} for {gpu.name} (sm {gpu.compute_capability}), TensorRT "
        f"{trt_version}, {precision}: found {have}. Engines only run on the GPU model and TensorRT "
        f"version they were built with; {rebuild_hint(bundle_dir, precision)}"
    )


def trusted_engine_path(bundle_dir: Path, file_name: str) -> Path:
    """The engine file inside bundle/engines/, never a path that leaves it."""
    folder = (Path(bundle_dir) / ENGINE_DIR).resolve()
    path = (folder / file_name).resolve()
    if path.parent != folder or not path.name.endswith(".engine"):
        raise RunnerError(f"engine record names {file_name!r}, outside {folder}: refusing to load it")
    if not path.is_file():
        raise RunnerError(f"engine file missing: {path}")
    return path


def read_verified(choice: EngineChoice) -> bytes:
    data = choice.path.read_bytes()
    if hashlib.sha256(data).hexdigest() != choice.record.get("engine_sha256"):
        raise RunnerError(f"{choice.path.name} does not match the checksum in its record; rebuild it")
    return data
