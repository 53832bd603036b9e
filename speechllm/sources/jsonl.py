"""Our JSONL manifest (``speechllm.manifest``) as a source: ``jsonl:PATH`` or a plain path."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

from speechllm.manifest import Utterance, load_manifest
from speechllm.sources.base import Source


class JSONLSource(Source):
    """Map-style; a bad line fails with file, line and field (``load_manifest``)."""

    def items(self, require_audio: bool = False, limit: int = 0) -> list[Utterance]:
        items = load_manifest(Path(self.spec.location), require_audio)  # a Path: never re-parsed
        return items[:limit] if limit else items

    def rows(self, require_audio: bool, **_) -> Iterator[Utterance]:
        return iter(self.items(require_audio))
