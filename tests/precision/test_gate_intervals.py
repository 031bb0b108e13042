"""The gate's 95% intervals: what a figure measured on N held-out images promises for new photos."""

from __future__ import annotations

import numpy as np
import pytest

from engine_build.precision.gate import compare, default_thresholds, format_table, wilson_interval
from engine_build.precision.variants import split_heldout


def test_wilson_interval_is_wide_on_few_images_and_narrows_with_more():
    low77, high77 = wilson_interval(0.987, 77)  # the 77-image gate
    assert low77 < 0.94 < 0.97 < high77  # 0.987 on 77 images does not show 0.97 on new photos
    low500, high500 = wilson_interval(0.987, 500)
    assert low77 < low500 < 0.987 < high500 and high500 - low500 < 0.03
    low, high = wilson_interval(1.0, 100)  # every image agreed: still not a certainty
    assert 0.95 < low < 1.0 and high == 1.0


def test_compare_reports_intervals_that_bracket_the_figures_and_cover_new_draws():
    rng = np.random.default_rng(0)
    reference = rng.dirichlet(np.ones(10) * 0.3, size=4000).astype(np.float32)
    candidate = reference.copy()
    flipped = rng.random(len(candidate)) < 0.04  # a true agreement of about 0.96
    candidate[flipped] = np.roll(candidate[flipped], 1, axis=1)
    true_top1 = float(np.mean(candidate.argmax(1) == reference.argmax(1)))
    limits = default_thresholds("cpu-int8")
    covered = 0
    for start in range(0, 4000, 250):  # sixteen gates of 250 images each
        part = slice(start, start + 250)
        result = compare(reference[part], candidate[part], "cpu-int8", limits)
        low, high = result.interval95["top1_agreement"]
        assert low <= result.top1_agreement <= high
        for name in ("top5_overlap", "mean_score_diff"):
            low_m, high_m = result.interval95[name]
            assert low_m <= getattr(result, name) <= high_m
        covered += low <= true_top1 <= high
    assert covered >= 13  # a 95% interval misses now and then, not often
    assert "on new photos expect top-1 agreement" in format_table([result])


def test_search_and_verdict_halves_are_disjoint_and_cover_the_held_out_images():
    search, verdict = split_heldout(201)
    assert not set(search) & set(verdict) and set(search) | set(verdict) == set(range(201))
    assert abs(len(search) - len(verdict)) <= 1


@pytest.mark.parametrize("precision", ["int8", "cpu-int8"])
def test_both_int8_forms_get_the_same_default_gate(precision):
    assert default_thresholds(precision) == default_thresholds("int8")
