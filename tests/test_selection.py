"""Tests of SALAD's target distribution and budgeted draws against hand computations and binomial bounds.

Tolerances: while no cluster runs out, each draw picks its cluster independently from the (renormalised)
target, so a cluster's count over n draws is Binomial(n, p). We allow 5 standard deviations, which a
correct implementation exceeds with probability below 6e-7 per check (and the seeds are fixed); each
test also checks that the wrong alternative would land far outside that band.
"""

from __future__ import annotations

import math

import pytest
import torch

from speechllm.selection import draw_selection, selection_histogram, target_distribution


def within_binomial(count: int, n: int, p: float, sds: float = 5.0) -> bool:
    return abs(count - n * p) <= sds * math.sqrt(n * p * (1 - p))


def test_gamma_zero_gives_p_web() -> None:
    p_web = torch.tensor([3.0, 1.0, 0.0, 4.0])  # unnormalised counts are fine
    misalignment = torch.tensor([0.0, 2.5, 7.0, 0.3])  # M = 0 too: 0^0 counts as 1
    assert torch.equal(target_distribution(p_web, misalignment, 0.0), p_web.double() / 8)


def test_hand_computed_three_clusters() -> None:
    # p_web = (0.5, 0.3, 0.2), M = (1, 2, 0.5), gamma = 2:
    # weights 0.5 * 1, 0.3 * 4, 0.2 * 0.25 = 0.5, 1.2, 0.05; sum 1.75.
    got = target_distribution(torch.tensor([0.5, 0.3, 0.2]), torch.tensor([1.0, 2.0, 0.5]), 2.0)
    assert got.dtype == torch.float64
    assert torch.allclose(got, torch.tensor([0.5, 1.2, 0.05], dtype=torch.float64) / 1.75, atol=1e-15)


def test_extreme_misalignment_neither_overflows_nor_underflows() -> None:
    # M^5 = 1e400 overflows float64; in log space only the ratios matter: (1e80)^5 : (2e80)^5 = 1 : 32.
    p_web = torch.tensor([0.25, 0.25, 0.5], dtype=torch.float64)
    got = target_distribution(p_web, torch.tensor([1e80, 2e80, 1e-80], dtype=torch.float64), 5.0)
    assert torch.allclose(got, torch.tensor([1 / 33, 32 / 33, 0.0], dtype=torch.float64), atol=1e-15)
    # Tiny values alike: (1e-80)^5 underflows, yet 1e-80 : 3e-80 still gives 1 : 243.
    got = target_distribution(p_web[:2], torch.tensor([1e-80, 3e-80], dtype=torch.float64), 5.0)
    assert torch.allclose(got, torch.tensor([1 / 244, 243 / 244], dtype=torch.float64), atol=1e-15)


def test_zero_misalignment_and_all_zero_fallback() -> None:
    p_web = torch.tensor([0.2, 0.3, 0.5])
    got = target_distribution(p_web, torch.tensor([0.0, 1.0, 1.0]), 5.0)
    assert got.tolist() == pytest.approx([0.0, 0.375, 0.625])
    # Every weight 0: M carries no information, fall back to p_web.
    assert torch.equal(target_distribution(p_web, torch.zeros(3), 5.0), p_web.double() / p_web.double().sum())
    assert torch.equal(
        target_distribution(torch.tensor([0.0, 1.0]), torch.tensor([3.0, 0.0]), 1.0),
        torch.tensor([0.0, 1.0], dtype=torch.float64),
    )


def test_target_distribution_errors_name_the_cluster() -> None:
    p_web = torch.tensor([0.5, 0.25, 0.25])
    with pytest.raises(ValueError, match=r"misalignment\[1\] = -0.5 \(cluster 1\)"):
        target_distribution(p_web, torch.tensor([1.0, -0.5, 1.0]), 5.0)
    with pytest.raises(ValueError, match=r"misalignment\[2\] = nan \(cluster 2\)"):
        target_distribution(p_web, torch.tensor([1.0, 1.0, math.nan]), 5.0)
    with pytest.raises(ValueError, match=r"p_web\[0\] = inf"):
        target_distribution(torch.tensor([math.inf, 1.0, 1.0]), torch.ones(3), 5.0)
    with pytest.raises(ValueError, match="3 clusters but misalignment has 2"):
        target_distribution(p_web, torch.ones(2), 5.0)
    with pytest.raises(ValueError, match="gamma must be finite and >= 0, got -1"):
        target_distribution(p_web, torch.ones(3), -1.0)
    with pytest.raises(ValueError, match="all zeros"):
        target_distribution(torch.zeros(3), torch.ones(3), 1.0)


def test_draws_reproduce_target_distribution() -> None:
    p_target = torch.tensor([0.5, 0.3, 0.15, 0.05], dtype=torch.float64)
    k, per_cluster, n = 4, 12_000, 20_000
    # 12k items per cluster: even cluster 0 (expected 10k draws, sd 71) never runs out, so every draw
    # picks its cluster from p_target itself and the counts are Multinomial(20k, p_target).
    assignment = torch.arange(k * per_cluster) % k
    selected = draw_selection(assignment, p_target, [1.0] * len(assignment), budget=n, seed=7)
    assert len(selected) == n == len(set(selected))
    counts = selection_histogram(assignment, selected, k)
    for c in range(k):
        assert within_binomial(int(counts[c]), n, float(p_target[c])), counts
        # The pool's own shares (0.25 each) lie 15+ sd away for every cluster: the test has power.
        assert not within_binomial(int(counts[c]), n, 0.25)


def test_items_inside_a_cluster_are_uniform() -> None:
    # Cluster 0: items 0..7; cluster 1 (items 8, 9) has target 0 and must never be drawn.
    assignment = torch.tensor([0] * 8 + [1, 1])
    trials = 4000
    counts = [0] * 10
    for seed in range(trials):
        (item,) = draw_selection(assignment, torch.tensor([1.0, 0.0]), [1.0] * 10, budget=1, seed=seed)
        counts[item] += 1
    assert counts[8:] == [0, 0]
    assert all(within_binomial(count, trials, 1 / 8) for count in counts[:8]), counts


def test_budget_stops_at_first_crossing() -> None:
    gen = torch.Generator().manual_seed(0)
    costs = (0.5 + 2.5 * torch.rand(300, generator=gen, dtype=torch.float64)).tolist()
    assignment = torch.arange(300) % 5
    p_target = torch.full((5,), 0.2)
    for budget in [0.4, 7.3, 20.0, 123.4]:
        selected = draw_selection(assignment, p_target, costs, budget, seed=3)
        running = 0.0
        for position, item in enumerate(selected):
            assert running < budget, f"item {position} was drawn after the budget was reached"
            running += costs[item]
        assert running >= budget
    # Reaching the budget exactly stops too; a budget of 0 draws nothing.
    assert len(draw_selection(assignment, p_target, [1.0] * 300, 5.0)) == 5
    assert len(draw_selection(assignment, p_target, [1.0] * 300, 4.5)) == 5
    assert draw_selection(assignment, p_target, [1.0] * 300, 0.0) == []
    assert len(draw_selection(assignment, p_target, torch.ones(300), 3.0)) == 3  # tensor costs


def test_exclude_respected_and_no_item_twice() -> None:
    assignment = torch.tensor([0, 1, 2, 0, 1, 2, 0, 1, 2, 2])
    exclude = {0, 4, 9}
    selected = draw_selection(
        assignment, torch.tensor([0.2, 0.3, 0.5]), [1.0] * 10, math.inf, exclude=exclude
    )
    assert len(selected) == len(set(selected)) == 7
    assert set(selected) == set(range(10)) - exclude


def test_exhausted_clusters_are_renormalised_away() -> None:
    # Cluster 0 (p = 0.6) has only 2 items. Once it is empty the rest of the mass must split 0.3 : 0.1,
    # i.e. 3 : 1, between clusters 1 and 2; before that, draws that miss cluster 0 split 3 : 1 as well.
    # So of the n - 2 draws outside cluster 0, cluster 1's share is Binomial(n - 2, 0.75). Handing the
    # exhausted mass to a neighbour instead would give 0.9 (30 sd away).
    assignment = torch.tensor([0, 0] + [1] * 10_000 + [2] * 10_000)
    n = 8000
    selected = draw_selection(assignment, torch.tensor([0.6, 0.3, 0.1]), [1.0] * len(assignment), n, seed=1)
    counts = selection_histogram(assignment, selected, 3)
    assert len(selected) == n and int(counts[0]) == 2
    assert within_binomial(int(counts[1]), n - 2, 0.75), counts
    assert not within_binomial(int(counts[1]), n - 2, 0.9)
    # Only zero-target clusters left: drawing stops even though budget and items remain.
    small = torch.tensor([0, 0, 0, 1, 1])
    assert sorted(draw_selection(small, torch.tensor([1.0, 0.0]), [1.0] * 5, 10.0)) == [0, 1, 2]


def test_deterministic_per_seed() -> None:
    assignment = torch.arange(500) % 7
    p_target = torch.softmax(torch.arange(7.0), dim=0)
    first = draw_selection(assignment, p_target, [1.0] * 500, 100, seed=11)
    assert first == draw_selection(assignment, p_target, [1.0] * 500, 100, seed=11)
    assert first != draw_selection(assignment, p_target, [1.0] * 500, 100, seed=12)


def test_selection_histogram_matches_a_loop() -> None:
    assignment = torch.tensor([3, 1, 1, 0, 3, 3, 2])
    selected = [0, 5, 2, 6]
    expected = [0] * 5
    for item in selected:
        expected[int(assignment[item])] += 1
    assert selection_histogram(assignment, selected, 5).tolist() == expected
    with pytest.raises(ValueError, match=r"outside \[0, 7\)"):
        selection_histogram(assignment, [7], 5)


def test_draw_selection_errors() -> None:
    assignment = torch.tensor([0, 1, 1])
    p_target = torch.tensor([0.5, 0.5])
    with pytest.raises(ValueError, match=r"assignment\[2\] = 2"):
        draw_selection(torch.tensor([0, 1, 2]), p_target, [1.0] * 3, 1.0)
    with pytest.raises(ValueError, match="costs has 2 entries but assignment has 3"):
        draw_selection(assignment, p_target, [1.0, 1.0], 1.0)
    with pytest.raises(ValueError, match=r"costs\[1\] = -1.0"):
        draw_selection(assignment, p_target, [1.0, -1.0, 1.0], 1.0)
    with pytest.raises(ValueError, match=r"exclude has item indices outside \[0, 3\): \[3\]"):
        draw_selection(assignment, p_target, [1.0] * 3, 1.0, exclude={3})
    with pytest.raises(ValueError, match=r"p_target\[0\] = -0.5"):
        draw_selection(assignment, torch.tensor([-0.5, 1.5]), [1.0] * 3, 1.0)
