"""Top-1 labels of two backends compared up to near-ties: what float kernels may legitimately change.

Two backends (or one backend on two CPU vendors) compute the same model with different kernels and
summation orders, so probabilities differ in their last bits (a few 1e-6 on the test models; the
tests assert below 1e-4). Where an image's best two classes are closer than that, its argmax is a
coin toss of the kernels, not a property of the export or the runner: such an image may take
either label. Everywhere else the labels must be equal. Exact label equality instead would test
the machine, not the code.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np


def assert_same_labels_up_to_ties(reference: np.ndarray, labels: Sequence[int], tie: float) -> int:
    """Each of `labels` (class indices, one per row) is the top-1 of `reference` (N, classes) or
    scores within `tie` of it there. Returns how many differ (all of them near-ties)."""
    scores = np.asarray(reference, dtype=np.float64)
    chosen = np.asarray(labels)
    assert chosen.shape == (scores.shape[0],), (chosen.shape, scores.shape)
    gap = scores.max(1) - scores[np.arange(len(chosen)), chosen]
    beyond = np.flatnonzero(gap > tie)
    assert not beyond.size, (
        f"labels differ by more than a near-tie ({tie}) at rows {beyond.tolist()}: {gap[beyond]}"
    )
    return int(np.count_nonzero(chosen != scores.argmax(1)))
