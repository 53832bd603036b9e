"""The resumable batch sampler: exact continuation, full coverage per epoch, disjoint ranks."""

import itertools

from datamodules.sampling import ResumableBatchSampler


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
