"""Reading logged scalars back from TensorBoard event files (reports, bench, fault table, tests)."""

from __future__ import annotations

import math
from pathlib import Path


def scalar_events(path: Path, tag: str = "train/loss") -> list[tuple[int, float]]:
    """Every logged ``(step, value)`` of a scalar, in the order written, repeats included ([] if never
    logged), from a TensorBoard directory or one event file."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(path), size_guidance={"scalars": 0})
    acc.Reload()
    if tag not in acc.Tags().get("scalars", []):
        return []
    return [(e.step, e.value) for e in acc.Scalars(tag)]


def scalar_series(path: Path, tag: str = "train/loss") -> dict[int, float]:
    """A logged scalar by step ({} if never logged). A resumed run re-logs steps; TensorBoard keeps the
    later value, and so does this."""
    return dict(scalar_events(path, tag))


def loss_curve(tb_dir: Path, tag: str = "train/loss", points: int = 11) -> dict[str, float]:
    """First/last values of a logged scalar and a few evenly spaced points (for reports)."""
    values = scalar_series(tb_dir, tag)
    if not values:
        return {}
    steps = sorted(values)
    tail = [values[s] for s in steps[-10:] if math.isfinite(values[s])]  # skipped NaN steps do not count
    picks = sorted({steps[round(i * (len(steps) - 1) / (points - 1))] for i in range(points)})
    return {"train_loss_first": values[steps[0]], "train_loss_last10_mean": sum(tail) / len(tail) if tail else float("nan"),
            "train_loss_curve": {str(s): round(values[s], 4) for s in picks}}
