"""What every source format shares: the ``Source`` interface, bad rows, audio references.

A format writes ``rows``: its items in order as ``Utterance`` (audio an :class:`AudioRef` or a path)
or :class:`BadRow` (a row that breaks the contract, with a message naming the source, the row and
the column). ``items`` turns the rows into the validated list the stages use (a bad row is an error,
as in our manifests); a streaming source's rows are read by
:class:`speechllm.sources.stream.StreamReader`, which counts a bad row as a skip instead (a stream
cannot be checked before training).
"""

from __future__ import annotations

import io
from abc import ABC, abstractmethod
from collections.abc import Iterator
from contextlib import closing
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from speechllm.manifest import AudioRef, ManifestError, Utterance

if TYPE_CHECKING:
    from speechllm.sources import SourceSpec


class SourceError(ManifestError):
    """A source string, or a source's data, that does not follow its format (the message says where)."""


@dataclass(frozen=True)
class BadRow:
    """A row that breaks the contract: ``reason`` names the skip counter, ``message`` says where and why."""

    reason: str
    message: str


class Source(ABC):
    """One data source: ``items`` (map-style: every item, validated) or ``rows`` by rank and epoch."""

    streaming: bool = False

    def __init__(self, spec: SourceSpec):
        self.spec = spec

    def __str__(self) -> str:
        return self.spec.text

    @abstractmethod
    def rows(self, require_audio: bool, *, rank: int = 0, world_size: int = 1, epoch: int = 0, seed: int = 0,
             shuffle: bool = False) -> Iterator[Utterance | BadRow]:
        """The items in order. A streaming source gives rank ``rank``'s shard of epoch ``epoch``, shuffled
        (when ``shuffle`` and the spec's ``shuffle_buffer`` say so) by ``seed + epoch``; a map-style one
        gives every item (its order is the sampler's business)."""

    def items(self, require_audio: bool = False, limit: int = 0) -> list[Utterance]:
        """The first ``limit`` items (0 = all) in source order, validated: a bad row or a repeated id is a
        ManifestError naming the source and the row; an empty source is one too."""
        items: list[Utterance] = []
        seen: dict[str, int] = {}
        with closing(iter(self.rows(require_audio))) as rows:  # a stream left early is closed now
            for row in rows:
                if isinstance(row, BadRow):
                    raise SourceError(row.message)
                if row.id in seen:
                    raise SourceError(f"{self}: id {row.id!r} repeats (items {seen[row.id]} and {len(items)})")
                seen[row.id] = len(items)
                items.append(row)
                if limit and len(items) >= limit:
                    break
        if not items:
            raise SourceError(f"{self}: no items")
        return items


def text_field(where: str, column: str, value: Any) -> str | BadRow:
    """A transcript must be a non-empty string (as in our manifests)."""
    if not isinstance(value, str) or not value.strip():
        return BadRow("bad_row", f"{where}: column {column!r} must be a non-empty string, got {value!r:.60}")
    return value


def optional_text(where: str, column: str, value: Any) -> str | None | BadRow:
    if value is None or isinstance(value, str):
        return value
    return BadRow("bad_row", f"{where}: column {column!r} must be a string, got {value!r:.60}")


def words_field(where: str, column: str, value: Any) -> list[dict[str, Any]] | None | BadRow:
    """Word times as our manifests hold them; a datasets ``Sequence`` of structs (a dict of lists) too."""
    if value is None:
        return None
    if isinstance(value, dict) and set(value) >= {"w", "start", "end"}:
        value = [dict(zip(value, parts)) for parts in zip(*value.values())]
    ok = isinstance(value, list) and all(
        isinstance(w, dict) and isinstance(w.get("w"), str)
        and isinstance(w.get("start"), (int, float)) and isinstance(w.get("end"), (int, float)) for w in value)
    if not ok:
        return BadRow("bad_row", f'{where}: column {column!r} must be a list of {{"w": str, "start": s, "end": s}}')
    return [{"w": w["w"], "start": float(w["start"]), "end": float(w["end"])} for w in value]


def duration_field(where: str, column: str, value: Any) -> float | None | BadRow:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)) or value < 0:
        return BadRow("bad_row", f"{where}: column {column!r} must be a non-negative number of seconds, got {value!r:.60}")
    return float(value)


def resolve(path: str | Path, base: Path | None) -> Path:
    """A relative path against ``base`` (the folder of the file that names it), an absolute one as it is."""
    path = Path(path).expanduser()
    return path if path.is_absolute() or base is None else base / path


class FileAudio(AudioRef):
    """A file named by a foreign manifest: read at its own rate, resampled."""

    def __init__(self, path: Path):
        self.path = Path(path)

    def open(self) -> str:
        return str(self.path)

    def exists(self) -> bool:
        return self.path.exists()

    def __str__(self) -> str:
        return str(self.path)


class BytesAudio(AudioRef):
    """An encoded file held in memory (a streamed dataset row's bytes)."""

    def __init__(self, data: bytes, where: str):
        self.data, self.where = data, where

    def open(self) -> io.BytesIO:
        return io.BytesIO(self.data)

    def __str__(self) -> str:
        return self.where
