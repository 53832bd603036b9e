"""CPS noise matched to real posteriors: alignment, statistics and simulation."""

import torch

from speechllm.posterior_stats import (
    PosteriorStats,
    align_units,
    collect_posterior_stats,
    simulate_matched_posteriors,
)


def test_alignment_by_hand():
    # ref a b c d, hyp a x c d e : sub b->x, insertion e
    pairs = align_units([1, 2, 3, 4], [1, 9, 3, 4, 5])
    assert pairs == [(1, 0), (2, 1), (3, 2), (4, 3), (None, 4)]
    assert align_units([1, 2, 3], [1, 3]) == [(1, 0), (2, None), (3, 1)]


def test_simulation_follows_the_confusion_table():
    vocab = 4
    confusion = torch.tensor([[1.0, 0, 0, 0, 0], [0, 0.5, 0.5, 0, 0], [0, 0, 1.0, 0, 0], [0, 0, 0, 0, 1.0]])
    pools = {u: torch.nn.functional.one_hot(torch.tensor([u]), vocab).float() * 0.9 for u in range(vocab)}
    stats = PosteriorStats(confusion, 0.0, pools, torch.zeros(0, vocab))
    g = torch.Generator().manual_seed(0)
    out = [simulate_matched_posteriors(torch.tensor([1, 2, 3]), stats, vocab, g) for _ in range(400)]
    assert all(o.shape[0] == 2 for o in out)  # unit 3 is always deleted
    first = torch.stack([o[0].argmax() for o in out])
    assert abs((first == 2).float().mean() - 0.5) < 0.08  # unit 1 read as 2 half the time
    assert torch.allclose(out[0].max(-1).values, torch.tensor(0.9))  # real pool vectors, not one-hots


def test_collect_on_tiny_encoder_and_use_in_encode_text(tiny_model, tmp_path):
    enc = tiny_model.encoder
    batches = [([torch.randn(8000) * 0.1, torch.randn(6000) * 0.1], ["the cat", "we go"])]
    stats = collect_posterior_stats(enc, batches)
    torch.testing.assert_close(stats.confusion.sum(-1), torch.ones(enc.output_dim))
    stats.save(tmp_path / "stats.pt")
    again = PosteriorStats.load(tmp_path / "stats.pt")
    assert again.insert_rate == stats.insert_rate and set(again.pools) == set(stats.pools)
    enc.stats, enc.cps.matched_share = again, 1.0
    try:
        feats, lengths = enc.encode_text(["the cat sat"], [torch.Generator().manual_seed(1)])
        assert feats.shape[-1] == enc.output_dim and lengths[0] > 0
    finally:
        enc.stats, enc.cps.matched_share = None, 0.0


def test_simulated_insertions_follow_the_measured_rate_even_above_one_per_unit():
    vocab = 4
    stats = PosteriorStats(confusion=torch.cat([torch.eye(vocab), torch.zeros(vocab, 1)], 1), insert_rate=1.5,
                           pools={}, insert_pool=torch.full((3, vocab), 0.25))
    g = torch.Generator().manual_seed(0)
    ids = torch.tensor([1, 2, 3] * 200)
    rows = simulate_matched_posteriors(ids, stats, vocab, g)
    inserted = int((rows == 0.25).all(-1).sum())
    assert abs(inserted / len(ids) - 1.5) < 0.15  # 600 units: the Poisson mean is within ~3 sd
    assert (rows[:, 1:].argmax(-1) + 1 == 1).any()  # the units themselves are still there, as one-hots
