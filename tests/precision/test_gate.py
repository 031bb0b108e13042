"""The gate's arithmetic on hand-made probabilities (no models needed)."""

from __future__ import annotations

import numpy as np
import pytest

from engine_build.precision.gate import GateThresholds, compare, default_thresholds, format_table


def test_identical_outputs_pass_with_perfect_figures():
    probs = np.random.default_rng(0).dirichlet(np.ones(10), size=60).astype(np.float32)
    result = compare(probs, probs.copy(), "fp16", default_thresholds("fp16"))
    assert result.passed
    assert (result.top1_agreement, result.top5_overlap, result.max_score_diff) == (1.0, 1.0, 0.0)


def test_flipped_labels_and_score_drift_are_counted_and_fail():
    reference = np.tile(np.array([[0.7, 0.2, 0.05, 0.03, 0.01, 0.01]], np.float32), (100, 1))
    candidate = reference.copy()
    candidate[:5] = [0.2, 0.7, 0.05, 0.03, 0.01, 0.01]  # 5 of 100 top-1 labels flipped
    result = compare(reference, candidate, "int8", default_thresholds("int8"))
    assert result.top1_agreement == pytest.approx(0.95)
    assert result.top5_overlap == 1.0  # same five labels, other order
    assert result.mean_score_diff == pytest.approx(0.025)
    assert result.max_score_diff == pytest.approx(0.5)
    assert not result.passed
    assert any("top-1 agreement 0.9500 < 0.97" in f for f in result.failures)
    assert "FAIL" in format_table([result])


def test_too_few_held_out_images_fail_even_when_equal():
    probs = np.eye(4, dtype=np.float32)
    result = compare(probs, probs, "fp16", GateThresholds(0.99, 0.98, 0.005, min_images=50))
    assert result.failures == ["only 4 held-out images (need 50)"]
