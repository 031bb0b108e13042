"""Model outputs -> labels: the top-k classes of each row with their names and softmax scores."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np


def top_k_labels(probabilities: np.ndarray, classes: Sequence[str], k: int) -> list[list[dict[str, Any]]]:
    """For each row, the k best classes, best first."""
    k = max(1, min(k, probabilities.shape[1]))
    if k < probabilities.shape[1]:
        candidates = np.argpartition(-probabilities, k - 1, axis=1)[:, :k]
    else:
        candidates = np.tile(np.arange(probabilities.shape[1]), (probabilities.shape[0], 1))
    rows = []
    for row, idx in zip(probabilities, candidates, strict=True):
        order = idx[np.argsort(-row[idx], kind="stable")]
        rows.append([{"index": int(i), "label": classes[i], "score": round(float(row[i]), 6)} for i in order])
    return rows
