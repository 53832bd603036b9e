"""``python -m stages prepare common-voice``: a Common Voice release -> one manifest per split.

The release's layout (commonvoice.mozilla.org, one language folder such as ``cv-corpus-*/en``)::

    <root>/<split>.tsv     train, dev, test (also validated, other, invalidated): a header line, then one
                           clip a line, tab-separated: client_id, path, sentence, up_votes, down_votes,
                           age, gender, accent(s), locale, segment, ... (read from the header)
    <root>/clips/<path>    the clip, MP3 (48 kHz in current releases)

writes ``<out>/<split>.jsonl``: ``id`` (the clip's name without its extension), ``audio`` relative to
the manifest, ``duration``, ``text`` (``sentence``), ``speaker`` (``client_id``), and the
non-empty demographic columns (age, gender, accent/accents, locale, ...). A missing clip, an empty
sentence or a short line is an error naming the TSV file and line.

MP3: this soundfile (libsndfile >= 1.1) reads MP3, so by default the manifests keep the MP3 paths.
The stages skip clips whose sample rate is not ``model.encoder.sample_rate`` (16 kHz for every
shipped preset), and Common Voice is 48 kHz: ``--resample 16000`` decodes each clip once and writes
``<out>/clips-16000/<id>.flac`` (kept across runs), and the manifests point at those.

A manifest is rewritten only when its content changes: a second run writes nothing.
"""

from __future__ import annotations

import argparse
import csv
from collections import Counter
from pathlib import Path

import soundfile as sf
from tqdm import tqdm

from speechllm.tts import resample
from stages.corpus_io import CorpusError, audio_info, relative_audio, write_audio, write_if_changed

REQUIRED_COLUMNS = ("path", "sentence")
# Kept in the manifest when non-empty (a release has some of them).
META_COLUMNS = ("age", "gender", "accent", "accents", "variant", "locale", "segment", "up_votes", "down_votes")


def read_tsv(path: Path) -> tuple[list[str], list[tuple[int, dict[str, str]]]]:
    """The header and ``(line number, row)`` of a Common Voice TSV (no quoting: sentences hold quotes)."""
    if not path.is_file():
        raise CorpusError(f"{path}: TSV file does not exist")
    with path.open(encoding="utf-8", newline="") as f:
        reader = csv.reader(f, delimiter="\t", quoting=csv.QUOTE_NONE)
        header = next(reader, None)
        if header is None:
            raise CorpusError(f"{path}:1: empty file (expected a header line)")
        missing = [c for c in REQUIRED_COLUMNS if c not in header]
        if missing:
            raise CorpusError(f"{path}:1: header has no column {missing[0]!r} (columns: {', '.join(header)})")
        rows = []
        for lineno, fields in enumerate(reader, start=2):
            if not fields or fields == [""]:
                continue
            if len(fields) < len(header):
                raise CorpusError(f"{path}:{lineno}: {len(fields)} fields, the header has {len(header)}")
            rows.append((lineno, dict(zip(header, fields))))
    return header, rows


def split_rows(root: Path, split: str, manifest: Path, resample_to: int) -> tuple[list[dict], Counter]:
    tsv = root / f"{split}.tsv"
    _, lines = read_tsv(tsv)
    rows, rates = [], Counter()
    for lineno, line in tqdm(lines, desc=split, unit="clip"):
        where = f"{tsv}:{lineno}"
        text = " ".join(line["sentence"].split())
        if not text:
            raise CorpusError(f"{where}: field 'sentence' is empty (clip {line['path']!r})")
        clip = root / "clips" / line["path"]
        info = audio_info(clip, where)
        rates[info.samplerate] += 1
        audio, duration = clip, info.frames / info.samplerate
        if resample_to and info.samplerate != resample_to:
            audio = manifest.parent / f"clips-{resample_to}" / f"{clip.stem}.flac"
            if not audio.is_file():
                wav, rate = sf.read(str(clip), dtype="float32", always_2d=True)
                write_audio(audio, resample(wav.mean(axis=1), rate, resample_to), resample_to)
            duration = sf.info(str(audio)).duration
        row = {"id": clip.stem, "audio": relative_audio(audio, manifest), "duration": round(duration, 4),
               "text": text}
        if line.get("client_id"):
            row["speaker"] = line["client_id"]
        row.update({c: line[c] for c in META_COLUMNS if line.get(c)})
        rows.append(row)
    return rows, rates


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--root", required=True, type=Path,
                        help="a Common Voice language folder (holding train.tsv, dev.tsv, test.tsv, clips/)")
    parser.add_argument("--out", required=True, type=Path, help="output folder: <split>.jsonl")
    parser.add_argument("--splits", nargs="+", default=["train", "dev", "test"],
                        help="TSV files to read, without .tsv (default: %(default)s)")
    parser.add_argument("--resample", type=int, default=0, metavar="HZ",
                        help="write clips at another rate as <out>/clips-HZ/<id>.flac and point at those "
                             "(the stages need model.encoder.sample_rate, 16000); 0 = keep the MP3 paths")
    parser.add_argument("--expect-rate", type=int, default=16000,
                        help="warn when kept clips are at another rate than this (default: %(default)s)")


def run(args: argparse.Namespace) -> int:
    if not args.root.is_dir():
        raise CorpusError(f"{args.root}: Common Voice folder does not exist")
    for split in args.splits:
        path = args.out / f"{split}.jsonl"
        rows, rates = split_rows(args.root, split, path, args.resample)
        changed = write_if_changed(path, rows)
        hours = sum(r["duration"] for r in rows) / 3600
        print(f"{path}: {len(rows)} clips, {hours:.2f} h ({'written' if changed else 'unchanged'})")
        other = {r: n for r, n in rates.items() if r != args.expect_rate}
        if other and not args.resample:
            print(f"warning: {sum(other.values())} clips of {split} are at {sorted(other)} Hz, not {args.expect_rate}: "
                  f"the stages skip them; run again with --resample {args.expect_rate}")
    return 0
