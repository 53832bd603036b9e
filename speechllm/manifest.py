"""JSONL manifests, validated on load: a bad line names the file, the line number and the field.

One utterance a line: ``id``, ``audio`` (path relative to the manifest; NeMo's ``audio_filepath``
is accepted), ``duration``, ``text``, optional ``target``, ``task``, ``speaker``, ``words``
(``[{"w", "start", "end"}]``). Text-only corpora need only ``id`` and ``text``.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import soundfile as sf
import torch

from speechllm.io import atomic_open


class ManifestError(ValueError):
    """A manifest line that does not follow the contract."""


@dataclass
class Utterance:
    id: str
    text: str
    audio: Path | None = None
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


def _parse_line(raw: str, where: str, base: Path, require_audio: bool) -> Utterance:
    try:
        item = json.loads(raw)
    except json.JSONDecodeError as err:
        raise ManifestError(f"{where}: not valid JSON ({err.msg})") from None
    if not isinstance(item, dict):
        raise ManifestError(f"{where}: a line must be a JSON object")

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


def write_manifest(path: str | Path, rows: list[dict[str, Any]]) -> None:
    """Write JSONL atomically (a killed writer never leaves half a manifest)."""
    with atomic_open(path, "w") as f:
        for row in rows:
            f.write(json.dumps(row, ensure_ascii=False) + "\n")


def load_audio(path: Path, sample_rate: int) -> torch.Tensor:
    """Mono float32 waveform at ``sample_rate``; a clear error for unreadable or mismatched files."""
    try:
        data, rate = sf.read(str(path), dtype="float32", always_2d=True)
    except Exception as err:
        raise ManifestError(f"cannot read audio {path}: {err}") from None
    if rate != sample_rate:
        raise ManifestError(f"{path}: sample rate {rate} Hz, expected {sample_rate} Hz (resample the data first)")
    return torch.from_numpy(np.ascontiguousarray(data.mean(axis=1)))


_TASU_TARGET = re.compile(r"[^A-Za-z\s.,!?']+")


def normalize_target(text: str, how: str) -> str:
    """Training-target normalisation: ``tasu`` keeps [A-Za-z whitespace .,!?'] and lowercases."""
    if how == "tasu":
        return " ".join(_TASU_TARGET.sub("", text).lower().split())
    if how == "none":
        return text.strip()
    raise ValueError(f"unknown data.target_normalization {how!r} (tasu | none)")
