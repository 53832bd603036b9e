"""Batch streams and the mixture sampler: exact continuation, full coverage per epoch, disjoint ranks,
budgets, shares."""

import itertools
import math

import numpy as np
import pytest

from datamodules.sampling import BucketingStream, FixedSizeStream, MixtureBatchSampler, ResumableBatchSampler
from speechllm.schedules import Ramp


def take(sampler, n):
    return list(itertools.islice(iter(sampler), n))


def test_resume_continues_the_same_stream():
    full = take(ResumableBatchSampler(23, 4, seed=7), 12)
    resumed = take(ResumableBatchSampler(23, 4, seed=7, start_batch=5), 7)
    assert resumed == full[5:]


def test_each_epoch_covers_every_item_once():
    draws = [i for batch in take(ResumableBatchSampler(10, 5, seed=1), 6) for i, _ in batch]
    for epoch in range(3):
        assert sorted(draws[epoch * 10:(epoch + 1) * 10]) == list(range(10))
    assert draws[:10] != draws[10:20]  # reshuffled per epoch


def test_ranks_split_the_stream():
    ranks = [take(ResumableBatchSampler(40, 4, seed=0, rank=r, world_size=2), 5) for r in range(2)]
    draws = [d for r in ranks for b in r for _, d in b]
    assert sorted(draws) == list(range(40))


# ------------------------------------------------------------------------------ bucketing stream

N_ITEMS = 120
BUDGET = dict(max_seconds=60.0, max_tokens=200, max_batch_size=8)


def corpus(seed=0, n=N_ITEMS):
    """Durations 0.5..20 s, ~3 tokens a second; plus one item over the seconds budget, one over tokens."""
    rng = np.random.default_rng(seed)
    durations = rng.uniform(0.5, 20.0, n)
    tokens = (3 * durations + rng.integers(0, 10, n)).astype(int)
    durations[7], tokens[11] = 75.0, 250
    return durations.tolist(), tokens.tolist()


def bucketing(seed=0, **kwargs):
    durations, tokens = corpus()
    return BucketingStream(durations, tokens, **BUDGET, seed=seed, **{"pool_batches": 3, **kwargs})


def within_budget(batch, durations, tokens):
    """Brute force: the padded cost of the batch, each budget on its own."""
    n = len(batch)
    return (n * max(durations[i] for i in batch) <= BUDGET["max_seconds"]
            and n * max(tokens[i] for i in batch) <= BUDGET["max_tokens"] and n <= BUDGET["max_batch_size"])


def stream_batches(stream, first, stop):
    return [stream.batch(k) for k in range(first, stop)]


def test_bucketing_batches_respect_the_budget_and_oversize_items_ride_alone():
    durations, tokens = corpus()
    stream = bucketing()
    for epoch in range(3):
        for batch in stream.epoch_batches(epoch):
            assert len(batch) == 1 or within_budget(batch, durations, tokens), batch
            if 7 in batch or 11 in batch:
                assert len(batch) == 1


def test_unshuffled_bucketing_packs_manifest_order_greedily():
    durations, tokens = corpus()
    batches = bucketing(shuffle=False).epoch_batches(0)
    assert [i for b in batches for i in b] == list(range(N_ITEMS))
    for batch, following in zip(batches, batches[1:]):  # each batch is maximal: the next item breaks it
        assert not within_budget(batch + following[:1], durations, tokens)
    assert bucketing(shuffle=False).epoch_batches(3) == batches


def test_sorted_pools_cut_padding():
    durations, _ = corpus()

    def padded_seconds(batches):
        return sum(len(b) * max(durations[i] for i in b) for b in batches)

    # manifest order pads ~1.4x the speech, sorted pools ~1.2x
    assert padded_seconds(bucketing().epoch_batches(0)) < 0.85 * padded_seconds(
        bucketing(shuffle=False).epoch_batches(0))


def test_bucketing_shuffles_the_order_of_batches():
    durations, _ = corpus()
    batches = bucketing(pool_batches=10).epoch_batches(0)  # 3 pools: sorted runs would descend twice
    longest = [max(durations[i] for i in b) for b in batches]
    descents = sum(later < earlier for earlier, later in zip(longest, longest[1:]))
    assert descents > len(batches) // 4  # about half, for a random order


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_bucketing_covers_every_item_once_per_epoch_with_unique_draws(seed):
    stream = bucketing(seed)
    for epoch in range(3):
        assert sorted(i for b in stream.epoch_batches(epoch) for i in b) == list(range(N_ITEMS))
    # the same through batch(k): epochs follow one another, draw = epoch * N + position in the permutation
    three_epochs = sum(len(stream.epoch_batches(e)) for e in range(3))
    pairs = [p for b in stream_batches(stream, 0, three_epochs) for p in b]
    assert len(pairs) == 3 * N_ITEMS
    assert [d for _, d in pairs if d < N_ITEMS] == [d for _, d in pairs[:N_ITEMS]]
    assert sorted(d for _, d in pairs) == list(range(3 * N_ITEMS))
    # an item's draw is its place in the epoch's permutation: the one FixedSizeStream draws in order
    fixed = FixedSizeStream(N_ITEMS, 1, seed)
    assert all(fixed.batch(d) == [(i, d)] for i, d in pairs)


def test_bucketing_is_deterministic_per_seed_and_differs_across_seeds_and_epochs():
    assert bucketing(5).epoch_batches(0) == bucketing(5).epoch_batches(0)
    assert bucketing(5).epoch_batches(0) != bucketing(6).epoch_batches(0)
    assert bucketing(5).epoch_batches(0) != bucketing(5).epoch_batches(1)


def test_bucketing_ranks_split_the_first_epoch():
    global_batches = bucketing().epoch_batches(0)
    ranks = [bucketing(rank=r, world_size=2) for r in range(2)]
    per_rank = [stream_batches(ranks[r], 0, (len(global_batches) + 1 - r) // 2) for r in range(2)]
    items = [[i for b in batches for i, _ in b] for batches in per_rank]
    assert not set(items[0]) & set(items[1])
    assert sorted(items[0] + items[1]) == list(range(N_ITEMS))
    assert [[i for i, _ in b] for b in per_rank[0]] == global_batches[0::2]
    assert all(d < N_ITEMS for batches in per_rank for b in batches for _, d in b)


def test_bucketing_resume_equals_the_uninterrupted_stream():
    full = stream_batches(bucketing(3, rank=1, world_size=2), 0, 90)  # about five epochs of ~35 batches
    resumed = bucketing(3, rank=1, world_size=2)  # fresh: no epoch cached, no epoch boundary known
    assert stream_batches(resumed, 70, 90) == full[70:]
    assert stream_batches(resumed, 10, 30) == full[10:30]  # back to an evicted epoch


def test_bucketing_rejects_bad_input():
    with pytest.raises(ValueError, match="empty"):
        BucketingStream([], [], **BUDGET, seed=0)
    with pytest.raises(ValueError, match="3 durations but 2 tokens"):
        BucketingStream([1.0, 2.0, 3.0], [1, 2], **BUDGET, seed=0)
    with pytest.raises(ValueError, match=r"durations\[1\] = nan"):
        BucketingStream([1.0, float("nan")], [1, 2], **BUDGET, seed=0)
    with pytest.raises(ValueError, match="no budget"):
        BucketingStream([1.0], [1], max_seconds=0, max_tokens=0, max_batch_size=0, seed=0)


# ----------------------------------------------------------------------------------- mixture

def sources(rank=0, world_size=2):
    return {name: FixedSizeStream(n, 2, seed=s, rank=rank, world_size=world_size)
            for name, n, s in (("a", 30, 1), ("b", 17, 2), ("c", 11, 3))}


def constant(**shares):
    return lambda step: shares


def counts(names, first, stop):
    return {s: names[first:stop].count(s) / (stop - first) for s in "abc"}


def test_mixture_constant_shares_match_within_binomial_noise():
    n = 4000
    batches = take(MixtureBatchSampler(sources(), constant(a=5.0, b=3.0, c=2.0), seed=0), n)
    names = [b[0][0] for b in batches]
    assert all(len({s for s, _, _ in b}) == 1 for b in batches)  # a batch comes whole from one source
    for source, share in counts(names, 0, n).items():
        expected = {"a": 0.5, "b": 0.3, "c": 0.2}[source]
        # 4 binomial standard deviations: a wrong share of this size fails, noise passes (p ~ 6e-5)
        assert abs(share - expected) < 4 * math.sqrt(expected * (1 - expected) / n)


def test_mixture_source_j_th_batch_is_the_streams_batch_j():
    batches = take(MixtureBatchSampler(sources(), constant(a=1.0, b=1.0, c=1.0), seed=4), 300)
    streams, seen = sources(), {"a": 0, "b": 0, "c": 0}
    for batch in batches:
        name = batch[0][0]
        assert [(i, d) for _, i, d in batch] == streams[name].batch(seen[name])
        seen[name] += 1


@pytest.mark.parametrize("accumulate", [1, 2])
def test_mixture_follows_a_linear_ramp(accumulate):
    steps = 6000
    rise = Ramp(kind="linear", start=0.1, end=0.9, start_step=0, end_step=steps)
    sampler = MixtureBatchSampler(sources(), lambda step: {"a": 1 - rise(step), "b": rise(step)}, seed=1,
                                  accumulate_grad_batches=accumulate)
    names = [sampler.source_of(k) for k in range(steps * accumulate)]
    tenth = steps // 10 * accumulate
    # the ramp's mean over steps 0..599 and 5400..5999: 0.1 + 0.8 * (mean step) / 6000
    for first, mean_share in ((0, 0.1 + 0.8 * 299.5 / steps), (9 * tenth, 0.1 + 0.8 * 5699.5 / steps)):
        share = counts(names, first, first + tenth)["b"]
        # 4 binomial standard deviations over the tenth's batches (each its own draw)
        assert abs(share - mean_share) < 4 * math.sqrt(mean_share * (1 - mean_share) / tenth)


def test_mixture_step_is_batch_over_accumulation():
    sampler = MixtureBatchSampler(sources(), lambda step: {"a": 1.0} if step < 50 else {"b": 1.0}, seed=0,
                                  accumulate_grad_batches=2)
    assert [sampler.source_of(k) for k in range(200)] == ["a"] * 100 + ["b"] * 100


def test_mixture_resume_yields_the_tail_and_position_counts_the_head():
    rise = Ramp(kind="cosine", start=0.0, end=1.0, start_step=0, end_step=100)

    def shares(step):
        return {"a": 1.0, "b": rise(step), "c": 0.5}

    full = take(MixtureBatchSampler(sources(), shares, seed=9, accumulate_grad_batches=2), 300)
    resumed = MixtureBatchSampler(sources(), shares, seed=9, accumulate_grad_batches=2, start_batch=137)
    assert take(resumed, 163) == full[137:]
    names = [b[0][0] for b in full]
    assert resumed.position(137) == {s: names[:137].count(s) for s in "abc"}
    assert [resumed.source_of(k) for k in range(300)] == names


def test_mixture_position_past_a_checkpoint_matches_a_plain_count():
    sampler = MixtureBatchSampler(sources(), constant(a=1.0, b=2.0), seed=2)
    names = [sampler.source_of(k) for k in range(9000)]
    for k in (8999, 4096, 5000, 0):
        assert sampler.position(k) == {s: names[:k].count(s) for s in "abc"}


def test_mixture_never_draws_a_share_zero_source():
    sampler = MixtureBatchSampler(sources(), constant(a=0.5, b=0.0, c=0.5), seed=3)
    assert "b" not in {b[0][0] for b in take(sampler, 2000)}
    assert sampler.position(2000)["b"] == 0


def test_mixture_is_the_same_on_every_rank():
    per_rank = [take(MixtureBatchSampler(sources(rank=r), constant(a=1.0, b=1.0, c=1.0), seed=5), 200)
                for r in range(2)]
    assert [b[0][0] for b in per_rank[0]] == [b[0][0] for b in per_rank[1]]
    draws = [d for batches in per_rank for b in batches for s, _, d in b if s == "a"]
    assert len(draws) == len(set(draws))  # the ranks read disjoint parts of each source


def test_single_source_mixture_is_the_stream():
    stream = bucketing(seed=2)
    batches = take(MixtureBatchSampler({"x": bucketing(seed=2)}, constant(x=1.0), seed=0), 40)
    assert batches == [[("x", i, d) for i, d in stream.batch(k)] for k in range(40)]


def test_mixture_rejects_bad_shares():
    sampler = MixtureBatchSampler(sources(), lambda step: {"a": 1.0 if step < 10 else 0.0}, seed=0)
    with pytest.raises(ValueError, match="step 10"):
        take(sampler, 11)
    with pytest.raises(ValueError, match="'b' at step 0 is -0.5"):
        MixtureBatchSampler(sources(), constant(a=1.0, b=-0.5), seed=0).source_of(0)
    with pytest.raises(ValueError, match=r"unknown sources \['z'\]"):
        MixtureBatchSampler(sources(), constant(a=1.0, z=1.0), seed=0).source_of(0)
