"""``python -m stages prepare librispeech``: LibriSpeech folders and its LM text -> our manifests.

The real layout (openslr.org/12), under ``--root`` (the ``LibriSpeech`` folder, or the folder holding it)::

    <subset>/<speaker>/<chapter>/<speaker>-<chapter>.trans.txt   one "<utterance id> <TRANSCRIPT>" a line
    <subset>/<speaker>/<chapter>/<speaker>-<chapter>-<utt>.flac  16 kHz

writes ``<out>/<subset>.jsonl`` for each subset (``id``, ``audio`` relative to the manifest,
``duration``, ``text`` as LibriSpeech writes it, upper case; ``speaker``, ``chapter``), and
``--combine train-960=train-clean-100,train-clean-360,train-other-500`` writes the union of subsets as
one more manifest. A chapter without its transcript file, a transcript line without its flac, or a
flac without a transcript line is an error naming the file (and the line).

``--lm-text librispeech-lm-norm.txt[.gz]`` (openslr.org/11: one normalised sentence a line) writes a
text-only manifest (``<out>/lm-text.jsonl``: ``id`` = ``lm-<line number>``, ``text``) for text-only
alignment: every sentence that appears in a dev or test transcript under ``--root`` is left out, then
``--lm-max-sentences`` are drawn uniformly with ``--lm-seed`` (one pass, in file order).

A manifest is rewritten only when its content changes: a second run writes nothing.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from tqdm import tqdm

from stages.corpus_io import (
    CorpusError,
    audio_info,
    iter_lines,
    normalise_sentence,
    relative_audio,
    reservoir_sample,
    write_if_changed,
)

SUBSETS = ("train-clean-100", "train-clean-360", "train-other-500", "dev-clean", "dev-other", "test-clean", "test-other")
HELDOUT_PREFIXES = ("dev-", "test-")


def find_root(root: Path) -> Path:
    """``root`` itself, or its ``LibriSpeech`` folder (the archives unpack into one)."""
    if (root / "LibriSpeech").is_dir() and not any((root / s).is_dir() for s in SUBSETS):
        return root / "LibriSpeech"
    return root


def read_transcripts(trans: Path) -> list[tuple[int, str, str]]:
    """``(line number, utterance id, transcript)`` of a ``*.trans.txt`` file."""
    prefix = trans.name[: -len(".trans.txt")] + "-"
    out = []
    for lineno, line in iter_lines(trans):
        if not line.strip():
            continue
        utt, _, text = line.strip().partition(" ")
        if not text.strip():
            raise CorpusError(f"{trans}:{lineno}: expected '<utterance id> <transcript>', got {line!r}")
        if not utt.startswith(prefix):
            raise CorpusError(f"{trans}:{lineno}: utterance id {utt!r} does not start with {prefix!r}")
        out.append((lineno, utt, text.strip()))
    return out


def chapter_rows(chapter: Path, manifest: Path) -> list[dict]:
    speaker, chap = chapter.parent.name, chapter.name
    trans = chapter / f"{speaker}-{chap}.trans.txt"
    flacs = {p.stem: p for p in chapter.glob("*.flac")}
    if not trans.is_file():
        raise CorpusError(f"{trans}: transcript file is missing (the chapter has {len(flacs)} flac files)")
    rows, seen = [], set()
    for lineno, utt, text in read_transcripts(trans):
        info = audio_info(chapter / f"{utt}.flac", f"{trans}:{lineno}")
        seen.add(utt)
        rows.append({"id": utt, "audio": relative_audio(chapter / f"{utt}.flac", manifest),
                     "duration": round(info.frames / info.samplerate, 4), "text": text,
                     "speaker": speaker, "chapter": chap})
    orphans = sorted(set(flacs) - seen)
    if orphans:
        raise CorpusError(f"{flacs[orphans[0]]}: no transcript line for {orphans[0]!r} in {trans}"
                          + (f" (and {len(orphans) - 1} more flac files)" if len(orphans) > 1 else ""))
    return rows


def subset_rows(subset: Path, manifest: Path) -> list[dict]:
    """Every utterance of a subset folder, in id order."""
    chapters = sorted(c for c in subset.glob("*/*") if c.is_dir())
    if not chapters:
        raise CorpusError(f"{subset}: no <speaker>/<chapter> folders (is this a LibriSpeech subset?)")
    rows = []
    for chapter in tqdm(chapters, desc=subset.name, unit="chapter"):
        rows += chapter_rows(chapter, manifest)
    return sorted(rows, key=lambda r: r["id"])


def heldout_sentences(root: Path) -> set[str]:
    """The normalised transcripts of every dev and test subset under ``root``."""
    out = set()
    for subset in sorted(p for p in root.iterdir() if p.is_dir() and p.name.startswith(HELDOUT_PREFIXES)):
        for trans in sorted(subset.glob("*/*/*.trans.txt")):
            out.update(normalise_sentence(text) for _, _, text in read_transcripts(trans))
    return out


def lm_rows(path: Path, heldout: set[str], max_sentences: int, seed: int, min_words: int, max_words: int) -> tuple[list[dict], int]:
    """The LM corpus's sentences minus ``heldout``, sampled; and how many were left out as held-out."""
    if not path.is_file():
        raise CorpusError(f"{path}: LM text file does not exist")
    excluded = 0

    def kept():
        nonlocal excluded
        for lineno, line in tqdm(iter_lines(path), desc=path.name, unit=" lines", unit_scale=True):
            words = len(line.split())
            if not words or words < min_words or (max_words and words > max_words):
                continue
            if normalise_sentence(line) in heldout:
                excluded += 1
                continue
            yield {"id": f"lm-{lineno:09d}", "text": " ".join(line.split())}

    rows = reservoir_sample(kept(), max_sentences, seed)
    return rows, excluded


def parse_combine(specs: list[str]) -> dict[str, list[str]]:
    out = {}
    for spec in specs:
        name, _, parts = spec.partition("=")
        subsets = [p for p in parts.split(",") if p]
        if not name or not subsets:
            raise CorpusError(f"--combine {spec!r}: expected NAME=SUBSET,SUBSET,...")
        out[name] = subsets
    return out


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--root", required=True, type=Path,
                        help="the LibriSpeech folder (holding train-clean-100/, dev-clean/, ...) or its parent")
    parser.add_argument("--out", required=True, type=Path, help="output folder: <subset>.jsonl, lm-text.jsonl")
    parser.add_argument("--subsets", nargs="*", default=None,
                        help=f"subsets to prepare (default: every one of {', '.join(SUBSETS)} found under --root)")
    parser.add_argument("--combine", action="append", default=[], metavar="NAME=A,B,...",
                        help="also write NAME.jsonl, the union of these subsets (e.g. "
                             "train-960=train-clean-100,train-clean-360,train-other-500); repeatable")
    parser.add_argument("--lm-text", type=Path, help="librispeech-lm-norm.txt (or .txt.gz): write a text-only manifest")
    parser.add_argument("--lm-out", default="lm-text.jsonl", help="its file name under --out (default: %(default)s)")
    parser.add_argument("--lm-max-sentences", type=int, default=0,
                        help="draw this many sentences uniformly (0 = all; the corpus has about 40 M)")
    parser.add_argument("--lm-seed", type=int, default=0, help="seed of that draw (default: %(default)s)")
    parser.add_argument("--lm-min-words", type=int, default=1, help="leave out shorter sentences (default: %(default)s)")
    parser.add_argument("--lm-max-words", type=int, default=0, help="leave out longer sentences (0 = no limit)")
    parser.add_argument("--lm-no-exclude", action="store_true",
                        help="do not leave out dev/test transcripts (needed when --root has no dev/test subsets)")


def run(args: argparse.Namespace) -> int:
    root = find_root(args.root)
    if not root.is_dir():
        raise CorpusError(f"{args.root}: LibriSpeech root folder does not exist")
    combine = parse_combine(args.combine)
    found = [s for s in SUBSETS if (root / s).is_dir()]
    subsets = found if args.subsets is None else list(args.subsets)
    for s in subsets + [p for parts in combine.values() for p in parts]:
        if not (root / s).is_dir():
            raise CorpusError(f"{root / s}: subset folder does not exist (found: {', '.join(found) or 'none'})")
    if not subsets and not args.lm_text:
        raise CorpusError(f"{root}: no LibriSpeech subset folders ({', '.join(SUBSETS)}) and no --lm-text")

    rows_of: dict[str, list[dict]] = {}
    for subset in dict.fromkeys(subsets + [p for parts in combine.values() for p in parts]):
        rows_of[subset] = subset_rows(root / subset, args.out / f"{subset}.jsonl")
    outputs = {s: rows_of[s] for s in subsets}
    outputs.update({name: [r for s in parts for r in rows_of[s]] for name, parts in combine.items()})
    for name, rows in outputs.items():
        path = args.out / f"{name}.jsonl"
        changed = write_if_changed(path, rows)
        hours = sum(r["duration"] for r in rows) / 3600
        print(f"{path}: {len(rows)} utterances, {hours:.2f} h ({'written' if changed else 'unchanged'})")

    if args.lm_text:
        heldout = set() if args.lm_no_exclude else heldout_sentences(root)
        if not heldout and not args.lm_no_exclude:
            raise CorpusError(f"{root}: no dev-*/test-* transcripts to leave out of the LM text "
                              "(add those subsets, or pass --lm-no-exclude)")
        rows, excluded = lm_rows(args.lm_text, heldout, args.lm_max_sentences, args.lm_seed,
                                 args.lm_min_words, args.lm_max_words)
        path = args.out / args.lm_out
        changed = write_if_changed(path, rows)
        print(f"{path}: {len(rows)} sentences ({excluded} left out as dev/test transcripts; "
              f"{'written' if changed else 'unchanged'})")
    return 0
