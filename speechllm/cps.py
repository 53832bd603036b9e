"""CTC posterior simulation (CPS, TASU; docs/methods.md#cps).

Text becomes a label-rate sequence of distributions over the CTC vocabulary that looks like
LSD-compressed real posteriors: one row per CTC unit, no blanks and no repetitions unless the
(off by default) insertion noise adds them.
"""

from __future__ import annotations

import math

import torch

from speechllm.config import CPSConfig


def simulate_ctc_posteriors(
    ids: torch.Tensor,
    vocab_size: int,
    blank_id: int,
    cfg: CPSConfig,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Simulated posteriors (L', V) for one utterance's CTC unit ids (L,).

    1. one-hot; 2. label smoothing with a ~ U(0, smoothing_max) drawn once per utterance,
    ``(1 - a) * Y + a / V``; 3. keep each row with probability keep_prob; 4. optionally insert
    ``floor(L' * insert_prob)`` rows, each a copy of the previous row (share insert_repeat_share)
    or a pure blank one-hot, at uniform positions.
    """
    ids = ids.long().flatten()
    a = torch.rand((), generator=generator) * cfg.smoothing_max
    keep = torch.rand(ids.shape[0], generator=generator) < cfg.keep_prob
    rows = torch.nn.functional.one_hot(ids[keep], vocab_size).float()
    rows = (1.0 - a) * rows + a / vocab_size

    n_insert = math.floor(rows.shape[0] * cfg.insert_prob)
    for _ in range(n_insert):
        pos = int(torch.randint(0, rows.shape[0] + 1, (), generator=generator))
        repeat = torch.rand((), generator=generator) < cfg.insert_repeat_share
        if repeat and pos > 0:
            new = rows[pos - 1 : pos]
        else:  # a blank frame (also where there is no previous row to repeat)
            new = torch.nn.functional.one_hot(torch.tensor([blank_id]), vocab_size).float()
        rows = torch.cat([rows[:pos], new, rows[pos:]])
    return rows
