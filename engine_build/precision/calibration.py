"""Calibration and held-out crops: made by the worker's decode_and_crop, kept in the bundle.

The crops are uint8 (N, H, W, 3), exactly what the bundle graph takes, so calibration sees the same
pixels serving will (same decoder, same resize, same crop; the normalization is inside the graph).
They are saved as compressed .npz files in the bundle with each source file's name and SHA-256, so
`labeler build BUNDLE --precision int8` without --calib rebuilds the same INT8 model from them.
"""

from __future__ import annotations

import hashlib
import logging
import random
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from worker.pipeline.errors import ImageError
from worker.pipeline.inputs import iter_input_paths
from worker.pipeline.preprocess import decode_and_crop
from worker.sidecar import Preprocessing

log = logging.getLogger(__name__)

CALIBRATION_FILE = "calibration.npz"
HELDOUT_FILE = "heldout.npz"


@dataclass
class CropSet:
    """uint8 crops plus where each came from."""

    crops: np.ndarray  # (N, H, W, 3) uint8
    names: list[str]
    sha256: list[str]
    skipped: int = 0

    def __len__(self) -> int:
        return int(self.crops.shape[0])

    def save(self, path: Path) -> None:
        tmp = path.with_name(path.name + ".tmp.npz")
        np.savez_compressed(tmp, crops=self.crops, names=np.array(self.names), sha256=np.array(self.sha256))
        tmp.replace(path)

    @classmethod
    def load(cls, path: Path) -> CropSet:
        with np.load(path, allow_pickle=False) as data:
            return cls(data["crops"], [str(n) for n in data["names"]], [str(s) for s in data["sha256"]])


def split_images(paths: list[str], calib_count: int, heldout_count: int, seed: int = 0) -> tuple[list, list]:
    """A seeded shuffle, then disjoint calibration and held-out lists (the same files every time)."""
    ordered = sorted(paths)
    random.Random(seed).shuffle(ordered)
    return ordered[:calib_count], ordered[calib_count : calib_count + heldout_count]


def image_paths(folder: Path) -> list[str]:
    return list(iter_input_paths([str(folder)]))


def load_crops(paths: list[str], prep: Preprocessing) -> CropSet:
    """Decode and crop each file; undecodable files are skipped and counted, never fatal."""
    crops, names, digests, skipped = [], [], [], 0
    for path in paths:
        try:
            data = Path(path).read_bytes()
            crops.append(decode_and_crop(data, prep))
        except (ImageError, OSError) as exc:
            log.warning("calibration: skipping %s (%s)", path, exc)
            skipped += 1
            continue
        names.append(Path(path).name)
        digests.append(hashlib.sha256(data).hexdigest())
    height, width = prep.crop_size
    stacked = np.stack(crops) if crops else np.zeros((0, height, width, 3), np.uint8)
    return CropSet(stacked, names, digests, skipped)
