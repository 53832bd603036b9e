"""(Balanced) k-means for partitioning an embedded text pool into clusters (SALAD stage II).

SALAD clusters a broad text pool (K = 128) and draws training texts cluster by cluster, so the clusters
are the unit the selection rule reasons about. ``kmeans`` is plain Lloyd with k-means++ seeding; with
``balanced=True`` every assignment step keeps cluster sizes within one of each other, so no cluster is
too small to estimate its misalignment or to draw from. All work runs on the input's device, except the
seeded random draws (CPU generator, so results do not depend on the device) and the sequential greedy of
``balanced_assign`` (CPU).
"""

from __future__ import annotations

import numpy as np
import torch
from torch import Tensor


def squared_distances(x: Tensor, centroids: Tensor) -> Tensor:
    """(N, k) squared Euclidean distances between the rows of ``x`` and of ``centroids``.

    Expanded as ``|x|^2 - 2 x.c + |c|^2`` (one matmul; ``torch.cdist`` is tens of times slower on CPU)
    and clamped at 0, since rounding can make the expansion slightly negative for near-equal rows.
    """
    cross = torch.addmm(centroids.pow(2).sum(dim=1), x, centroids.T, alpha=-2)
    return cross.add_(x.pow(2).sum(dim=1, keepdim=True)).clamp_min_(0)


def balanced_assign(distances: Tensor) -> Tensor:
    """Assign N points to k clusters with sizes within one, greedily keeping points near their centroid.

    With ``N = q*k + r`` (``0 <= r < k``), ``r`` clusters end with ``q + 1`` points and the rest with ``q``.
    Greedy rule:

    1. order the points by their regret, second-smallest minus smallest distance, largest first (a
       stable sort, so ties keep index order): the points that lose most by missing their nearest
       centroid choose first;
    2. each point in turn takes its nearest centroid that still has capacity. A cluster's capacity is
       ``q + 1`` while fewer than ``r`` clusters hold ``q + 1`` points; once ``r`` do, every other cluster
       is capped at ``q``.

    This never fails: the capacities always sum to at least the points left. It is a heuristic, not the
    optimal transport solution; it is exact when the nearest-centroid assignment is already balanced.
    Cost O(N k) plus a Python step per point. Returns (N,) int64 on the device of ``distances``.
    """
    if distances.dim() != 2:
        raise ValueError(f"balanced_assign expects (N, k) distances, got shape {tuple(distances.shape)}")
    n, k = distances.shape
    if k < 1:
        raise ValueError("balanced_assign needs at least one cluster (k = 0 columns)")
    d = distances.detach().to("cpu", torch.float64).numpy()
    q, r = divmod(n, k)
    nearest = d.argmin(axis=1)
    if k == 1:
        regret = np.zeros(n)
    else:
        two_smallest = np.partition(d, 1, axis=1)[:, :2]
        regret = two_smallest[:, 1] - two_smallest[:, 0]
    order = np.argsort(-regret, kind="stable")

    assignment = np.empty(n, dtype=np.int64)
    counts = np.zeros(k, dtype=np.int64)
    full = np.zeros(k, dtype=bool)
    big = 0  # clusters holding q + 1 points
    for i in order:
        c = nearest[i]
        if full[c]:
            c = int(np.argmin(np.where(full, np.inf, d[i])))
        assignment[i] = c
        counts[c] += 1
        if counts[c] == q + 1:
            full[c] = True
            big += 1
            if big == r:
                full |= counts >= q
        elif counts[c] == q and big == r:
            full[c] = True
    return torch.from_numpy(assignment).to(distances.device)


def cluster_shares(assignment: Tensor, k: int) -> Tensor:
    """(k,) float64 share of the points in each cluster (sums to 1): SALAD's prior P_web(c)."""
    counts = cluster_counts(assignment, k)
    if counts.sum() == 0:
        raise ValueError("cluster_shares needs at least one assigned point, got an empty assignment")
    return counts.double() / counts.sum()


def cluster_counts(assignment: Tensor, k: int) -> Tensor:
    """(k,) int64 number of points in each cluster; ids outside [0, k) raise ValueError."""
    if assignment.dim() != 1:
        raise ValueError(f"assignment must be 1-D, got shape {tuple(assignment.shape)}")
    if assignment.numel() and (int(assignment.min()) < 0 or int(assignment.max()) >= k):
        raise ValueError(
            f"assignment has cluster ids in [{int(assignment.min())}, {int(assignment.max())}], "
            f"outside [0, {k}) for k = {k}"
        )
    return torch.bincount(assignment.long(), minlength=k)


def kmeans_plus_plus(x: Tensor, k: int, generator: torch.Generator) -> Tensor:
    """k-means++ seeding: each next centroid is a point drawn with probability ∝ its squared distance
    to the nearest centroid chosen so far (uniform when every point already sits on a centroid)."""
    n = x.shape[0]
    squared_norms = x.pow(2).sum(dim=1)

    def distances_to(index: int) -> Tensor:
        distances = (squared_norms - 2 * (x @ x[index]) + squared_norms[index]).clamp_min_(0)
        distances[index] = 0  # exactly: rounding must not let a chosen point be drawn again
        return distances

    first = int(torch.randint(n, (1,), generator=generator))
    chosen = [first]
    closest = distances_to(first)
    for _ in range(1, k):
        weights = closest.to("cpu", torch.float64)
        if weights.sum() > 0:
            index = int(torch.multinomial(weights, 1, generator=generator))
        else:
            index = int(torch.randint(n, (1,), generator=generator))
        chosen.append(index)
        closest = torch.minimum(closest, distances_to(index))
    return x[chosen].clone()


def _update_centroids(x: Tensor, assignment: Tensor, assigned_distance: Tensor, k: int) -> Tensor:
    """Means of the clusters; an empty cluster takes the point farthest from its own centroid (the
    m empty clusters take the m farthest points, in cluster order)."""
    counts = torch.bincount(assignment, minlength=k)
    sums = torch.zeros(k, x.shape[1], dtype=x.dtype, device=x.device).index_add_(0, assignment, x)
    centroids = sums / counts.clamp_min(1).unsqueeze(1).to(x.dtype)
    empty = torch.nonzero(counts == 0).squeeze(1)
    if empty.numel():
        farthest = torch.topk(assigned_distance, empty.numel()).indices
        centroids[empty] = x[farthest]
    return centroids


def kmeans(
    x: Tensor,
    k: int,
    *,
    iters: int = 50,
    seed: int = 0,
    balanced: bool = False,
    tol: float = 1e-6,
    init: Tensor | None = None,
) -> tuple[Tensor, Tensor]:
    """Cluster the rows of ``x`` (N, D) into ``k`` clusters; returns centroids (k, D) and assignment (N,).

    Seeds with k-means++ (a CPU ``torch.Generator`` seeded by ``seed``) unless ``init`` (k, D) centroids
    are given, then runs up to ``iters`` Lloyd steps (update the centroids to their clusters' means,
    reassign every point to its nearest centroid by squared Euclidean distance, or by
    ``balanced_assign`` when ``balanced``). It stops early once the assignment stops changing or no
    centroid moves more than ``tol`` (Euclidean). The returned assignment is always the one made from
    the returned centroids. Integer or half inputs are computed in float32. The balanced greedy can
    cycle between a few near-equal assignments, in which case the loop runs all ``iters`` steps.
    """
    if x.dim() != 2:
        raise ValueError(f"kmeans expects x of shape (N, D), got shape {tuple(x.shape)}")
    n = x.shape[0]
    if not 1 <= k <= n:
        raise ValueError(f"kmeans needs 1 <= k <= N, got k = {k} for N = {n} points")
    if iters < 0:
        raise ValueError(f"kmeans iters must be >= 0, got {iters}")
    x = x.to(torch.promote_types(x.dtype, torch.float32))
    if not torch.isfinite(x).all():
        raise ValueError("kmeans input x contains NaN or infinite values")

    if init is None:
        centroids = kmeans_plus_plus(x, k, torch.Generator().manual_seed(seed))
    else:
        if tuple(init.shape) != (k, x.shape[1]):
            raise ValueError(f"kmeans init must have shape ({k}, {x.shape[1]}), got {tuple(init.shape)}")
        centroids = init.to(device=x.device, dtype=x.dtype).clone()

    def assign(centroids: Tensor) -> tuple[Tensor, Tensor]:
        distances = squared_distances(x, centroids)
        assignment = balanced_assign(distances) if balanced else distances.argmin(dim=1)
        return assignment, distances.gather(1, assignment.unsqueeze(1)).squeeze(1)

    assignment, assigned_distance = assign(centroids)
    for _ in range(iters):
        new_centroids = _update_centroids(x, assignment, assigned_distance, k)
        shift = float((new_centroids - centroids).norm(dim=1).max())
        centroids = new_centroids
        new_assignment, assigned_distance = assign(centroids)
        changed = not torch.equal(new_assignment, assignment)
        assignment = new_assignment
        if not changed or shift <= tol:
            break
    return centroids, assignment
