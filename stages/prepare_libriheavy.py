"""``python -m stages prepare libriheavy``: Lhotse-style cuts (LibriHeavy's ``*.jsonl[.gz]``) -> a manifest.

One cut a line, as LibriHeavy ships them (github.com/k2-fsa/libriheavy)::

    {"id": ..., "start": 612.24, "duration": 16.96,
     "supervisions": [{"text": ..., "speaker": ..., "custom": {"texts": ["Original, cased.", "NORMALISED"]}}],
     "recording": {"sources": [{"type": "file", "source": "download/librilight/.../x.flac"}], "sampling_rate": 16000}}

The text is ``supervisions[*].custom.texts[--text-index]`` (LibriHeavy: 0 = punctuated and cased, 1 =
upper-case normalised), else ``supervisions[*].text``; several supervisions are joined in order.
Source paths are relative to ``--audio-root`` (default: the cuts file's folder).

Our manifests have no offset field: a line is a whole audio file. So a cut that is a segment of a
longer recording (LibriHeavy's are: 10-30 s out of hour-long LibriLight chapters) is written once as
its own clip, ``<out folder>/<out stem>-audio/<cut id>.flac``, at the recording's rate (kept across
runs); a cut that spans its whole recording points at the recording itself. Word times (needed by
interleaved distillation) come afterwards from ``python -m stages prepare word-times``.

A missing field, a source that is not a file, or a missing recording is an error naming the cuts
file and line. A manifest is rewritten only when its content changes: a second run writes nothing.
"""

from __future__ import annotations

import argparse
import re
from pathlib import Path
from typing import Any

import soundfile as sf
from tqdm import tqdm

from stages.corpus_io import (
    CorpusError,
    audio_info,
    iter_json_lines,
    relative_audio,
    write_audio,
    write_if_changed,
)

# A cut that starts at 0 and lasts as long as its recording (within a sample) is the recording itself.
_WHOLE_TOLERANCE_S = 1e-3
_UNSAFE = re.compile(r"[^A-Za-z0-9._-]+")


def cut_text(cut: dict[str, Any], where: str, text_index: int) -> str:
    sups = cut.get("supervisions")
    if not isinstance(sups, list) or not sups:
        raise CorpusError(f"{where}: field 'supervisions' is missing or empty")
    texts = []
    for i, sup in enumerate(sups):
        custom = (sup.get("custom") or {}).get("texts")
        if isinstance(custom, list) and len(custom) > text_index and isinstance(custom[text_index], str):
            text = custom[text_index]
        elif isinstance(sup.get("text"), str):
            text = sup["text"]
        else:
            raise CorpusError(f"{where}: supervisions[{i}] has neither custom.texts[{text_index}] nor text")
        texts.append(" ".join(text.split()))
    text = " ".join(t for t in texts if t)
    if not text:
        raise CorpusError(f"{where}: the supervisions' text is empty")
    return text


def cut_source(cut: dict[str, Any], where: str, audio_root: Path) -> Path:
    rec = cut.get("recording")
    sources = rec.get("sources") if isinstance(rec, dict) else None
    if not isinstance(sources, list) or not sources:
        raise CorpusError(f"{where}: field 'recording.sources' is missing or empty")
    if len(sources) > 1:
        raise CorpusError(f"{where}: a recording with {len(sources)} sources (one file per channel) is not supported")
    src = sources[0]
    if src.get("type", "file") != "file" or not isinstance(src.get("source"), str):
        raise CorpusError(f"{where}: recording source of type {src.get('type')!r}; only 'file' sources are supported")
    path = Path(src["source"])
    return path if path.is_absolute() else audio_root / path


def cut_row(cut: dict[str, Any], where: str, manifest: Path, audio_dir: Path, audio_root: Path,
            text_index: int) -> dict[str, Any]:
    for name in ("id", "start", "duration"):
        if name not in cut:
            raise CorpusError(f"{where}: field {name!r} is missing")
    start, duration = float(cut["start"]), float(cut["duration"])
    if duration <= 0 or start < 0:
        raise CorpusError(f"{where}: start {start} / duration {duration} must be >= 0 / > 0")
    text = cut_text(cut, where, text_index)
    source = cut_source(cut, where, audio_root)
    info = audio_info(source, where)
    rate = info.samplerate
    if start + duration > info.duration + _WHOLE_TOLERANCE_S:
        raise CorpusError(f"{where}: cut [{start}, {start + duration}] s runs past the end of {source} ({info.duration:.3f} s)")
    if start <= _WHOLE_TOLERANCE_S and abs(duration - info.duration) <= _WHOLE_TOLERANCE_S:
        audio = source
    else:
        audio = audio_dir / f"{_UNSAFE.sub('_', str(cut['id']))}.flac"
        if not audio.is_file():
            first, frames = round(start * rate), round(duration * rate)
            wav, _ = sf.read(str(source), start=first, frames=frames, dtype="float32", always_2d=True)
            write_audio(audio, wav.mean(axis=1), rate)
    row = {"id": str(cut["id"]), "audio": relative_audio(audio, manifest), "duration": round(duration, 4), "text": text}
    speaker = cut["supervisions"][0].get("speaker")
    if isinstance(speaker, str) and speaker:
        row["speaker"] = speaker
    return row


def cuts_rows(cuts: Path, manifest: Path, audio_dir: Path, audio_root: Path, text_index: int) -> list[dict]:
    if not cuts.is_file():
        raise CorpusError(f"{cuts}: cuts file does not exist")
    rows, seen = [], {}
    for lineno, where, cut in tqdm(iter_json_lines(cuts), desc=cuts.name, unit="cut"):
        row = cut_row(cut, where, manifest, audio_dir, audio_root, text_index)
        if row["id"] in seen:
            raise CorpusError(f"{where}: cut id {row['id']!r} repeats (first on line {seen[row['id']]})")
        seen[row["id"]] = lineno
        rows.append(row)
    return rows


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--cuts", required=True, type=Path, help="Lhotse cuts, one JSON a line (.jsonl or .jsonl.gz)")
    parser.add_argument("--out", required=True, type=Path, help="the manifest to write, e.g. data/libriheavy/small.jsonl")
    parser.add_argument("--audio-root", type=Path,
                        help="folder the recordings' source paths are relative to (default: the cuts file's folder)")
    parser.add_argument("--audio-dir", type=Path,
                        help="where segment clips are written (default: <out folder>/<out stem>-audio)")
    parser.add_argument("--text-index", type=int, default=0,
                        help="which of custom.texts to take (LibriHeavy: 0 = punctuated and cased, 1 = normalised; "
                             "default: %(default)s)")


def run(args: argparse.Namespace) -> int:
    audio_root = args.audio_root or args.cuts.parent
    audio_dir = args.audio_dir or args.out.parent / f"{args.out.name.split('.')[0]}-audio"
    rows = cuts_rows(args.cuts, args.out, audio_dir, audio_root, args.text_index)
    changed = write_if_changed(args.out, rows)
    hours = sum(r["duration"] for r in rows) / 3600
    print(f"{args.out}: {len(rows)} cuts, {hours:.2f} h ({'written' if changed else 'unchanged'})")
    return 0
