"""Bootstrap intervals (speechllm/intervals.py) against an exact enumeration and by coverage."""

from __future__ import annotations

import itertools
import random

import pytest

from speechllm.intervals import bootstrap_interval


def enumerated_ratios(sums, counts):
    """Every one of the n^n equally likely resamples, enumerated: the bootstrap distribution exactly."""
    n = len(sums)
    return [sum(sums[i] for i in pick) / sum(counts[i] for i in pick) for pick in itertools.product(range(n), repeat=n)]


def test_a_hand_example_matches_the_enumerated_bootstrap():
    # Five documents: KL sums over their positions and their position counts (a token mean).
    sums, counts = [3.0, 1.0, 6.0, 2.0, 4.0], [10, 5, 12, 8, 9]
    low, high = bootstrap_interval(sums, counts, resamples=40000, level=0.9, seed=1)
    ratios = enumerated_ratios(sums, counts)
    below = sum(r < low for r in ratios) / len(ratios)
    above = sum(r > high for r in ratios) / len(ratios)
    assert below == pytest.approx(0.05, abs=0.015) and above == pytest.approx(0.05, abs=0.015)
    assert low < sum(sums) / sum(counts) < high


def test_identical_items_give_no_width_and_the_seed_fixes_the_interval():
    assert bootstrap_interval([1, 1, 1, 1]) == pytest.approx((1.0, 1.0))
    rng = random.Random(0)
    items = [rng.random() for _ in range(30)]
    assert bootstrap_interval(items, seed=3) == bootstrap_interval(items, seed=3)
    assert bootstrap_interval(items, seed=3) != bootstrap_interval(items, seed=4)


def test_a_95_percent_interval_covers_the_true_accuracy_about_95_percent_of_the_time():
    rng = random.Random(0)
    covered = 0
    for trial in range(200):
        answers = [float(rng.random() < 0.6) for _ in range(80)]  # 80 questions, true accuracy 0.6
        low, high = bootstrap_interval(answers, resamples=500, seed=trial)
        covered += low <= 0.6 <= high
    assert 0.88 <= covered / 200 <= 0.99


def test_bad_input_is_refused():
    with pytest.raises(ValueError, match="2 sums but 1 counts"):
        bootstrap_interval([1.0, 2.0], [1.0])
    with pytest.raises(ValueError, match="level"):
        bootstrap_interval([1.0], level=1.5)
