"""Probabilities of a bundle-shaped ONNX model on the CPU: what the gate and the fallback search compare."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx

EVAL_BATCH = 32


def run_onnx(model: Path | onnx.ModelProto, input_name: str, crops: np.ndarray) -> np.ndarray:
    """First output of `model` (a file or an in-memory graph) over `crops`, in batches, as float32."""
    import onnxruntime as ort

    source = model.SerializeToString() if isinstance(model, onnx.ModelProto) else str(model)
    session = ort.InferenceSession(source, providers=["CPUExecutionProvider"])
    out_name = session.get_outputs()[0].name
    rows = [
        session.run([out_name], {input_name: crops[i : i + EVAL_BATCH]})[0]
        for i in range(0, len(crops), EVAL_BATCH)
    ]
    return np.concatenate(rows).astype(np.float32)
