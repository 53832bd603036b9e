"""Values that change with the optimizer step: a source's share in the data mixture, a loss weight.

One shape covers them all: hold ``start`` until ``start_step``, move to ``end`` by ``end_step``
(linearly, along a half cosine, or in one jump at ``end_step``), then hold ``end``. ``Ramp`` is the
config form of it; ``ramp`` the plain function, usable on a config node's fields directly.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Optional

from speechllm.choices import Choice


class RampKind(Choice):
    constant = "constant"
    linear = "linear"
    cosine = "cosine"
    step = "step"


def _check_kind(kind: str) -> None:
    if kind not in RampKind.values():
        raise ValueError(f"unknown ramp kind {kind!r}; allowed: {', '.join(RampKind.values())}")


def ramp(kind: str, start: float, end: float | None, start_step: int, end_step: int, step: int) -> float:
    """The value at ``step`` of a ramp from ``start`` (at ``start_step``) to ``end`` (at ``end_step``).

    ``end=None`` means ``end = start``. A ramp with ``end_step <= start_step`` jumps at ``start_step``.
    """
    _check_kind(kind)
    end = start if end is None else end
    if kind == "constant":
        return start
    if kind == "step":
        return start if step < end_step else end
    if step < start_step:
        progress = 0.0
    elif end_step <= start_step:
        progress = 1.0
    else:
        progress = min((step - start_step) / (end_step - start_step), 1.0)
    if kind == "linear":
        return start + (end - start) * progress
    return start + (end - start) * (1.0 - math.cos(math.pi * progress)) / 2.0  # cosine


@dataclass
class Ramp:
    """Config form of :func:`ramp`; call it with the step. ``Optional`` (not ``X | None``): OmegaConf."""

    kind: RampKind = field(default=RampKind.constant, metadata={"help": "constant | linear | cosine | step"})
    start: float = field(default=1.0, metadata={"help": "value until start_step"})
    end: Optional[float] = field(default=None, metadata={"help": "value from end_step on (None = start)"})
    start_step: int = field(default=0, metadata={"help": "the ramp leaves start here"})
    end_step: int = field(default=0, metadata={"help": "the ramp reaches end here (step: jumps here)"})

    def __post_init__(self) -> None:
        _check_kind(self.kind)

    def __call__(self, step: int) -> float:
        return ramp(self.kind, self.start, self.end, self.start_step, self.end_step, step)
