"""One call into ONNX Runtime's static QDQ quantizer with our own activation ranges, shared by the
TensorRT-shaped INT8 (int8.py) and the CPU-shaped one (cpu_int8.py); each passes its recipe."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import numpy as np


def quantize_with_ranges(src: Path, dst: Path, crops: np.ndarray, input_name: str, keep: list[str],
                         **recipe: Any) -> None:  # fmt: skip
    """quantize_static in QDQ form, per-channel, MinMax, `keep` left in float; `recipe` adds the
    op types, activation/weight types and extra options (its TensorQuantOverrides are our ranges)."""
    from onnxruntime.quantization import (
        CalibrationDataReader,
        CalibrationMethod,
        QuantFormat,
        quantize_static,
    )

    class OneBatch(CalibrationDataReader):
        """Every quantized tensor's range is overridden with ours; ONNX Runtime's own minmax pass
        only has to run (it is required), so one small batch is enough."""

        def __init__(self) -> None:
            self._batch: np.ndarray | None = crops[:2]

        def get_next(self) -> dict[str, np.ndarray] | None:
            batch, self._batch = self._batch, None
            return None if batch is None else {input_name: batch}

    root = logging.getLogger()
    level = root.level
    # The quantizer warns on the root logger to run its pre-processing (shape inference, constant
    # folding); the exporter already folded BatchNorm and constants, so the advice is noise here.
    root.setLevel(max(level, logging.ERROR))
    try:
        quantize_static(str(src), str(dst), OneBatch(), quant_format=QuantFormat.QDQ, per_channel=True,
                        nodes_to_exclude=keep, calibrate_method=CalibrationMethod.MinMax, **recipe)  # fmt: skip
    finally:
        root.setLevel(level)
