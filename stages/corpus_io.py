"""What the corpus preparers share: errors that name the file (and line), manifests rewritten only
when their content changes (a second run writes nothing), audio written whole or not at all, seeded
sampling of a stream in one pass, and opening plain or gzipped text.

Every preparer writes our JSONL manifests (``speechllm.manifest``): ``audio`` relative to the
manifest's folder, ``duration`` in seconds read from the file.
"""

from __future__ import annotations

import gzip
import heapq
import os
import random
import re
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import IO, Any, TypeVar

import numpy as np
import soundfile as sf

from speechllm.io import atomic_open
from speechllm.manifest import ManifestError, json_object, manifest_text, write_manifest

T = TypeVar("T")


class CorpusError(ManifestError):
    """A corpus file that does not follow its layout: the message names the file (and line).

    A ``ManifestError``, so ``python -m stages prepare ...`` prints it and exits 2."""


def open_text(path: Path) -> IO[str]:
    """A text file, gunzipped when it ends in ``.gz``."""
    if path.suffix == ".gz":
        return gzip.open(path, "rt", encoding="utf-8")
    return path.open(encoding="utf-8")


def write_if_changed(path: Path, rows: list[dict[str, Any]]) -> bool:
    """Write the manifest (atomically) unless the file already holds exactly these rows."""
    if not rows:
        raise CorpusError(f"{path}: nothing to write (no rows)")
    if path.is_file() and path.read_text(encoding="utf-8") == manifest_text(rows):
        return False
    write_manifest(path, rows)
    return True


def relative_audio(audio: Path, manifest: Path) -> str:
    """``audio`` as the manifest stores it: relative to the manifest's folder."""
    return os.path.relpath(audio.resolve(), manifest.parent.resolve())


def audio_info(path: Path, where: str) -> sf._SoundFileInfo:
    """``soundfile.info`` of a clip a corpus file names; a missing or unreadable clip names both."""
    if not path.is_file():
        raise CorpusError(f"{where}: audio file {path} does not exist")
    try:
        return sf.info(str(path))
    except Exception as err:  # soundfile raises its own error types
        raise CorpusError(f"{where}: cannot read audio {path}: {err}") from None


def write_audio(path: Path, wav: np.ndarray, rate: int) -> bool:
    """Write a clip whole or not at all (``speechllm.io.atomic_open``); an existing file is kept.

    Returns whether the file was written."""
    if path.is_file():
        return False
    with atomic_open(path, "wb") as f:
        sf.write(f, wav, rate, format=path.suffix.lstrip(".").upper())
    return True


def reservoir_sample(items: Iterable[T], n: int, seed: int) -> list[T]:
    """``n`` items drawn uniformly without replacement in one pass (all of them when there are fewer),
    in their original order; the same seed and stream give the same sample. ``n`` 0 keeps every item."""
    if n <= 0:
        return list(items)
    rng = random.Random(seed)
    heap: list[tuple[float, int, T]] = []  # the n largest random keys win
    for i, item in enumerate(items):
        key = rng.random()
        if len(heap) < n:
            heapq.heappush(heap, (key, i, item))
        elif key > heap[0][0]:
            heapq.heapreplace(heap, (key, i, item))
    return [item for _, _, item in sorted(heap, key=lambda k: k[1])]


_SPACES = re.compile(r"\s+")


def normalise_sentence(text: str) -> str:
    """What two sentences must share to count as the same (for excluding held-out text): case and
    whitespace ignored."""
    return _SPACES.sub(" ", text).strip().upper()


_SENTENCE_END = re.compile(r"(?:(?<=[.!?])|(?<=[.!?][\"')\]]))\s+(?=[\"'(\[]?[A-Z0-9])")
_ABBREVIATION = re.compile(r"(?:^|\s)(?:Mr|Mrs|Ms|Dr|St|Prof|Jr|Sr|vs|etc|e\.g|i\.e|No|Vol|Fig)\.$")


def split_sentences(text: str) -> list[str]:
    """Sentences of a document: cut after . ! ? (and closing quotes) before a capital or a digit, not
    after a common abbreviation (Mr., Dr., e.g., ...)."""
    out: list[str] = []
    for line in text.splitlines():
        first = len(out)  # a sentence never runs across lines
        for part in _SENTENCE_END.split(line):
            part = part.strip()
            if not part:
                continue
            if len(out) > first and _ABBREVIATION.search(out[-1]):
                out[-1] = f"{out[-1]} {part}"
            else:
                out.append(part)
    return out


def iter_json_lines(path: Path) -> Iterator[tuple[int, str, dict[str, Any]]]:
    """``(line number, "file:line", object)`` of a JSONL file (plain or gzipped), blank lines skipped;
    a line that is not a JSON object names the file and line."""
    for lineno, line in iter_lines(path):
        if not line.strip():
            continue
        where = f"{path}:{lineno}"
        yield lineno, where, json_object(line, where)


def iter_lines(path: Path) -> Iterator[tuple[int, str]]:
    """``(line number, line without its newline)`` of a plain or gzipped text file."""
    with open_text(path) as f:
        for lineno, line in enumerate(f, start=1):
            yield lineno, line.rstrip("\n")
