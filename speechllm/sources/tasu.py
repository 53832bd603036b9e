"""TASU's released JSONL as a source (``tasu:FILE.jsonl``), map-style.

One JSON object a line, as TASU's data loader reads it (GitHub ``PigeonDan1/ps-slm``,
``MultiTaskDataset``): ``key`` (the id), ``task`` (``ASR``, ``QA``, ...), ``target`` (the text trained
on), ``path`` (the audio: a file soundfile reads, relative to the JSONL's folder when relative, or a
Kaldi ``file.ark:offset``, read with ``kaldiio``, the ``tasu`` extra). Other fields (``GT``,
``prompt``, ...) go to ``meta``. Text-only use (simulated and text sources) ignores ``path``. A bad
line fails with file, line and field; audio is taken at its own rate and resampled.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import numpy as np

from speechllm.manifest import AudioRef, ManifestError, Utterance, json_object
from speechllm.sources.base import BadRow, FileAudio, Source, SourceError, optional_text, resolve, text_field

_KNOWN = ("key", "task", "target", "path")


class KaldiArkAudio(AudioRef):
    """``file.ark:offset``: a wav (or int16 matrix) in a Kaldi archive, as TASU stores its ASR audio."""

    def __init__(self, spec: str, base: Path):
        ark, _, offset = spec.rpartition(":")
        self.path, self.offset, self.spec = resolve(ark, base), offset, spec

    def open(self) -> tuple[np.ndarray, int]:
        try:
            import kaldiio
        except ImportError:
            raise SourceError(f"{self.spec}: a Kaldi ark path needs the `kaldiio` package "
                              "(the `tasu` extra: pip install -e '.[tasu]')") from None
        rate, samples = kaldiio.load_mat(f"{self.path}:{self.offset}")
        samples = np.asarray(samples)
        if np.issubdtype(samples.dtype, np.integer):
            samples = samples.astype(np.float32) / 32768.0  # as TASU's loader scales int16 PCM
        return samples.astype(np.float32).reshape(len(samples), -1), int(rate)

    def exists(self) -> bool:
        return self.path.exists()

    def __str__(self) -> str:
        return self.spec


class TASUSource(Source):
    def rows(self, require_audio: bool, **_) -> Iterator[Utterance | BadRow]:
        path = Path(self.spec.location).expanduser()
        if not path.is_file():
            raise SourceError(f"{self}: TASU JSONL not found: {path}")
        with path.open(encoding="utf-8") as f:
            for lineno, raw in enumerate(f, start=1):
                if raw.strip():
                    yield self._row(raw, f"{path}:{lineno}", path.parent, require_audio)

    def _row(self, raw: str, where: str, base: Path, require_audio: bool) -> Utterance | BadRow:
        try:
            item = json_object(raw, where)
        except ManifestError as err:
            return BadRow("bad_row", str(err))
        if "key" not in item:
            return BadRow("bad_row", f"{where}: field 'key' is missing")
        target = text_field(where, "target", item.get("target"))
        task = optional_text(where, "task", item.get("task"))
        for value in (target, task):
            if isinstance(value, BadRow):
                return BadRow(value.reason, value.message.replace("column", "field"))
        audio: AudioRef | None = None
        path = item.get("path")
        if path is None and require_audio:
            return BadRow("bad_row", f"{where}: field 'path' is missing (speech needs it)")
        if path is not None:
            if not isinstance(path, str) or not path:
                return BadRow("bad_row", f"{where}: field 'path' must be a path string")
            is_ark = ".ark:" in path and path.rpartition(":")[2].isdigit()
            audio = KaldiArkAudio(path, base) if is_ark else FileAudio(resolve(path, base))
        return Utterance(id=str(item["key"]), text=target, target=target, task=task, audio=audio,
                         meta={k: v for k, v in item.items() if k not in _KNOWN})
