"""The decode stage: bytes in, the model's uint8 crops out, behind one contract (`--decode`).

The service reads and checks every file on its CPU pool (allowed roots, size caps, the header), then
hands the bytes to the stage in two steps. `prepare` runs on a pool thread per image and returns
either the finished host crop or a `Deferred` image that waits for its batch; `assemble` runs on the
inference thread per batch and returns the batch (host array or device tensor) plus the inputs it
could not decode, which the service decodes again with OpenCV one by one. So a GPU decoder and the
OpenCV reference can be swapped without touching inference, and no image ever fails a whole batch.

`cpu` (the default and the reference) decodes with OpenCV in `prepare`. `gpu` defers JPEGs to the
GPU stage (worker/pipeline/gpu_decode.py); `auto` takes it where it can load, else `cpu`.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any, Protocol

import numpy as np

from worker.pipeline.preprocess import CropPlan, decode_and_crop
from worker.setting_table import SETTINGS
from worker.sidecar import Preprocessing

log = logging.getLogger(__name__)

DECODE_CHOICES: tuple[str, ...] = SETTINGS["decode"].choices


@dataclass(frozen=True)
class Deferred:
    """An image that passed the CPU checks and is decoded with its batch (by the GPU stage)."""

    data: bytes
    plan: CropPlan  # from the header; the stage recomputes the box from the decoded size
    pixels: int  # the header's width x height: what decoding it will take in device memory


StageInput = np.ndarray | Deferred


@dataclass
class Assembled:
    """A batch ready for the runner: one row per input not in `failed`, in input order."""

    batch: Any  # uint8 (N, H, W, 3): np.ndarray, or a tensor in the runner's device memory
    failed: list[int] = field(default_factory=list)  # inputs to decode again on the CPU


class DecodeStage(Protocol):
    name: str
    on_device: bool  # batches are device tensors for Runner.submit_device
    optional: bool  # `auto`: if load() fails the service falls back to the CPU stage

    def prepare(self, data: bytes, prep: Preprocessing, max_pixels: int) -> StageInput: ...
    def load(self) -> None: ...  # on the inference thread, after the runner
    def assemble(self, inputs: list[StageInput], staging: np.ndarray | None) -> Assembled: ...
    def close(self) -> None: ...


class CpuDecodeStage:
    """OpenCV on the decode pool (worker/pipeline/preprocess.py); batches are stacked on the host."""

    name = "cpu"
    on_device = False
    optional = False

    def prepare(self, data: bytes, prep: Preprocessing, max_pixels: int) -> StageInput:
        return decode_and_crop(data, prep, max_pixels)

    def load(self) -> None:
        return None

    def assemble(self, inputs: list[StageInput], staging: np.ndarray | None) -> Assembled:
        return Assembled(np.stack(inputs, out=staging))

    def close(self) -> None:
        return None


__all__ = ["DECODE_CHOICES", "Assembled", "CpuDecodeStage", "DecodeStage", "Deferred"]
