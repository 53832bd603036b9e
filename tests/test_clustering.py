"""Tests of (balanced) k-means against plain-Python references, brute force and hand computations."""

from __future__ import annotations

import itertools
import math

import pytest
import torch

from speechllm.clustering import (
    balanced_assign,
    cluster_counts,
    cluster_shares,
    kmeans,
    kmeans_plus_plus,
)


def blobs(
    sizes: list[int], dim: int = 8, spread: float = 0.5, seed: int = 0
) -> tuple[torch.Tensor, torch.Tensor]:
    """Gaussian blobs with centres 20 apart on the axes (so far beyond their spread) and their labels."""
    gen = torch.Generator().manual_seed(seed)
    points, labels = [], []
    for label, size in enumerate(sizes):
        centre = torch.zeros(dim)
        centre[label % dim] = 20.0 * (1 + label // dim)
        points.append(centre + spread * torch.randn(size, dim, generator=gen))
        labels += [label] * size
    return torch.cat(points), torch.tensor(labels)


def same_partition(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Whether two labelings split the points identically, whatever the label names."""
    pairs = set(zip(a.tolist(), b.tolist()))
    return len(pairs) == len(set(a.tolist())) == len(set(b.tolist()))


def reference_lloyd(points: list[list[float]], init: list[list[float]], steps: int) -> tuple[list, list]:
    """Textbook Lloyd with plain loops: assign to the nearest centroid, move centroids to the means."""

    def nearest(p: list[float], centroids: list[list[float]]) -> int:
        costs = [sum((pi - ci) ** 2 for pi, ci in zip(p, c)) for c in centroids]
        return costs.index(min(costs))

    centroids = [list(c) for c in init]
    assignment = [nearest(p, centroids) for p in points]
    for _ in range(steps):
        for j in range(len(centroids)):
            members = [p for p, a in zip(points, assignment) if a == j]
            assert members, "reference has no empty-cluster rule; pick data without empty clusters"
            centroids[j] = [sum(col) / len(members) for col in zip(*members)]
        new_assignment = [nearest(p, centroids) for p in points]
        if new_assignment == assignment:
            break
        assignment = new_assignment
    return centroids, assignment


def reference_balanced(d: list[list[float]]) -> list[int]:
    """The documented greedy, recomputing every capacity from the counts at each step."""
    n, k = len(d), len(d[0])
    q, r = divmod(n, k)
    regret = [sorted(row)[1] - sorted(row)[0] if k > 1 else 0.0 for row in d]
    order = sorted(range(n), key=lambda i: (-regret[i], i))
    counts = [0] * k
    assignment = [-1] * n
    for i in order:
        big = sum(count == q + 1 for count in counts)
        capacity = q + 1 if big < r else q
        for c in sorted(range(k), key=lambda c: (d[i][c], c)):
            if counts[c] < capacity:
                assignment[i] = c
                counts[c] += 1
                break
    return assignment


def balanced_sizes(n: int, k: int) -> list[int]:
    q, r = divmod(n, k)
    return [q + 1] * r + [q] * (k - r)


def cost(d: torch.Tensor, assignment: torch.Tensor) -> float:
    return float(d.gather(1, assignment.unsqueeze(1)).sum())


@pytest.mark.parametrize("balanced", [False, True])
def test_recovers_separated_blobs(balanced: bool) -> None:
    x, labels = blobs([25, 25, 25, 25, 25])
    for seed in range(3):
        centroids, assignment = kmeans(x, 5, seed=seed, balanced=balanced)
        assert centroids.shape == (5, 8) and assignment.dtype == torch.int64
        assert same_partition(assignment, labels)
        # Each centroid is its blob's mean.
        for c in range(5):
            assert torch.allclose(centroids[c], x[assignment == c].mean(dim=0), atol=1e-5)


def test_unbalanced_blobs_of_different_sizes() -> None:
    x, labels = blobs([5, 40, 15])
    _, assignment = kmeans(x, 3, seed=1)
    assert same_partition(assignment, labels)


def test_lloyd_steps_equal_plain_loop_reference() -> None:
    gen = torch.Generator().manual_seed(3)
    x = torch.randn(40, 3, generator=gen, dtype=torch.float64)
    init = x[[0, 7, 19, 33]].clone()  # data points: no cluster starts empty
    for steps in [1, 2, 3, 50]:
        centroids, assignment = kmeans(x, 4, iters=steps, tol=0.0, init=init)
        ref_centroids, ref_assignment = reference_lloyd(x.tolist(), init.tolist(), steps)
        assert assignment.tolist() == ref_assignment
        assert torch.allclose(centroids, torch.tensor(ref_centroids, dtype=torch.float64), atol=1e-12)


def test_empty_cluster_takes_the_farthest_point() -> None:
    x = torch.tensor([[0.0], [0.1], [0.2], [10.0], [10.1], [20.0]])
    init = torch.tensor([[0.1], [10.0], [100.0]])  # nothing is nearest to 100: cluster 2 starts empty
    centroids, assignment = kmeans(x, 3, iters=1, init=init)
    # 20 is farthest from its centroid (10, distance 10): it re-seeds cluster 2.
    assert torch.allclose(centroids.squeeze(1), torch.tensor([0.1, (10.0 + 10.1 + 20.0) / 3, 20.0]))
    assert assignment.tolist() == [0, 0, 0, 1, 1, 2]


def test_kmeans_plus_plus_draws_by_squared_distance() -> None:
    # Points 0, 1, 3 and k = 2. First centre uniform; second ∝ D^2:
    #   first 0: D^2 = (0, 1, 9); first 1: (1, 0, 4); first 3: (9, 4, 0). Unordered pairs:
    #   {0,1}: (1/10 + 2/10) / 3 = 0.1; {0,3}: (9/10 + 9/13) / 3; {1,3}: (8/10 + 4/13) / 3.
    expected = {(0.0, 1.0): 0.1, (0.0, 3.0): (0.9 + 9 / 13) / 3, (1.0, 3.0): (0.8 + 4 / 13) / 3}
    x = torch.tensor([[0.0], [1.0], [3.0]])
    trials = 3000
    counts = dict.fromkeys(expected, 0)
    for seed in range(trials):
        pair = tuple(sorted(kmeans_plus_plus(x, 2, torch.Generator().manual_seed(seed)).squeeze(1).tolist()))
        counts[pair] += 1
    for pair, p in expected.items():
        # Binomial(3000, p): 5 standard deviations is at most ~137 draws; a wrong rule (e.g. ∝ D, which
        # gives {0,1} ≈ 0.167) misses by ~200.
        assert abs(counts[pair] - trials * p) < 5 * math.sqrt(trials * p * (1 - p)), (pair, counts)


def test_deterministic_per_seed() -> None:
    x = torch.randn(60, 4, generator=torch.Generator().manual_seed(0))
    for balanced in [False, True]:
        first = kmeans(x, 6, seed=5, balanced=balanced)
        again = kmeans(x, 6, seed=5, balanced=balanced)
        assert torch.equal(first[0], again[0]) and torch.equal(first[1], again[1])
    inits = {
        tuple(kmeans_plus_plus(x, 6, torch.Generator().manual_seed(s)).flatten().tolist()) for s in range(4)
    }
    assert len(inits) == 4


@pytest.mark.parametrize("n,k", [(10, 3), (17, 5), (64, 8), (7, 7), (9, 1), (101, 6)])
def test_balanced_kmeans_sizes_within_one(n: int, k: int) -> None:
    # Skewed data (one dense blob plus stragglers) so the unconstrained clusters would be unbalanced.
    gen = torch.Generator().manual_seed(n * 31 + k)
    x = torch.cat(
        [0.1 * torch.randn(n - n // 4, 3, generator=gen), 5 * torch.randn(n // 4, 3, generator=gen)]
    )
    _, assignment = kmeans(x, k, balanced=True, seed=k)
    sizes = torch.bincount(assignment, minlength=k).tolist()
    assert sorted(sizes, reverse=True) == balanced_sizes(n, k)


def test_balanced_assign_equals_reference_rule() -> None:
    gen = torch.Generator().manual_seed(0)
    for trial in range(60):
        n = int(torch.randint(1, 40, (1,), generator=gen))
        k = int(torch.randint(1, 7, (1,), generator=gen))
        # Most points prefer cluster 0, so capacities bind and the fallbacks are exercised.
        d = torch.rand(n, k, generator=gen, dtype=torch.float64)
        d[:, 0] *= 0.3
        assignment = balanced_assign(d)
        assert assignment.tolist() == reference_balanced(d.tolist()), trial
        assert sorted(torch.bincount(assignment, minlength=k).tolist(), reverse=True) == balanced_sizes(n, k)


def brute_force_balanced_cost(d: torch.Tensor) -> float:
    n, k = d.shape
    sizes = sorted(balanced_sizes(n, k))
    best = math.inf
    for assignment in itertools.product(range(k), repeat=n):
        if sorted(assignment.count(c) for c in range(k)) == sizes:
            best = min(best, sum(float(d[i, c]) for i, c in enumerate(assignment)))
    return best


def test_balanced_assign_is_optimal_on_hand_made_case() -> None:
    # Everyone prefers cluster 0 (capacity 2). Processing in index order would give p1 cluster 0 and
    # push p2 to cost 5 (total 9); by regret (p0: 10, p2: 5, p1: 1, p3: 1) p0 and p2 take cluster 0 and
    # p1, p3 go to cluster 1: 0 + 1 + 0 + 4 = 5, the optimum.
    d = torch.tensor([[0.0, 10.0], [0.0, 1.0], [0.0, 5.0], [3.0, 4.0]])
    assignment = balanced_assign(d)
    assert assignment.tolist() == [0, 1, 0, 1]
    assert cost(d, assignment) == brute_force_balanced_cost(d) == 5.0


def test_balanced_assign_against_brute_force_on_small_cases() -> None:
    gen = torch.Generator().manual_seed(0)
    exact = 0
    for _ in range(80):
        n, k = int(torch.randint(4, 8, (1,), generator=gen)), int(torch.randint(2, 4, (1,), generator=gen))
        d = torch.rand(n, k, generator=gen, dtype=torch.float64)
        d[:, 0] *= 0.5  # most points prefer cluster 0: the capacities bind
        exact += cost(d, balanced_assign(d)) == pytest.approx(brute_force_balanced_cost(d), abs=1e-12)
    # A heuristic, not the optimum: by regret it is exact on 69 of these 80 cases; the same greedy in
    # index order is exact on 28, smallest regret first on 16.
    assert exact >= 60, exact
    # Exact whenever the nearest-centroid assignment is already balanced (as documented): built so.
    for n, k in [(5, 2), (6, 3), (7, 3), (8, 2), (9, 4)]:
        labels = torch.tensor([i % k for i in range(n)])[torch.randperm(n, generator=gen)]
        d = 1 + torch.rand(n, k, generator=gen, dtype=torch.float64)
        d[torch.arange(n), labels] = torch.rand(n, generator=gen, dtype=torch.float64)
        assignment = balanced_assign(d)
        assert torch.equal(assignment, labels)
        assert cost(d, assignment) == pytest.approx(brute_force_balanced_cost(d), abs=1e-12)
    # Far apart points with a unique balanced optimum: greedy must hit it exactly.
    x, _ = blobs([3, 3, 3], dim=3)
    centres = torch.stack([x[:3].mean(0), x[3:6].mean(0), x[6:].mean(0)])
    d = torch.cdist(x, centres).pow(2)
    assert cost(d, balanced_assign(d)) == pytest.approx(brute_force_balanced_cost(d))


def test_cluster_shares_and_counts_match_a_loop() -> None:
    assignment = torch.tensor([2, 0, 2, 2, 1, 0, 2])
    counts = [0, 0, 0, 0]
    for c in assignment.tolist():
        counts[c] += 1
    assert cluster_counts(assignment, 4).tolist() == counts
    shares = cluster_shares(assignment, 4)
    assert shares.tolist() == [c / 7 for c in counts] and float(shares.sum()) == pytest.approx(1.0)
    with pytest.raises(ValueError, match=r"\[0, 2\]"):
        cluster_shares(assignment, 2)
    with pytest.raises(ValueError, match="empty"):
        cluster_shares(torch.tensor([], dtype=torch.long), 3)


def test_kmeans_validation_errors() -> None:
    x = torch.randn(5, 2)
    with pytest.raises(ValueError, match="k = 0 for N = 5"):
        kmeans(x, 0)
    with pytest.raises(ValueError, match="k = 6 for N = 5"):
        kmeans(x, 6)
    with pytest.raises(ValueError, match=r"shape \(5,\)"):
        kmeans(torch.randn(5), 2)
    with pytest.raises(ValueError, match=r"init must have shape \(2, 2\)"):
        kmeans(x, 2, init=torch.zeros(3, 2))
    with pytest.raises(ValueError, match="NaN"):
        kmeans(torch.tensor([[0.0], [math.nan]]), 1)
    with pytest.raises(ValueError, match=r"shape \(4,\)"):
        balanced_assign(torch.zeros(4))
