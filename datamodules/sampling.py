"""Batch streams whose batch ``k`` is a pure function of ``k``, and a mixture of them, so resume is exact.

A *stream* maps the batch index ``k`` of one rank to a list of ``(item index, draw number)``. The draw
number is unique within the stream and seeds per-sample noise. Since no batch depends on what was
iterated before it, a run resumed at optimizer step ``s`` restarts at batch
``s * accumulate_grad_batches`` and sees exactly the batches an uninterrupted run would have seen,
with no sampler state to save and none to lose.

- ``FixedSizeStream``: ``B`` items a batch; batch ``k`` of rank ``r`` holds draws
  ``[(k * world + r) * B, ... + B)`` of an endless stream made of seeded per-epoch permutations.
- ``BucketingStream``: batches packed under a padded-cost budget (seconds, tokens, items) from
  duration-sorted pools of each epoch's permutation, so little of a batch is padding.
- ``SequentialStream``: for a source without random access (a stream): batch ``k`` of rank ``r`` is
  positions ``[k * B, (k + 1) * B)`` of the rank's own sequence (``speechllm.sources.stream``).
- ``MixtureBatchSampler``: each batch from one source stream, the source drawn by step-dependent shares.
- ``ResumableBatchSampler``: a DataLoader ``batch_sampler`` over a ``FixedSizeStream``.
"""

from __future__ import annotations

import bisect
import itertools
import math
import zlib
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Protocol

import numpy as np
import torch

Batch = list[tuple[int, int]]  # (item index, draw number)


class BatchStream(Protocol):
    def batch(self, k: int) -> Batch:
        """Batch ``k`` of this rank."""
        ...


def _check_rank(owner: str, rank: int, world_size: int) -> None:
    if world_size < 1 or not 0 <= rank < world_size:
        raise ValueError(f"{owner}: rank {rank} with world_size {world_size}; need 0 <= rank < world_size")


def sample_seed(run_seed: int, source: str, draw: int) -> int:
    """The seed of one sample's random input: a function of the run seed, its source's name and its
    draw number only, so it is the same whatever the batch, the rank, the worker or the resume
    (``SpeechLLMModule.sample_generators``, waveform augmentation in ``datamodules.speech_text``)."""
    return (run_seed * 1_000_003 + zlib.crc32(source.encode())) * 1_000_003 + draw


def _epoch_generator(seed: int, epoch: int) -> torch.Generator:
    """The generator of one epoch; both streams draw the item permutation from it first, so they
    shuffle an epoch identically."""
    return torch.Generator().manual_seed(seed * 1_000_003 + epoch)


class FixedSizeStream:
    """``batch_size`` items a batch from an endless stream of per-epoch permutations (see module doc)."""

    def __init__(self, n_items: int, batch_size: int, seed: int, *, rank: int = 0, world_size: int = 1,
                 shuffle: bool = True):
        if n_items <= 0:
            raise ValueError(f"FixedSizeStream: cannot sample batches from an empty dataset "
                             f"(n_items = {n_items})")
        if batch_size <= 0:
            raise ValueError(f"FixedSizeStream: batch_size must be positive, got {batch_size}")
        _check_rank("FixedSizeStream", rank, world_size)
        self.n_items, self.batch_size, self.seed = n_items, batch_size, seed
        self.rank, self.world_size, self.shuffle = rank, world_size, shuffle
        self._perms: dict[int, torch.Tensor] = {}

    def _permutation(self, epoch: int) -> torch.Tensor:
        if epoch not in self._perms:
            if len(self._perms) > 2:
                self._perms.pop(min(self._perms))
            if self.shuffle:
                generator = _epoch_generator(self.seed, epoch)
                self._perms[epoch] = torch.randperm(self.n_items, generator=generator)
            else:
                self._perms[epoch] = torch.arange(self.n_items)
        return self._perms[epoch]

    def batch(self, k: int) -> Batch:
        """Batch k as (item index, draw number) pairs; the draw number seeds per-sample noise."""
        first = (k * self.world_size + self.rank) * self.batch_size
        out = []
        for draw in range(first, first + self.batch_size):
            epoch, pos = divmod(draw, self.n_items)
            out.append((int(self._permutation(epoch)[pos]), draw))
        return out


class SequentialStream:
    """``batch_size`` consecutive positions a batch of a rank's own item sequence (a streaming source
    sharded by rank, read by ``speechllm.sources.stream.StreamReader``); the draw number ``p *
    world_size + rank`` is unique across ranks."""

    def __init__(self, batch_size: int, *, rank: int = 0, world_size: int = 1):
        if batch_size <= 0:
            raise ValueError(f"SequentialStream: batch_size must be positive, got {batch_size}")
        _check_rank("SequentialStream", rank, world_size)
        self.batch_size, self.rank, self.world_size = batch_size, rank, world_size

    def batch(self, k: int) -> Batch:
        first = k * self.batch_size
        return [(p, p * self.world_size + self.rank) for p in range(first, first + self.batch_size)]


class ResumableBatchSampler:
    """DataLoader ``batch_sampler``: a ``FixedSizeStream``'s batches from ``start_batch`` on, endlessly."""

    def __init__(self, n_items: int, batch_size: int, seed: int, *, rank: int = 0, world_size: int = 1,
                 shuffle: bool = True, start_batch: int = 0):
        self.stream = FixedSizeStream(n_items, batch_size, seed, rank=rank, world_size=world_size,
                                      shuffle=shuffle)
        self.start_batch = start_batch

    def __iter__(self) -> Iterator[Batch]:
        return map(self.stream.batch, itertools.count(self.start_batch))


class BucketingStream:
    """Batches packed under a padded-cost budget from duration-sorted pools; see ``epoch_batches``.

    A batch of ``n`` items is allowed while ``n * max(duration) <= max_seconds``,
    ``n * max(tokens) <= max_tokens`` and ``n <= max_batch_size`` (a budget <= 0 is unset): memory
    goes by the padded size. An item over a budget on its own gets a batch of its own; dropping
    items is the data module's job, where the skip is counted.

    The global batch stream is the concatenation of the epochs; rank ``r``'s batch ``k`` is global
    batch ``k * world_size + r``, so an epoch boundary may fall between the ranks' batches. The draw
    number of an item is ``epoch * N + its position in the epoch's permutation``.
    """

    def __init__(self, durations: Sequence[float], tokens: Sequence[int], *, max_seconds: float,
                 max_tokens: int, max_batch_size: int, seed: int, rank: int = 0, world_size: int = 1,
                 shuffle: bool = True, pool_batches: int = 50):
        if len(durations) == 0:
            raise ValueError("BucketingStream: cannot sample batches from an empty dataset (no durations)")
        if len(durations) != len(tokens):
            raise ValueError(f"BucketingStream: {len(durations)} durations but {len(tokens)} tokens; "
                             "need one of each per item")
        seconds, lengths = np.asarray(durations, dtype=np.float64), np.asarray(tokens, dtype=np.int64)
        for name, values, bad in (("durations", seconds, ~np.isfinite(seconds) | (seconds < 0)),
                                  ("tokens", lengths, lengths < 0)):
            if bad.any():
                i = int(np.flatnonzero(bad)[0])
                raise ValueError(f"BucketingStream: {name}[{i}] = {values[i]}; must be finite and >= 0")
        if max_seconds <= 0 and max_tokens <= 0 and max_batch_size <= 0:
            raise ValueError("BucketingStream: no budget; set max_seconds, max_tokens or max_batch_size > 0")
        if pool_batches < 1:
            raise ValueError(f"BucketingStream: pool_batches must be >= 1, got {pool_batches}")
        _check_rank("BucketingStream", rank, world_size)
        self._seconds, self._tokens = seconds, lengths
        self.n_items = len(seconds)
        self.max_seconds, self.max_tokens, self.max_batch_size = max_seconds, max_tokens, max_batch_size
        self.seed, self.rank, self.world_size, self.shuffle = seed, rank, world_size, shuffle
        self.pool_size = pool_batches * self._typical_batch_size()
        self._epochs: dict[int, tuple[list[list[int]], np.ndarray]] = {}  # a few recent epochs
        self._epoch_starts = [0]  # global batches before epoch e; grows as far as batch() has looked

    def _typical_batch_size(self) -> int:
        """Items a batch holds when every item has the mean duration and length: sizes the pools."""
        sizes = [float(self.n_items)]
        means = ((self.max_seconds, self._seconds.mean()), (self.max_tokens, self._tokens.mean()))
        for budget, mean in means:
            if budget > 0 and mean > 0:
                sizes.append(budget / mean)
        if self.max_batch_size > 0:
            sizes.append(self.max_batch_size)
        return max(1, int(min(sizes)))

    def _fits(self, n: int, longest: float, most_tokens: int) -> bool:
        return ((self.max_seconds <= 0 or n * longest <= self.max_seconds)
                and (self.max_tokens <= 0 or n * most_tokens <= self.max_tokens)
                and (self.max_batch_size <= 0 or n <= self.max_batch_size))

    def _pack(self, order: np.ndarray) -> list[list[int]]:
        """Greedy: grow the batch in ``order`` while its padded cost stays within the budget."""
        batches: list[list[int]] = []
        current: list[int] = []
        longest, most_tokens = 0.0, 0
        items = zip(order.tolist(), self._seconds[order].tolist(), self._tokens[order].tolist())
        for i, seconds, tokens in items:
            if current and not self._fits(len(current) + 1, max(longest, seconds), max(most_tokens, tokens)):
                batches.append(current)
                current, longest, most_tokens = [], 0.0, 0
            current.append(i)
            longest, most_tokens = max(longest, seconds), max(most_tokens, tokens)
        if current:
            batches.append(current)
        return batches

    def _epoch(self, epoch: int) -> tuple[list[list[int]], np.ndarray]:
        """The epoch's global batches and each item's position in the epoch's permutation."""
        key = epoch if self.shuffle else 0  # unshuffled epochs are all alike
        if key not in self._epochs:
            if len(self._epochs) > 2:
                self._epochs.pop(min(self._epochs))
            if self.shuffle:
                generator = _epoch_generator(self.seed, epoch)
                permutation = torch.randperm(self.n_items, generator=generator).numpy()
                batches = []
                for first in range(0, self.n_items, self.pool_size):
                    pool = permutation[first:first + self.pool_size]
                    # lexsort is stable and sorts by its last key first: duration, then tokens
                    batches += self._pack(pool[np.lexsort((self._tokens[pool], self._seconds[pool]))])
                batches = [batches[b] for b in torch.randperm(len(batches), generator=generator).tolist()]
            else:
                permutation = np.arange(self.n_items)
                batches = self._pack(permutation)
            positions = np.empty(self.n_items, dtype=np.int64)
            positions[permutation] = np.arange(self.n_items)
            self._epochs[key] = (batches, positions)
        return self._epochs[key]

    def epoch_batches(self, epoch: int) -> list[list[int]]:
        """All global batches (item indices) of ``epoch``, in stream order; every item in exactly one.

        Shuffled: the epoch's permutation is cut into pools of ``pool_size`` items (``pool_batches``
        times the batch of a mean item), each pool sorted by duration (ties by tokens) and packed
        greedily, then the order of all the epoch's batches is shuffled. Unshuffled: packed greedily
        in manifest order, for deterministic evaluation.
        """
        return [list(b) for b in self._epoch(epoch)[0]]

    def _locate(self, global_batch: int) -> tuple[int, int]:
        """(epoch, batch within the epoch) of a global batch; counts earlier epochs' batches once."""
        while self._epoch_starts[-1] <= global_batch:
            epoch = len(self._epoch_starts) - 1
            self._epoch_starts.append(self._epoch_starts[-1] + len(self._epoch(epoch)[0]))
        epoch = bisect.bisect_right(self._epoch_starts, global_batch) - 1
        return epoch, global_batch - self._epoch_starts[epoch]

    def batch(self, k: int) -> Batch:
        """Batch k of this rank as (item index, draw number) pairs."""
        epoch, b = self._locate(k * self.world_size + self.rank)
        batches, positions = self._epoch(epoch)
        return [(i, epoch * self.n_items + int(positions[i])) for i in batches[b]]


_MASK64 = (1 << 64) - 1


def _splitmix64(x: int) -> int:
    x = (x + 0x9E3779B97F4A7C15) & _MASK64
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & _MASK64
    return x ^ (x >> 31)


def _uniform(seed: int, k: int) -> float:
    """A uniform number in [0, 1) that depends only on (seed, k): a SplitMix64 hash, no generator to
    build, so replaying the source choices of a million batches takes a second or two."""
    return (_splitmix64(_splitmix64(seed & _MASK64) ^ (k & _MASK64)) >> 11) * 2.0**-53


_CHECKPOINT_EVERY = 4096  # position() keeps per-source counts every this many batches


class MixtureBatchSampler:
    """DataLoader ``batch_sampler`` over several sources: every batch comes whole from one source.

    Batch ``k``'s source is drawn from the normalised ``shares(k // accumulate_grad_batches)`` (the
    optimizer step it belongs to) with a draw that depends only on (``seed``, ``k``): the same on
    every rank. The ``j``-th batch drawn from source ``s`` is ``streams[s].batch(j)``, yielded as
    ``[(s, item index, draw number), ...]``. Starting at ``start_batch`` replays the source choices
    before it (no data touched) to know each source's ``j``. A source missing from ``shares`` has share 0.
    """

    def __init__(self, streams: Mapping[str, BatchStream], shares: Callable[[int], Mapping[str, float]], *,
                 seed: int, accumulate_grad_batches: int = 1, start_batch: int = 0):
        if not streams:
            raise ValueError("MixtureBatchSampler: no source streams")
        if accumulate_grad_batches < 1:
            raise ValueError("MixtureBatchSampler: accumulate_grad_batches must be >= 1, "
                             f"got {accumulate_grad_batches}")
        if start_batch < 0:
            raise ValueError(f"MixtureBatchSampler: start_batch must be >= 0, got {start_batch}")
        self.streams = dict(streams)
        self.names = list(self.streams)
        self.shares, self.seed = shares, seed
        self.accumulate_grad_batches, self.start_batch = accumulate_grad_batches, start_batch
        self._checkpoints = [[0] * len(self.names)]  # per-source counts before batch i * _CHECKPOINT_EVERY

    def _weights(self, step: int) -> list[float]:
        shares = self.shares(step)
        unknown = sorted(set(shares) - set(self.names))
        if unknown:
            raise ValueError(f"MixtureBatchSampler: shares at step {step} name unknown sources {unknown}; "
                             f"sources: {self.names}")
        weights = [float(shares.get(name, 0.0)) for name in self.names]
        for name, weight in zip(self.names, weights):
            if not (math.isfinite(weight) and weight >= 0):
                raise ValueError(f"MixtureBatchSampler: share of source {name!r} at step {step} is {weight}; "
                                 "shares must be finite and >= 0")
        if sum(weights) <= 0:
            raise ValueError(f"MixtureBatchSampler: every source's share is 0 at step {step} "
                             f"({dict(zip(self.names, weights))}); nothing to draw from")
        return weights

    def _source_index(self, k: int) -> int:
        weights = self._weights(k // self.accumulate_grad_batches)
        threshold = _uniform(self.seed, k) * sum(weights)
        cumulative = 0.0
        for i, weight in enumerate(weights):
            cumulative += weight
            if threshold < cumulative:  # strict: a share-0 source is never chosen
                return i
        return max(i for i, weight in enumerate(weights) if weight > 0)  # threshold rounded up to the sum

    def source_of(self, k: int) -> str:
        """The source that batch ``k`` comes from."""
        return self.names[self._source_index(k)]

    def _replay(self, counts: list[int], first: int, stop: int) -> list[int]:
        counts = list(counts)
        for k in range(first, stop):
            counts[self._source_index(k)] += 1
        return counts

    def position(self, k: int) -> dict[str, int]:
        """How many batches each source gave before batch ``k``: the index of its next stream batch."""
        if k < 0:
            raise ValueError(f"MixtureBatchSampler: batch index must be >= 0, got {k}")
        checkpoint = k // _CHECKPOINT_EVERY
        while len(self._checkpoints) <= checkpoint:
            first = (len(self._checkpoints) - 1) * _CHECKPOINT_EVERY
            self._checkpoints.append(self._replay(self._checkpoints[-1], first, first + _CHECKPOINT_EVERY))
        counts = self._replay(self._checkpoints[checkpoint], checkpoint * _CHECKPOINT_EVERY, k)
        return dict(zip(self.names, counts))

    def __iter__(self) -> Iterator[list[tuple[str, int, int]]]:
        counts = self.position(self.start_batch)
        for k in itertools.count(self.start_batch):
            name = self.source_of(k)
            yield [(name, index, draw) for index, draw in self.streams[name].batch(counts[name])]
            counts[name] += 1
