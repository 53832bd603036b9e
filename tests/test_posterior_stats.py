"""CPS noise matched to real posteriors: alignment, statistics and simulation."""

import torch

from speechllm.encoders.ctc import CTCVocabulary
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


class HandMadePosteriors:
    """An encoder whose LSD output for each clip is written by hand (a clip is named by a key)."""

    def __init__(self, outputs: dict[str, torch.Tensor]):
        self.vocab = CTCVocabulary(UNITS, blank_id=0)
        self.output_dim = len(UNITS)
        self.outputs = outputs

    def encode_speech(self, keys):
        rows = [self.outputs[k] for k in keys]
        feats = torch.zeros(len(rows), max(len(r) for r in rows), self.output_dim)
        for i, r in enumerate(rows):
            feats[i, : len(r)] = r
        return feats, torch.tensor([len(r) for r in rows])


UNITS = ["<blank>", " ", "a", "b", "c"]
A, B, C = 2, 3, 4


def soft(unit: int, seed: int) -> torch.Tensor:
    """A soft posterior whose argmax is ``unit``, different for every seed."""
    v = torch.rand(len(UNITS), generator=torch.Generator().manual_seed(seed)) * 0.1
    v[unit] = 0.7
    return v / v.sum()


def test_statistics_of_hand_made_posteriors_count_what_happened():
    # ref "ab" heard as "ac" (b -> c), "ca" as "c" (a deleted), "a" as "ab" (b inserted)
    heard = {"u1": [soft(A, 1), soft(C, 2)], "u2": [soft(C, 3)], "u3": [soft(A, 4), soft(B, 5)]}
    enc = HandMadePosteriors({k: torch.stack(v) for k, v in heard.items()})
    batches = [(["u1", "u2"], ["ab", "ca"]), (["u3"], ["a"])]
    stats = collect_posterior_stats(enc, batches, smoothing=0.5)
    counts = torch.zeros(5, 6)  # by hand: reference unit -> observed unit, or deleted (last column)
    counts[A, A], counts[A, 5], counts[B, C], counts[C, C] = 2, 1, 1, 1
    counts[:, :5] += 0.5 * torch.eye(5)
    torch.testing.assert_close(stats.confusion, counts / counts.sum(-1, keepdim=True))
    assert stats.insert_rate == 1 / 5  # one insertion, five reference units
    # Pools: every observed vector under its own unit, in order; the insertion also in insert_pool.
    assert sorted(stats.pools) == [A, B, C]
    for unit, vectors in [(A, [heard["u1"][0], heard["u3"][0]]), (B, [heard["u3"][1]]),
                          (C, [heard["u1"][1], heard["u2"][0]])]:
        torch.testing.assert_close(stats.pools[unit], torch.stack(vectors), rtol=0, atol=0)
    torch.testing.assert_close(stats.insert_pool, heard["u3"][1][None], rtol=0, atol=0)
    capped = collect_posterior_stats(enc, batches, max_per_unit=1)
    torch.testing.assert_close(capped.pools[A], heard["u1"][0][None], rtol=0, atol=0)


def pool_index(row: torch.Tensor, pool: torch.Tensor) -> int | None:
    """Which vector of ``pool`` ``row`` is, exactly (None: none)."""
    hits = [i for i, v in enumerate(pool) if torch.equal(row, v)]
    return hits[0] if hits else None


def test_matched_text_side_draws_every_row_from_the_pools(tiny_model, tmp_path):
    enc = tiny_model.encoder
    vocab = enc.output_dim
    # Hand-made statistics: nothing confused, deleted or inserted; two real-looking vectors per unit.
    pools = {u: torch.stack([torch.softmax(torch.randn(vocab, generator=torch.Generator().manual_seed(10 * u + k)), -1)
                             for k in range(2)]) for u in range(vocab)}
    confusion = torch.cat([torch.eye(vocab), torch.zeros(vocab, 1)], 1)
    PosteriorStats(confusion, 0.0, pools, torch.zeros(0, vocab)).save(tmp_path / "stats.pt")
    again = PosteriorStats.load(tmp_path / "stats.pt")
    text = "the cat sat"
    ids = enc.vocab.encode(text)
    enc.stats, enc.text_side, enc.cps.side_share = again, "matched", 1.0
    try:
        feats, lengths = enc.encode_text([text], [torch.Generator().manual_seed(1)])
    finally:
        enc.stats, enc.text_side = None, "cps"
    assert lengths.tolist() == [len(ids)]
    drawn = [pool_index(row, pools[u]) for row, u in zip(feats[0], ids)]
    assert None not in drawn and len(set(drawn)) == 2  # each row is one of its unit's vectors, both used
    # The one-hot path gives rows of the same shape that are in no pool.
    cps, cps_lengths = enc.encode_text([text], [torch.Generator().manual_seed(1)])
    assert cps_lengths.tolist() == [len(ids)]
    assert all(pool_index(row, pools[u]) is None for row, u in zip(cps[0], ids))


def test_statistics_of_the_tiny_encoder_survive_saving(tiny_model, tmp_path):
    enc = tiny_model.encoder
    batches = [([torch.randn(8000) * 0.1, torch.randn(6000) * 0.1], ["the cat", "we go"])]
    stats = collect_posterior_stats(enc, batches)
    stats.save(tmp_path / "stats.pt")
    again = PosteriorStats.load(tmp_path / "stats.pt")
    assert again.insert_rate == stats.insert_rate and set(again.pools) == set(stats.pools)
    torch.testing.assert_close(again.confusion, stats.confusion, rtol=0, atol=0)
    for unit, pool in stats.pools.items():
        torch.testing.assert_close(again.pools[unit], pool, rtol=0, atol=0)


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
