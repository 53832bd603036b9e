"""SALAD's misalignment-driven active selection: which pool texts to synthesise next.

Given the pool's cluster prior P_web(c) (share of the pool in cluster c) and a per-cluster misalignment
M(c) measured with the model, the target is ``P_target(c) ∝ P_web(c) · M(c)^γ``: γ = 0 reproduces the
pool (the uniform-sampling baseline), larger γ concentrates the budget where speech and text disagree
most. ``draw_selection`` then spends a budget (seconds of speech, texts, ...) by drawing a cluster from
P_target and a text uniformly inside it, without replacement. The ``select`` stage's whole loop
(embed, cluster, probe, draw, synthesise, cached step by step) is :mod:`speechllm.active_selection`.
"""

from __future__ import annotations

import bisect
import math
import random

import torch
from torch import Tensor

from speechllm.clustering import cluster_counts


def _check_cluster_vector(values: Tensor, what: str) -> Tensor:
    if values.dim() != 1 or values.numel() == 0:
        raise ValueError(
            f"{what} must be a non-empty 1-D tensor over clusters, got shape {tuple(values.shape)}"
        )
    values = values.detach().to("cpu", torch.float64)
    bad = torch.nonzero(~torch.isfinite(values) | (values < 0)).squeeze(1)
    if bad.numel():
        c = int(bad[0])
        raise ValueError(f"{what}[{c}] = {float(values[c])} (cluster {c}): must be finite and >= 0")
    return values


def target_distribution(p_web: Tensor, misalignment: Tensor, gamma: float) -> Tensor:
    """SALAD's target cluster distribution ``P_target(c) ∝ p_web(c) · misalignment(c)^gamma`` (float64).

    Computed in log space (``M^5`` under/overflows easily): ``log p_web + gamma · log M``, shifted by
    its maximum before exponentiating. ``gamma = 0`` returns ``p_web`` normalised (so ``0^0`` is 1 there).
    If every weight is 0, which happens when every cluster with ``p_web > 0`` has ``M = 0`` and
    ``gamma > 0``, the misalignment carries no information and ``p_web`` normalised is returned instead.
    Negative or non-finite entries raise ValueError naming the cluster.
    """
    p = _check_cluster_vector(p_web, "p_web")
    m = _check_cluster_vector(misalignment, "misalignment")
    if p.shape != m.shape:
        raise ValueError(f"p_web has {p.numel()} clusters but misalignment has {m.numel()}")
    if not math.isfinite(gamma) or gamma < 0:
        raise ValueError(f"gamma must be finite and >= 0, got {gamma}")
    if p.sum() == 0:
        raise ValueError("p_web is all zeros: no cluster has any share of the pool")
    prior = p / p.sum()
    if gamma == 0:
        return prior
    log_weight = p.log() + gamma * m.log()  # log 0 = -inf: such clusters get weight 0
    top = log_weight.max()
    if top == -math.inf:
        return prior
    weight = (log_weight - top).exp()
    return weight / weight.sum()


def draw_selection(
    assignment: Tensor,
    p_target: Tensor,
    costs: list[float] | Tensor,
    budget: float,
    *,
    seed: int = 0,
    exclude: set[int] | None = None,
) -> list[int]:
    """Indices of pool items, in draw order, until their summed cost reaches ``budget``.

    Each draw picks a cluster with probability ``p_target`` renormalised over the clusters that still
    hold drawable items (not drawn yet, not in ``exclude``), then one of its drawable items uniformly;
    the item's cost is added. Drawing stops at the first item whose cost makes the sum reach
    ``budget`` (that item is included), or when no cluster with ``p_target > 0`` has items left (items
    of zero-probability clusters are never drawn). Deterministic for a given ``seed``
    (``random.Random``, so independent of torch's global state and device).
    """
    if assignment.dim() != 1:
        raise ValueError(f"assignment must be 1-D over pool items, got shape {tuple(assignment.shape)}")
    target = _check_cluster_vector(p_target, "p_target").tolist()
    k = len(target)
    cluster_of = assignment.detach().cpu().long().tolist()
    n = len(cluster_of)
    for i, c in enumerate(cluster_of):
        if not 0 <= c < k:
            raise ValueError(
                f"assignment[{i}] = {c}: cluster id outside [0, {k}) for p_target of {k} clusters"
            )
    cost = torch.as_tensor(costs, dtype=torch.float64).flatten()
    if cost.numel() != n:
        raise ValueError(f"costs has {cost.numel()} entries but assignment has {n} items")
    bad = torch.nonzero(~torch.isfinite(cost) | (cost < 0)).squeeze(1)
    if bad.numel():
        i = int(bad[0])
        raise ValueError(f"costs[{i}] = {float(cost[i])}: item costs must be finite and >= 0")
    excluded = set() if exclude is None else set(exclude)
    outside = sorted(i for i in excluded if not 0 <= i < n)
    if outside:
        raise ValueError(f"exclude has item indices outside [0, {n}): {outside[:5]}")

    remaining: list[list[int]] = [[] for _ in range(k)]
    for i, c in enumerate(cluster_of):
        if i not in excluded:
            remaining[c].append(i)
    rng = random.Random(seed)
    cost_of = cost.tolist()

    def live_clusters() -> tuple[list[int], list[float]]:
        """Clusters that can still be drawn and the running sums of their target probabilities."""
        clusters = [c for c in range(k) if remaining[c] and target[c] > 0]
        cumulative, total = [], 0.0
        for c in clusters:
            total += target[c]
            cumulative.append(total)
        return clusters, cumulative

    selected: list[int] = []
    spent = 0.0
    clusters, cumulative = live_clusters()
    while spent < budget and clusters:
        slot = bisect.bisect_right(cumulative, rng.random() * cumulative[-1])
        c = clusters[min(slot, len(clusters) - 1)]  # min guards against rounding at the very top
        pool = remaining[c]
        j = rng.randrange(len(pool))
        pool[j], pool[-1] = pool[-1], pool[j]  # swap-remove: O(1), order inside a pool is irrelevant
        item = pool.pop()
        selected.append(item)
        spent += cost_of[item]
        if not pool:
            clusters, cumulative = live_clusters()
    return selected


def selection_histogram(assignment: Tensor, selected: list[int] | Tensor, k: int) -> Tensor:
    """(k,) int64 count of the selected items in each cluster."""
    if assignment.dim() != 1:
        raise ValueError(f"assignment must be 1-D over pool items, got shape {tuple(assignment.shape)}")
    index = torch.as_tensor(selected, dtype=torch.long).flatten()
    n = assignment.numel()
    if index.numel() and (int(index.min()) < 0 or int(index.max()) >= n):
        raise ValueError(
            f"selected has item indices outside [0, {n}): min {int(index.min())}, max {int(index.max())}"
        )
    return cluster_counts(assignment.detach().cpu()[index], k)
