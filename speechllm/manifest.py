"""JSONL manifests, validated on load: a bad line names the file, the line number and the field.

One utterance a line: ``id``, ``audio`` (path relative to the manifest; NeMo's ``audio_filepath``
is accepted), ``duration``, ``text``, optional ``target``, ``task``, ``speaker``, ``words``
(``[{"w", "start", "end"}]``). Text-only corpora need only ``id`` and ``text``.

``load_manifest`` also takes a source string of another format (``hf:...``, ``lhotse:...``,
``lhotse-shar:...``, ``tasu:...``; :mod:`speechllm.sources`): the same ``Utterance`` items, whose
``audio`` is then an :class:`AudioRef` (audio held by a dataset, not a file of its own).
``load_audio`` is the one place that decodes, mixes to mono and resamples.
"""

from __future__ import annotations

import io
import json
import re
from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import soundfile as sf
import torch

from speechllm.io import atomic_open


class ManifestError(ValueError):
    """A manifest line that does not follow the contract."""


class AudioRef(ABC):
    """Audio that is not a file named by our manifest: a row of a dataset, a Lhotse cut, bytes, a file
    of a foreign manifest. Such audio is taken at its own rate and resampled (our JSONL manifests are
    prepared at the encoder's rate, and a clip at another rate there is a counted skip)."""

    @abstractmethod
    def open(self) -> str | Path | io.BytesIO | tuple[np.ndarray, int]:
        """What ``load_audio`` decodes: a file or bytes soundfile reads, or ``(samples (frames,
        channels) float32, rate)`` already decoded (Lhotse decodes its own cuts)."""

    def info(self) -> tuple[int, int]:
        """``(frames, sample rate)``, reading as little as possible; raises if the audio is unreadable."""
        what = self.open()
        if isinstance(what, tuple):
            return len(what[0]), int(what[1])
        info = sf.info(what if isinstance(what, io.BytesIO) else str(what))
        return int(info.frames), int(info.samplerate)

    def exists(self) -> bool:
        """False when the audio is known to be missing (a file that is not there)."""
        return True

    @abstractmethod
    def __str__(self) -> str:
        """Where the audio is, for messages."""


@dataclass
class Utterance:
    id: str
    text: str
    audio: Path | AudioRef | None = None
    duration: float | None = None
    target: str | None = None
    task: str | None = None
    speaker: str | None = None
    words: list[dict[str, Any]] | None = None
    meta: dict[str, Any] = field(default_factory=dict)  # any other field (topic, ...)

    @property
    def target_text(self) -> str:
        return self.target if self.target is not None else self.text


_KNOWN = {"id", "text", "audio", "audio_filepath", "duration", "target", "task", "speaker", "words"}


def json_object(raw: str, where: str) -> dict[str, Any]:
    """One JSONL line as a dict; a ManifestError naming ``where`` (``file:line``) if it is not one."""
    try:
        item = json.loads(raw)
    except json.JSONDecodeError as err:
        raise ManifestError(f"{where}: not valid JSON ({err.msg})") from None
    if not isinstance(item, dict):
        raise ManifestError(f"{where}: a line must be a JSON object")
    return item


def _parse_line(raw: str, where: str, base: Path, require_audio: bool) -> Utterance:
    item = json_object(raw, where)

    def fail(name: str, why: str) -> ManifestError:
        return ManifestError(f"{where}: field '{name}' {why}")

    if "id" not in item:
        raise fail("id", "is missing")
    if "text" not in item:
        raise fail("text", "is missing")
    text = item["text"]
    if not isinstance(text, str) or not text.strip():
        raise fail("text", "must be a non-empty string")
    audio = item.get("audio", item.get("audio_filepath"))
    if audio is None and require_audio:
        raise fail("audio", "is missing (speech manifests need it; 'audio_filepath' is accepted too)")
    if audio is not None and not isinstance(audio, str):
        raise fail("audio", "must be a path string")
    duration = item.get("duration")
    if duration is not None and (not isinstance(duration, (int, float)) or duration < 0):
        raise fail("duration", "must be a non-negative number of seconds")
    for name in ("target", "task", "speaker"):
        if item.get(name) is not None and not isinstance(item[name], str):
            raise fail(name, "must be a string")
    words = item.get("words")
    if words is not None:
        ok = isinstance(words, list) and all(
            isinstance(w, dict) and isinstance(w.get("w"), str)
            and isinstance(w.get("start"), (int, float)) and isinstance(w.get("end"), (int, float))
            for w in words
        )
        if not ok:
            raise fail("words", 'must be a list of {"w": str, "start": s, "end": s}')
    return Utterance(
        id=str(item["id"]), text=text, audio=(base / audio) if audio is not None else None,
        duration=float(duration) if duration is not None else None, target=item.get("target"),
        task=item.get("task"), speaker=item.get("speaker"), words=words,
        meta={k: v for k, v in item.items() if k not in _KNOWN},
    )


def load_manifest(path: str | Path, require_audio: bool = False) -> list[Utterance]:
    """Every line of a JSONL manifest, validated; or every item of a source string of another format."""
    if isinstance(path, str):
        from speechllm.sources import is_source_string, open_source

        if is_source_string(path):
            return open_source(path).items(require_audio)
    path = Path(path)
    if not path.is_file():
        raise ManifestError(f"manifest not found: {path}")
    items, seen = [], {}
    with path.open(encoding="utf-8") as f:
        for lineno, raw in enumerate(f, start=1):
            if not raw.strip():
                continue
            where = f"{path}:{lineno}"
            utt = _parse_line(raw, where, path.parent, require_audio)
            if utt.id in seen:
                raise ManifestError(f"{where}: field 'id' repeats {utt.id!r} (first on line {seen[utt.id]})")
            seen[utt.id] = lineno
            items.append(utt)
    if not items:
        raise ManifestError(f"{path}: manifest is empty")
    return items


def manifest_text(rows: list[dict[str, Any]]) -> str:
    """The JSONL text of ``rows``, exactly as ``write_manifest`` writes it."""
    return "".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows)


def write_manifest(path: str | Path, rows: list[dict[str, Any]]) -> None:
    """Write JSONL atomically (a killed writer never leaves half a manifest)."""
    with atomic_open(path, "w") as f:
        f.write(manifest_text(rows))


def load_audio(path: Path | AudioRef, sample_rate: int) -> torch.Tensor:
    """Mono float32 waveform at ``sample_rate``; a clear error for unreadable or mismatched files.

    A file path (our manifests) must already be at ``sample_rate``; an :class:`AudioRef` is decoded at
    its own rate and resampled (``speechllm.tts.resample``, a windowed sinc in torch)."""
    try:
        what = path.open() if isinstance(path, AudioRef) else str(path)
        if isinstance(what, tuple):
            data, rate = np.asarray(what[0], dtype=np.float32), int(what[1])
            data = data[:, None] if data.ndim == 1 else data
        else:
            data, rate = sf.read(what if isinstance(what, io.BytesIO) else str(what), dtype="float32", always_2d=True)
    except Exception as err:
        raise ManifestError(f"cannot read audio {path}: {err}") from None
    mono = torch.from_numpy(np.ascontiguousarray(data.mean(axis=1)))
    if rate == sample_rate:
        return mono
    if not isinstance(path, AudioRef):
        raise ManifestError(f"{path}: sample rate {rate} Hz, expected {sample_rate} Hz (resample the data first)")
    from speechllm.tts import resample

    return resample(mono, rate, sample_rate).contiguous()


_TASU_TARGET = re.compile(r"[^A-Za-z\s.,!?']+")


def normalize_target(text: str, how: str) -> str:
    """Training-target normalisation: ``tasu`` keeps [A-Za-z whitespace .,!?'] and lowercases."""
    if how == "tasu":
        return " ".join(_TASU_TARGET.sub("", text).lower().split())
    if how == "none":
        return text.strip()
    raise ValueError(f"unknown data.target_normalization {how!r} (tasu | none)")
