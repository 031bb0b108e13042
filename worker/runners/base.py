"""The runner interface and the checks every backend shares.

As in Polygraphy, the base class owns the life cycle and the checks (loaded first? uint8 crops of
the right shape? one output row per input?) and a backend overrides only the small `_load`,
`_infer` and `_close` hooks.
"""

from __future__ import annotations

import abc
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from worker.sidecar import ModelSpec


class RunnerError(RuntimeError):
    """The runner cannot do its job (missing backend, bad bundle, failed inference)."""


@dataclass(frozen=True)
class InferenceOutput:
    probabilities: np.ndarray  # (N, num_classes) float32, rows sum to 1
    features: np.ndarray | None = None  # (N, feature_size) float32, when asked for


class PendingInference(Protocol):
    """A batch the backend has started; result() waits for it and returns its outputs."""

    def result(self) -> InferenceOutput: ...


@dataclass(frozen=True)
class FinishedInference:
    """A batch computed synchronously (backends without a queue of their own)."""

    output: InferenceOutput

    def result(self) -> InferenceOutput:
        return self.output


@dataclass
class _CheckedInference:
    """Checks the backend's outputs when the caller collects them, as infer() does."""

    runner: Runner
    pending: PendingInference
    count: int

    def result(self) -> InferenceOutput:
        output = self.pending.result()
        self.runner._check_output(output, self.count)
        return output


class Runner(abc.ABC):
    """load() once in the process that infers, infer() per batch, close() at the end.

    Backends with a device queue (GPU streams) also accept submit(): up to `pipeline_depth` batches
    may be started before the oldest one is collected with result(), so the copies of the next batch
    and the host's work on the last one overlap the current batch's compute.
    """

    name = "base"
    precision = "fp32"  # which of the bundle's models (every backend takes precision=)
    # The batch a caller uses when the user sets none: enough to amortize per-batch costs on a CPU;
    # GPU backends ask for more, since a GPU needs large batches to be busy.
    default_batch_size = 32

    def __init__(self, bundle_dir: Path, spec: ModelSpec | None = None) -> None:
        self.bundle_dir = Path(bundle_dir)
        self.spec = spec or ModelSpec.load(self.bundle_dir)
        self._loaded = False

    def describe(self) -> str:
        """What actually runs, for the start log (under `--backend auto` the choice is made here)."""
        return f"{self.name} {self.precision}"

    @property
    def max_batch_size(self) -> int | None:
        """The largest batch the backend accepts (None: unbounded)."""
        return None

    def load(self) -> Runner:
        if not self._loaded:
            self._load()
            self._loaded = True
        return self

    @property
    def pipeline_depth(self) -> int:
        """How many submitted batches may be in flight before the oldest must be collected."""
        return 1

    def infer(self, crops: np.ndarray, want_features: bool = False) -> InferenceOutput:
        crops = self._check_input(crops, want_features)
        output = self._infer(crops, want_features)
        self._check_output(output, crops.shape[0])
        return output

    def submit(self, crops: np.ndarray, want_features: bool = False) -> PendingInference:
        """Start a batch; result() on the returned object finishes it (at most pipeline_depth open).

        The default computes it now: only GPU backends have something to overlap."""
        crops = self._check_input(crops, want_features)
        return _CheckedInference(self, self._submit(crops, want_features), crops.shape[0])

    @property
    def batch_device(self) -> str | None:
        """The torch device whose tensors submit_device() takes (None: host arrays only). The GPU
        decode stage makes its batches there, so they never come back through the host."""
        return None

    def submit_device(self, batch: Any, want_features: bool = False) -> PendingInference:
        """Start a batch already on `batch_device`: a uint8 (N, H, W, 3) torch tensor whose producing
        work is queued on the caller's current stream (or done). Checked as submit() checks."""
        if self.batch_device is None:
            raise RunnerError(f"{self.name} runner takes host arrays only, not batches in device memory")
        if str(batch.dtype) != "torch.uint8":
            raise RunnerError(f"{self.name} runner expects uint8 crops, got {batch.dtype}")
        self._check_batch(tuple(batch.shape), want_features)
        return _CheckedInference(self, self._submit_device(batch, want_features), batch.shape[0])

    def _submit_device(self, batch: Any, want_features: bool) -> PendingInference:
        raise RunnerError(f"{self.name} runner has no device-batch path")

    def staging(self, count: int) -> np.ndarray | None:
        """A uint8 (count, H, W, 3) host buffer the next submit() reads from in place (pinned memory
        on a GPU backend), or None. Stacking a batch straight into it saves allocating and copying
        the batch once more on the inference thread (about 10 ms for 256 crops of 224x224)."""
        return None

    def _submit(self, crops: np.ndarray, want_features: bool) -> PendingInference:
        return FinishedInference(self._infer(crops, want_features))

    def _check_input(self, crops: np.ndarray, want_features: bool) -> np.ndarray:
        if crops.dtype != np.uint8:
            raise RunnerError(f"{self.name} runner expects uint8 crops, got {crops.dtype} {crops.shape}")
        self._check_batch(crops.shape, want_features)
        return np.ascontiguousarray(crops)

    def _check_batch(self, shape: tuple[int, ...], want_features: bool) -> None:
        if not self._loaded:
            raise RunnerError(f"{self.name} runner: call load() before infer()")
        expected = (self.spec.input.height, self.spec.input.width, 3)
        if len(shape) != 4 or tuple(shape[1:]) != expected:
            raise RunnerError(
                f"{self.name} runner expects uint8 crops (N, {expected[0]}, {expected[1]}, 3), got {tuple(shape)}"
            )
        if want_features and not self.spec.features_output:
            raise RunnerError("this bundle has no features output (embeddings need a PyTorch export)")
        limit = self.max_batch_size
        if limit is not None and shape[0] > limit:
            raise RunnerError(f"batch of {shape[0]} exceeds the engine's maximum {limit}")

    def _check_output(self, output: InferenceOutput, count: int) -> None:
        if output.probabilities.shape != (count, self.spec.num_classes):
            raise RunnerError(
                f"{self.name} runner returned {output.probabilities.shape} for {count} images "
                f"and {self.spec.num_classes} classes"
            )

    def close(self) -> None:
        if self._loaded:
            self._close()
            self._loaded = False

    def __enter__(self) -> Runner:
        return self.load()

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    @abc.abstractmethod
    def _load(self) -> None: ...

    @abc.abstractmethod
    def _infer(self, crops: np.ndarray, want_features: bool) -> InferenceOutput: ...

    def _close(self) -> None:
        """Release backend resources; the default has none to release."""
        return None
