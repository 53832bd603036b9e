"""Lhotse ``CutSet`` manifests and Shar directories as sources (``lhotse:``, ``lhotse-shar:``; the
``lhotse`` extra), read with lhotse's own readers.

    lhotse:data/cuts_train.jsonl.gz                 # map-style (CutSet.from_file)
    lhotse:data/cuts_train.jsonl.gz?streaming=true  # lazily, as a stream (CutSet.from_jsonl_lazy)
    lhotse-shar:data/shar_train                     # a Shar directory: always a stream (CutSet.from_shar)

A cut is one item: ``id`` the cut's id, ``text`` its supervisions' texts joined by a space (a cut with
none is a bad row), ``speaker`` the first supervision's, ``duration`` the cut's, ``words`` the
supervisions' ``word`` alignments (recording times, made relative to the cut), ``target``/``task``
from the cut's or first supervision's ``custom`` fields when they are strings; the other ``custom``
fields go to ``meta``. Audio is ``cut.load_audio()`` at the cut's rate, resampled by
``speechllm.manifest.load_audio``.

Streams: rank ``r`` of ``W`` takes every ``W``-th cut from the ``r``-th; ``shuffle_buffer=N`` shuffles
each epoch with ``CutSet.shuffle(random.Random(seed + epoch), buffer_size=N)`` (Shar also shuffles its
shard order with that seed).
"""

from __future__ import annotations

import itertools
import random
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import soundfile as sf

from speechllm.manifest import AudioRef, Utterance
from speechllm.sources.base import BadRow, Source, SourceError


class CutAudio(AudioRef):
    """A cut's audio, decoded by lhotse (``cut.load_audio()``: channels x samples)."""

    def __init__(self, cut: Any):
        self.cut = cut

    def _files(self) -> list[Path]:
        recording = getattr(self.cut, "recording", None)
        sources = recording.sources if recording is not None else []
        return [Path(s.source) for s in sources if s.type == "file"]

    def open(self) -> tuple[np.ndarray, int]:
        samples = np.asarray(self.cut.load_audio(), dtype=np.float32)
        return np.ascontiguousarray(samples.T), int(self.cut.sampling_rate)

    def info(self) -> tuple[int, int]:
        for path in self._files():  # a file must be there and readable; in-memory audio (Shar) is trusted
            sf.info(str(path))
        return int(self.cut.num_samples), int(self.cut.sampling_rate)

    def exists(self) -> bool:
        return all(path.exists() for path in self._files())

    def __str__(self) -> str:
        files = self._files()
        return f"cut {self.cut.id}" + (f" ({files[0]})" if files else "")


def _lhotse():
    import lhotse

    return lhotse


def cut_utterance(cut: Any, where: str, require_audio: bool) -> Utterance | BadRow:
    sups = list(cut.supervisions)
    texts = [s.text.strip() for s in sups if isinstance(s.text, str) and s.text.strip()]
    if not texts:
        return BadRow("bad_row", f"{where}: cut {cut.id!r} has no supervision with text")
    if require_audio and not cut.has_recording:
        return BadRow("bad_row", f"{where}: cut {cut.id!r} has no recording")
    custom = {**(sups[0].custom or {}), **(cut.custom or {})}  # sups is not empty: it has text
    custom = {k: v for k, v in custom.items() if k not in ("shard_origin", "shar_epoch")}
    words = None
    offset = getattr(cut, "start", None)  # a MonoCut's start in its recording; alignments are in recording time
    alignments = [(s.alignment or {}).get("word") for s in sups]
    if offset is not None and any(alignments):
        words = [{"w": a.symbol, "start": round(max(a.start - offset, 0.0), 4),
                  "end": round(min(a.start + a.duration - offset, cut.duration), 4)}
                 for ali in alignments for a in (ali or [])]
    target, task = custom.pop("target", None), custom.pop("task", None)
    return Utterance(
        id=str(cut.id), text=" ".join(texts), audio=CutAudio(cut) if cut.has_recording else None,
        duration=float(cut.duration), speaker=next((s.speaker for s in sups if s.speaker), None),
        target=target if isinstance(target, str) else None, task=task if isinstance(task, str) else None,
        words=words, meta={k: v for k, v in custom.items() if isinstance(v, (str, int, float, bool, list))})


class _CutSource(Source):
    def _cuts(self, epoch: int, seed: int, shuffle: bool) -> Iterable[Any]:
        raise NotImplementedError

    def rows(self, require_audio: bool, *, rank: int = 0, world_size: int = 1, epoch: int = 0, seed: int = 0,
             shuffle: bool = False) -> Iterator[Utterance | BadRow]:
        cuts = self._cuts(epoch, seed, shuffle and self.spec.options["shuffle_buffer"] > 0)
        shard = f" (rank {rank} of {world_size})" if world_size > 1 else ""
        for n, cut in enumerate(itertools.islice(cuts, rank, None, world_size) if world_size > 1 else cuts):
            yield cut_utterance(cut, f"{self} cut {n}{shard}", require_audio)

    def _shuffled(self, cuts: Any, epoch: int, seed: int, shuffle: bool) -> Any:
        if not shuffle:
            return cuts
        return cuts.shuffle(rng=random.Random(seed + epoch), buffer_size=self.spec.options["shuffle_buffer"])

    def _check_path(self, want_dir: bool) -> Path:
        path = Path(self.spec.location).expanduser()
        if not (path.is_dir() if want_dir else path.is_file()):
            raise SourceError(f"{self}: {'directory' if want_dir else 'CutSet manifest'} not found: {path}")
        return path


class LhotseCutsSource(_CutSource):
    """``lhotse:cuts.jsonl.gz``: map-style, or a stream with ``streaming=true``."""

    def __init__(self, spec):
        super().__init__(spec)
        self.streaming = bool(spec.options["streaming"])
        self._eager = None

    def _cuts(self, epoch: int, seed: int, shuffle: bool) -> Iterable[Any]:
        path = self._check_path(want_dir=False)
        CutSet = _lhotse().CutSet
        try:
            if self.streaming:
                return self._shuffled(CutSet.from_jsonl_lazy(path), epoch, seed, shuffle)
            if self._eager is None:
                self._eager = CutSet.from_file(path).to_eager()
            return self._eager
        except Exception as err:
            raise SourceError(f"{self}: cannot read the CutSet: {type(err).__name__}: {err}") from None


class LhotseSharSource(_CutSource):
    """``lhotse-shar:DIR``: a Shar directory (``cuts.*.jsonl.gz`` + audio tars), always a stream."""

    streaming = True

    def _cuts(self, epoch: int, seed: int, shuffle: bool) -> Iterable[Any]:
        path = self._check_path(want_dir=True)
        try:
            cuts = _lhotse().CutSet.from_shar(in_dir=path, shuffle_shards=shuffle, seed=seed + epoch)
        except Exception as err:
            raise SourceError(f"{self}: cannot read the Shar directory: {type(err).__name__}: {err}") from None
        return self._shuffled(cuts, epoch, seed, shuffle)
