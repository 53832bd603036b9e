"""A streaming source read as one endless sequence that a rank can index, so resume stays exact.

A stream has no random access, so what a rank reads must be a pure function of how far it has read.
Rank ``r``'s sequence is its shard of epoch 0 (``Source.rows(rank=r, epoch=0, shuffle=True)``), then
its shard of epoch 1, and so on, keeping only the items ``keep`` accepts (a bad row or a clip that
cannot be used is a counted skip, never a crash). Position ``p`` of that sequence is always the same
item, whichever positions were read before: the data module asks for positions ``[j*B, (j+1)*B)`` for
the ``j``-th batch a rank draws from the source (``datamodules.sampling.SequentialStream``), and the
mixture sampler's position, restored from the checkpoint, says ``j``. A resumed run therefore reads
its shard again from the start up to its position (headers only, no decoding: a bad row must be seen
to be skipped) and then goes on with exactly the items an uninterrupted run would have read.

Skips are counted once per row, in epoch 0 (every row of the shard is seen there), including the rows
a resumed run passes on its way back to its position: the counts equal an uninterrupted run's.
"""

from __future__ import annotations

import bisect
from collections.abc import Callable, Generator

from speechllm.manifest import Utterance
from speechllm.sources.base import BadRow, Source, SourceError

Keep = Callable[[Utterance], "Utterance | str"]  # the item to use (e.g. with its duration) or a skip reason


class StreamReader:
    """Item ``p`` of rank ``rank``'s endless sequence of usable items (see the module doc)."""

    def __init__(self, source: Source, *, require_audio: bool, rank: int = 0, world_size: int = 1, seed: int = 0,
                 keep: Keep | None = None, count: Callable[[str, str], None] | None = None):
        self.source, self.require_audio = source, require_audio
        self.rank, self.world_size, self.seed = rank, world_size, seed
        self.keep = keep or (lambda utt: utt)
        self.count = count or (lambda reason, message: None)
        self._epoch_starts = [0]  # the position of each epoch's first item, as far as read
        self._counted = -1  # epoch 0's rows counted so far (a row is counted once)
        self._reset(0)

    def _reset(self, epoch: int) -> None:
        if getattr(self, "_rows", None) is not None:
            self._rows.close()  # the stream left behind (a generator: its files close now)
        self._epoch, self._rows, self._row = epoch, None, 0
        self._next = self._epoch_starts[epoch]  # the position the next usable item will have

    def __getstate__(self) -> dict:  # DataLoader workers get the reader without its open stream
        return {**self.__dict__, "_rows": None, "_row": 0, "_next": self._epoch_starts[self._epoch]}

    def __getitem__(self, position: int) -> Utterance:
        if position < 0:
            raise IndexError(f"{self.source}: position {position} < 0")
        if position < self._next:  # behind: start the epoch holding it again
            self._reset(bisect.bisect_right(self._epoch_starts, position) - 1)
        while True:
            utt = self._advance()
            if self._next - 1 == position:
                return utt

    def _advance(self) -> Utterance:
        """The next usable item; moves to the next epoch at the end of one."""
        while True:
            if self._rows is None:
                self._rows = self._open(self._epoch)
            row = next(self._rows, None)
            if row is None:
                if self._next == self._epoch_starts[self._epoch]:
                    raise SourceError(f"{self.source}: rank {self.rank} of {self.world_size} found no usable item "
                                      f"in epoch {self._epoch} of its shard")
                if len(self._epoch_starts) == self._epoch + 1:
                    self._epoch_starts.append(self._next)
                self._reset(self._epoch + 1)
                continue
            n, self._row = self._row, self._row + 1
            kept = self.keep(row) if isinstance(row, Utterance) else row
            if isinstance(kept, Utterance):
                self._next += 1
                return kept
            if self._epoch == 0 and n > self._counted:
                self._counted = n
                reason, message = (kept.reason, kept.message) if isinstance(kept, BadRow) else (kept, str(row.audio))
                self.count(reason, message)

    def _open(self, epoch: int) -> Generator[Utterance | BadRow, None, None]:
        rows = self.source.rows(self.require_audio, rank=self.rank, world_size=self.world_size, epoch=epoch,
                                seed=self.seed, shuffle=True)
        return (row for row in rows)  # a generator, so it can be closed
