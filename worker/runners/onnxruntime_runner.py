"""ONNX Runtime on the CPU: the embedded default that runs anywhere."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from worker.machine import usable_cores
from worker.runners.base import InferenceOutput, Runner, RunnerError
from worker.sidecar import ModelSpec, sha256_file


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
        return f"{super().describe()}, {self.intra_op_threads} intra-op threads"

    def model_path(self) -> tuple[Path, str]:
        """The ONNX file of the chosen precision and its expected checksum."""
        try:
            name, sha256 = self.spec.model_for(self.precision)
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
        if self.precision in ("fp16", "int8"):
            return f"add it with: labeler build {self.bundle_dir} --precision {self.precision} --calib DIR"
        if self.precision == "fp32":
            return f"rebuild the bundle: labeler build --out {self.bundle_dir} --weights ... (or --onnx ...)"
        return "precisions that can be built: fp32, fp16, int8"

    def _load(self) -> None:
        import onnxruntime as ort

        path, expected = self.check_files()
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
