"""Bootstrap confidence intervals over items (documents, questions, utterances).

Every held-out measure here is a ratio of sums over items: M and F are token means (KL summed over a
document's positions / its position count), accuracy is correct answers / questions, WER is word errors
/ reference words. Resampling *items* with replacement (not tokens: a document's positions are not
independent) and taking the percentiles of the resampled ratio gives an interval that says how much of a
difference between two runs the held-out set can resolve.
"""

from __future__ import annotations

import torch


def bootstrap_interval(sums: list[float], counts: list[float] | None = None, *, resamples: int = 2000,
                       level: float = 0.95, seed: int = 0) -> tuple[float, float]:
    """Percentile interval of ``sum(sums) / sum(counts)`` under resampling the items with replacement.

    ``counts`` defaults to one per item (a plain mean, e.g. accuracy from 0/1 items). Seeded: the same
    items give the same interval.
    """
    if counts is None:
        counts = [1.0] * len(sums)
    if len(sums) != len(counts):
        raise ValueError(f"{len(sums)} sums but {len(counts)} counts")
    if not 0.0 < level < 1.0:
        raise ValueError(f"level must lie in (0, 1), got {level}")
    if not sums:
        return float("nan"), float("nan")
    s = torch.tensor(sums, dtype=torch.float64)
    c = torch.tensor(counts, dtype=torch.float64)
    g = torch.Generator().manual_seed(seed)
    picks = torch.randint(len(sums), (resamples, len(sums)), generator=g)
    ratios = s[picks].sum(1) / c[picks].sum(1).clamp(min=1e-300)
    tail = (1.0 - level) / 2
    low, high = torch.quantile(ratios, torch.tensor([tail, 1.0 - tail], dtype=torch.float64)).tolist()
    return low, high
