"""ONNX Runtime on the CPU: the embedded default that runs anywhere.

`precision="int8"` runs the bundle's `cpu-int8` model when it has one: the INT8 model in the form
this provider fuses into integer kernels (about 3x FP32 on a ResNet-50). The `int8` model is shaped
for TensorRT and runs slower than FP32 here; a bundle built before `cpu-int8` existed still runs it,
with a warning that says how to add the CPU one.
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np

from worker.machine import usable_cores
from worker.runners.base import InferenceOutput, Runner, RunnerError
from worker.sidecar import ModelSpec, sha256_file

log = logging.getLogger(__name__)
CPU_INT8 = "cpu-int8"


class OnnxRuntimeRunner(Runner):
    name = "onnxruntime"

    def __init__(
        self,
        bundle_dir: Path,
        spec: ModelSpec | None = None,
        precision: str = "fp32",
        intra_op_threads: int | None = None,
        inter_op_threads: int = 1,
        verify_checksum: bool = True,
    ) -> None:
        super().__init__(bundle_dir, spec)
        self.precision = precision
        self.intra_op_threads = intra_op_threads or usable_cores()
        self.inter_op_threads = inter_op_threads
        self.verify_checksum = verify_checksum
        self._session = None

    def describe(self) -> str:
        model = "" if self.model_precision() == self.precision else f" ({self.model_precision()} model)"
        return f"{super().describe()}{model}, {self.intra_op_threads} intra-op threads"

    def model_precision(self) -> str:
        """Which of the bundle's models `precision` means here: int8 is the CPU-form one if built."""
        if self.precision == "int8" and CPU_INT8 in self.spec.variants:
            return CPU_INT8
        return self.precision

    def model_path(self) -> tuple[Path, str]:
        """The ONNX file of the chosen precision and its expected checksum."""
        try:
            name, sha256 = self.spec.model_for(self.model_precision())
        except KeyError as exc:
            raise RunnerError(exc.args[0]) from None
        return self.bundle_dir / name, sha256

    def check_files(self) -> tuple[Path, str]:
        """The variant's model file and checksum, or a RunnerError that says how to build it.

        Cheap (no session, no checksum), so `labeler worker` can refuse a bundle at start instead of
        failing every job later.
        """
        try:
            path, expected = self.model_path()
        except RunnerError as exc:
            raise RunnerError(f"{exc}; {self._build_hint()}") from None
        if not path.is_file():
            raise RunnerError(f"model file missing: {path}; {self._build_hint()}")
        return path, expected

    def _build_hint(self) -> str:
        bundle = self.bundle_dir
        if self.precision == "int8":
            return (
                f"add it with: labeler build {bundle} --precision {CPU_INT8} --calib DIR (INT8 for the CPU, "
                f"which int8 runs here; labeler build {bundle} --precision int8 --calib DIR makes TensorRT's)"
            )
        if self.precision in ("fp16", CPU_INT8):
            return f"add it with: labeler build {bundle} --precision {self.precision} --calib DIR"
        if self.precision == "fp32":
            return f"rebuild the bundle: labeler build --out {bundle} --weights ... (or --onnx ...)"
        return f"precisions that can be built: fp32, fp16, int8, {CPU_INT8}"

    def _warn_tensorrt_int8(self) -> None:
        """An older bundle asked for int8: it runs, but slower than FP32; say how to make it fast."""
        if self.precision == "int8" and self.model_precision() == "int8":
            calib = "" if (self.bundle_dir / "calibration.npz").is_file() else " --calib DIR"
            log.warning(
                "%s has no %s model: --precision int8 runs the TensorRT-shaped INT8 model, which ONNX "
                "Runtime runs slower than fp32 on the CPU; add the CPU one with: labeler build %s "
                "--precision %s%s",
                self.bundle_dir, CPU_INT8, self.bundle_dir, CPU_INT8, calib,
            )  # fmt: skip

    def _load(self) -> None:
        import onnxruntime as ort

        path, expected = self.check_files()
        self._warn_tensorrt_int8()
        if self.verify_checksum and expected and sha256_file(path) != expected:
            raise RunnerError(f"{path} does not match the checksum in the sidecar; rebuild the bundle")
        options = ort.SessionOptions()
        options.intra_op_num_threads = self.intra_op_threads
        options.inter_op_num_threads = self.inter_op_threads
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        self._session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])

    def _infer(self, crops: np.ndarray, want_features: bool) -> InferenceOutput:
        names = [self.spec.probabilities_output]
        if want_features:
            names.append(self.spec.features_output)
        results = self._session.run(names, {self.spec.input.name: crops})
        features = results[1].astype(np.float32, copy=False) if want_features else None
        return InferenceOutput(results[0].astype(np.float32, copy=False), features)

    def _close(self) -> None:
        self._session = None
