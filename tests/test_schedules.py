"""Step ramps: each kind against hand-computed values before, inside and after the ramp; limits and order."""

import math

import pytest
from omegaconf import OmegaConf

from speechllm.schedules import Ramp, ramp

# A ramp from 0.2 to 1.0 over steps 10..30: at step 15 progress is 1/4, at step 20 one half.
RISE = dict(start=0.2, end=1.0, start_step=10, end_step=30)


@pytest.mark.parametrize("step, expected", [(0, 0.2), (10, 0.2), (15, 0.4), (20, 0.6), (25, 0.8), (30, 1.0),
                                            (1000, 1.0)])
def test_linear_by_hand(step, expected):
    assert ramp("linear", **RISE, step=step) == pytest.approx(expected)


# cosine: 0.2 + 0.8 * (1 - cos(pi p)) / 2; p = 1/4 -> (1 - 0.70710678) / 2 = 0.14644661
@pytest.mark.parametrize("step, expected", [(0, 0.2), (10, 0.2), (15, 0.2 + 0.8 * 0.14644661), (20, 0.6),
                                            (25, 0.2 + 0.8 * 0.85355339), (30, 1.0), (1000, 1.0)])
def test_cosine_by_hand(step, expected):
    assert ramp("cosine", **RISE, step=step) == pytest.approx(expected)


@pytest.mark.parametrize("step, expected", [(0, 0.2), (10, 0.2), (29, 0.2), (30, 1.0), (1000, 1.0)])
def test_step_jumps_at_end_step(step, expected):
    assert ramp("step", **RISE, step=step) == expected


@pytest.mark.parametrize("step", [0, 15, 30, 1000])
def test_constant_holds_start(step):
    assert ramp("constant", **RISE, step=step) == 0.2


@pytest.mark.parametrize("kind", ["linear", "cosine", "step"])
def test_end_none_means_end_equals_start(kind):
    assert [ramp(kind, 0.7, None, 10, 30, s) for s in (0, 20, 40)] == [0.7, 0.7, 0.7]


@pytest.mark.parametrize("kind", ["linear", "cosine"])
def test_empty_ramp_jumps_at_start_step(kind):
    assert ramp(kind, 0.0, 1.0, 5, 5, 4) == 0.0
    assert ramp(kind, 0.0, 1.0, 5, 5, 5) == 1.0
    assert ramp(kind, 0.0, 1.0, 5, 3, 5) == 1.0  # end_step before start_step: a jump too


@pytest.mark.parametrize("kind", ["linear", "cosine", "step"])
@pytest.mark.parametrize("start, end", [(0.2, 1.0), (1.0, 0.0)])
def test_monotone_between_its_limits(kind, start, end):
    values = [ramp(kind, start, end, 10, 30, s) for s in range(0, 41)]
    direction = 1 if end > start else -1
    assert all(direction * (b - a) >= 0 for a, b in zip(values, values[1:]))
    assert values[0] == start and values[-1] == pytest.approx(end)
    assert all(min(start, end) <= v <= max(start, end) for v in values)


def test_unknown_kind_names_it_and_the_allowed_ones():
    with pytest.raises(ValueError, match=r"'exp'.*constant, linear, cosine, step"):
        ramp("exp", 0.0, 1.0, 0, 10, 5)
    with pytest.raises(ValueError, match="'exp'"):
        Ramp(kind="exp")


def test_ramp_dataclass_calls_ramp_and_survives_omegaconf():
    node = OmegaConf.merge(OmegaConf.structured(Ramp), {"kind": "cosine", "start": 0.0, "end": 2.0,
                                                        "end_step": 8})
    assert node.end == 2.0 and OmegaConf.structured(Ramp).end is None  # Optional[float] accepts both
    schedule = OmegaConf.to_object(node)
    assert isinstance(schedule, Ramp)
    assert schedule(4) == pytest.approx(1.0)  # half way through a cosine ramp: the mean of the limits
    assert schedule(2) == pytest.approx(1 - math.cos(math.pi / 4))  # 2 * (1 - cos(pi / 4)) / 2
