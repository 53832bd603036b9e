"""A batch sampler whose position is a pure function of the step, so resume is exact.

Batch ``k`` of rank ``r`` holds draws ``[(k * world + r) * B, ... + B)`` of an endless stream made
of seeded per-epoch permutations. A run resumed at optimizer step ``s`` restarts at batch
``s * accumulate_grad_batches`` and sees exactly the batches an uninterrupted run would have seen,
with no sampler state to save and none to lose.
"""

from __future__ import annotations

from collections.abc import Iterator

import torch


class ResumableBatchSampler:
    def __init__(self, n_items: int, batch_size: int, seed: int, *, rank: int = 0, world_size: int = 1,
                 shuffle: bool = True, start_batch: int = 0):
        if n_items <= 0:
            raise ValueError("cannot sample batches from an empty dataset")
        self.n_items, self.batch_size, self.seed = n_items, batch_size, seed
        self.rank, self.world_size, self.shuffle = rank, world_size, shuffle
        self.start_batch = start_batch
        self._perms: dict[int, torch.Tensor] = {}

    def _permutation(self, epoch: int) -> torch.Tensor:
        if epoch not in self._perms:
            if len(self._perms) > 2:
                self._perms.pop(min(self._perms))
            if self.shuffle:
                g = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
                self._perms[epoch] = torch.randperm(self.n_items, generator=g)
            else:
                self._perms[epoch] = torch.arange(self.n_items)
        return self._perms[epoch]

    def batch(self, k: int) -> list[tuple[int, int]]:
        """Batch k as (item index, draw number) pairs; the draw number seeds per-sample noise."""
        first = (k * self.world_size + self.rank) * self.batch_size
        out = []
        for draw in range(first, first + self.batch_size):
            epoch, pos = divmod(draw, self.n_items)
            out.append((int(self._permutation(epoch)[pos]), draw))
        return out

    def __iter__(self) -> Iterator[list[tuple[int, int]]]:
        k = self.start_batch
        while True:
            yield self.batch(k)
            k += 1
