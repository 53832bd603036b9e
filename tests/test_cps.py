"""CPS against a reference written as a plain loop over rows, plus its statistical properties."""

import math
import random

import torch

from speechllm.config import CPSConfig
from speechllm.cps import simulate_ctc_posteriors


def reference_cps(ids, vocab, blank, cfg, generator):
    """Same random draws in the same order, built row by row with Python lists."""
    a = float(torch.rand((), generator=generator)) * cfg.smoothing_max
    keep = torch.rand(len(ids), generator=generator).tolist()
    rows = []
    for token, u in zip(ids, keep):
        if u < cfg.keep_prob:
            rows.append([a / vocab + ((1 - a) if v == token else 0.0) for v in range(vocab)])
    for _ in range(math.floor(len(rows) * cfg.insert_prob)):
        pos = int(torch.randint(0, len(rows) + 1, (), generator=generator))
        repeat = float(torch.rand((), generator=generator)) < cfg.insert_repeat_share
        if repeat and pos > 0:
            new = list(rows[pos - 1])
        else:
            new = [1.0 if v == blank else 0.0 for v in range(vocab)]
        rows.insert(pos, new)
    return torch.tensor(rows).reshape(-1, vocab)


def test_matches_loop_reference_with_and_without_insertion():
    for insert_prob in (0.0, 0.3):
        cfg = CPSConfig(insert_prob=insert_prob)
        for seed in range(5):
            ids = [random.Random(seed).randrange(1, 12) for _ in range(17)]
            got = simulate_ctc_posteriors(torch.tensor(ids), 12, 0, cfg, torch.Generator().manual_seed(seed))
            want = reference_cps(ids, 12, 0, cfg, torch.Generator().manual_seed(seed))
            torch.testing.assert_close(got, want)


def test_rows_are_distributions_without_blanks_and_smoothing_in_range():
    cfg = CPSConfig()
    for seed in range(20):
        rows = simulate_ctc_posteriors(torch.randint(1, 30, (40,)), 30, 0, cfg, torch.Generator().manual_seed(seed))
        torch.testing.assert_close(rows.sum(-1), torch.ones(rows.shape[0]))
        assert (rows.argmax(-1) != 0).all(), "no blank rows when insertion is off"
        peak = rows.max(-1).values
        a = (1 - peak) * 30 / 29  # invert peak = 1 - a + a/V
        assert ((a >= 0) & (a <= 0.1 + 1e-6)).all()
        assert torch.allclose(a, a[0])  # one draw per utterance


def test_deletion_rate_is_five_percent():
    cfg = CPSConfig()
    g = torch.Generator().manual_seed(0)
    kept = sum(simulate_ctc_posteriors(torch.randint(1, 9, (1000,)), 9, 0, cfg, g).shape[0] for _ in range(20))
    assert abs(1 - kept / 20000 - 0.05) < 0.006


def test_seeded_and_insertion_count():
    cfg = CPSConfig(keep_prob=1.0, insert_prob=0.25, insert_repeat_share=0.0)
    ids = torch.arange(1, 21)
    a = simulate_ctc_posteriors(ids, 25, 0, cfg, torch.Generator().manual_seed(3))
    b = simulate_ctc_posteriors(ids, 25, 0, cfg, torch.Generator().manual_seed(3))
    assert torch.equal(a, b)
    assert a.shape[0] == 20 + 5
    assert (a.argmax(-1) == 0).sum() == 5  # all insertions are blanks with repeat share 0
