"""The layer-sensitivity ranking, cached in the bundle: the slow part of an INT8 build, done once.

Ranking runs the model once per INT8 layer (65 on an EfficientNet: most of a build's minutes). It
depends only on the all-INT8 model, the FP32 model and the calibration crops it is measured on, not
on the gate thresholds or the fallback budget; so a rebuild that only changes those (the usual
reaction to a failed gate) reads it back from `sensitivity.json` instead of measuring it again.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict
from pathlib import Path

import numpy as np
import onnx

from engine_build.precision.fallback import LayerSensitivity

SENSITIVITY_FILE = "sensitivity.json"


def ranking_key(qdq: onnx.ModelProto, fp32_sha256: str, crops: np.ndarray) -> str:
    """What the ranking depends on: the all-INT8 graph, the FP32 model, the crops measured on."""
    digest = hashlib.sha256(qdq.SerializeToString(deterministic=True))
    digest.update(fp32_sha256.encode())
    digest.update(np.ascontiguousarray(crops).tobytes())
    return digest.hexdigest()


def load_ranking(bundle_dir: Path, precision: str, key: str) -> list[LayerSensitivity] | None:
    """The cached ranking for `precision` if it was measured for exactly this key."""
    entry = _read(bundle_dir).get(precision)
    if not entry or entry.get("key") != key:
        return None
    return [LayerSensitivity(**layer) for layer in entry["ranking"]]


def save_ranking(
    bundle_dir: Path, precision: str, key: str, ranking: list[LayerSensitivity], seconds: float
) -> None:
    cache = _read(bundle_dir)
    cache[precision] = {"key": key, "seconds": round(seconds, 1), "ranking": [asdict(s) for s in ranking]}
    path = Path(bundle_dir) / SENSITIVITY_FILE
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(cache, indent=1) + "\n")
    tmp.replace(path)


def _read(bundle_dir: Path) -> dict:
    path = Path(bundle_dir) / SENSITIVITY_FILE
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
