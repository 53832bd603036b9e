"""Prepare the demo corpus: fortunes text plus speech synthesised with offline TTS voices.

Outputs under ``out_dir``::

    text/train.jsonl                       {"id", "text", "topic"}  (text-only corpus)
    speech/{train,dev,test}.jsonl          {"id", "audio", "duration", "text", "speaker", "topic"}
    speech/wav/<split>/<id>.wav            16 kHz, 16-bit PCM mono
    summary.json

Texts are split into train/dev/test by a seeded hash of their normalised form, so a sentence (or a
near-duplicate differing only in case and punctuation) lands in one split only. dev/test speech
uses held-out voices never heard in training. An item's id hashes its text and voice, so a wav on
disk is always the right one: re-runs skip finished wavs, and a killed run resumes where it stopped.

    python -m stages.prepare_demo_data data/demo [--scale demo|full] [--seed 0] [--workers 2]
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import os
import random
import re
import time
from collections import Counter
from collections.abc import Callable, Iterable
from concurrent.futures import FIRST_COMPLETED, Future, ProcessPoolExecutor, wait
from dataclasses import dataclass
from multiprocessing import get_context
from pathlib import Path

import soundfile as sf
from tqdm import tqdm

from speechllm.tts import (
    SAMPLE_RATE,
    TTSUnavailableError,
    TTSVoice,
    get_voice,
    normalize_text,
    synthesize_to_file,
)

log = logging.getLogger(__name__)

FORTUNES_DIR = Path("/usr/share/games/fortunes")
TRAIN_VOICES = (
    "espeak-ng:en-us",
    "espeak-ng:en-us+m3",
    "espeak-ng:en-us+f2",
    "espeak-ng:en-gb",
    "flite:kal16",
    "flite:awb",
    "flite:rms",
    "festival:kal",
)
HELDOUT_VOICES = ("flite:slt", "festival:slt-hts")
SCALES = {
    "demo": {"train": 1500, "dev": 100, "test": 100},
    "full": {"train": 6000, "dev": 200, "test": 300},
}
SPLITS = ("train", "dev", "test")

# Plain prose only: brackets, slashes, '@', '$', '*' ... mark code, IRC logs or ASCII art, which TTS
# reads badly (espeak-ng even takes "[[...]]" as phoneme input).
_SPEAKABLE = re.compile(r"[A-Za-z0-9 .,;:!?'\"()\-]+")


@dataclass(frozen=True)
class Entry:
    text: str
    topic: str

    @property
    def key(self) -> str:
        """Case- and punctuation-blind form: what dedup and the split hash look at."""
        return " ".join(re.sub(r"[^a-z0-9]+", " ", self.text.lower()).split())

    @property
    def n_words(self) -> int:
        return len(self.text.split())


@dataclass(frozen=True)
class Item:
    """One clip to synthesise."""

    id: str
    split: str
    entry: Entry
    speaker: str

    @property
    def audio(self) -> str:
        """The wav's path relative to the manifests' folder."""
        return f"wav/{self.split}/{self.id}.wav"


def clean_fortune(raw: str) -> str | None:
    """One fortune as a single line of speakable text, or None if it is not plain prose."""
    lines = []
    for line in raw.splitlines():
        # an attribution ("\t\t-- Mark Twain") ends the quote and may wrap: drop it and the rest
        if line.lstrip().startswith("--"):
            break
        lines.append(line)
    text = normalize_text(" ".join(lines))
    if not text or not _SPEAKABLE.fullmatch(text) or not re.search(r"[A-Za-z]", text):
        return None
    return text


def read_fortunes(folder: Path = FORTUNES_DIR, topics: Iterable[str] | None = None) -> list[Entry]:
    """Clean, deduplicated fortunes from every topic file in ``folder`` (or only ``topics``)."""
    folder = Path(folder)
    if not folder.is_dir():
        raise FileNotFoundError(
            f"no fortunes at {folder}: run `apt-get install fortunes` (or `fortunes-min`) as root"
        )
    # topic files have no extension; .dat are indexes and .u8 symlinks to the same text
    files = sorted(
        p for p in folder.iterdir() if p.is_file() and not p.is_symlink() and "." not in p.name
    )
    if topics is not None:
        wanted = set(topics)
        files = [p for p in files if p.name in wanted]
        if missing := wanted - {p.name for p in files}:
            raise FileNotFoundError(f"fortune topics not found in {folder}: {sorted(missing)}")
    entries, seen = [], set()
    for path in files:
        raw = path.read_text(encoding="utf-8", errors="replace")
        for chunk in re.split(r"^%$", raw, flags=re.MULTILINE):
            text = clean_fortune(chunk)
            if text is None:
                continue
            entry = Entry(text, path.name)
            if entry.key not in seen:
                seen.add(entry.key)
                entries.append(entry)
    if not entries:
        raise RuntimeError(f"no usable fortunes in {folder}")
    return entries


def split_of(entry: Entry, seed: int, dev_fraction: float, test_fraction: float) -> str:
    """train/dev/test from a seeded hash of the normalised text: stable whatever else changes."""
    digest = hashlib.sha256(f"{seed}\n{entry.key}".encode()).digest()
    u = int.from_bytes(digest[:8], "big") / 2**64
    return "test" if u < test_fraction else "dev" if u < test_fraction + dev_fraction else "train"


def _resolve_voices(specs: Iterable[str], role: str) -> list[str]:
    """The specs whose engine and voice are installed here; warn about the others."""
    specs, found = list(specs), []
    for spec in specs:
        try:
            found.append(get_voice(spec).name)
        except TTSUnavailableError as err:
            log.warning("skipping %s voice %s: %s", role, spec, err)
    if not found:
        raise RuntimeError(f"no {role} voice is available (tried {specs}); see the warnings above")
    return found


def _existing_duration(path: Path) -> float | None:
    """Duration of a finished wav, or None if it is missing or not a valid 16 kHz mono file."""
    try:
        info = sf.info(path)
    except sf.SoundFileError:  # missing or not a sound file
        return None
    if info.samplerate != SAMPLE_RATE or info.channels != 1 or info.frames == 0:
        return None
    return info.frames / info.samplerate


_worker_voices: dict[str, TTSVoice] = {}


def _init_worker() -> None:
    import torch

    torch.set_num_threads(1)  # one process per core already; threads would only contend


def _synthesize(speaker: str, text: str, path: str) -> float:
    """Runs in a worker: build each voice once per process, then synthesise one clip."""
    if speaker not in _worker_voices:
        _worker_voices[speaker] = get_voice(speaker)
    try:
        return synthesize_to_file(_worker_voices[speaker], text, path)
    except Exception as err:  # name the clip: the traceback from a worker process does not
        raise RuntimeError(f"{speaker} failed on {text!r}: {err}") from err


def _write_atomic(path: Path, text: str) -> None:
    """Write, then rename: readers (and resumed runs) never see a half-written file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".part")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)


def _write_jsonl(path: Path, rows: Iterable[dict]) -> None:
    _write_atomic(path, "".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows))


def _plan_split(
    split: str, candidates: list[Entry], n: int, voices: list[str], seed: int
) -> list[Item]:
    """Pick ``n`` entries at random and deal the voices out in turn: equal shares per voice."""
    if n > len(candidates):
        log.warning(
            "%s: asked for %d clips but only %d texts qualify; using %d",
            split,
            n,
            len(candidates),
            len(candidates),
        )
        n = len(candidates)
    chosen = random.Random(f"{seed}/{split}").sample(candidates, n)
    items = []
    for i, entry in enumerate(chosen):
        speaker = voices[i % len(voices)]
        digest = hashlib.sha1(f"{speaker}\n{entry.text}".encode()).hexdigest()[:12]
        items.append(Item(f"{split}-{digest}", split, entry, speaker))
    return items


def _synthesize_split(
    items: list[Item],
    speech_dir: Path,
    workers: int,
    progress: bool,
    on_item: Callable[[Item], None] | None,
) -> tuple[dict[str, float], int]:
    """Durations of every item's wav, synthesising those not on disk yet; also how many were new."""
    durations: dict[str, float] = {}
    todo = []
    for item in items:
        duration = _existing_duration(speech_dir / item.audio)
        if duration is None:
            todo.append(item)
        else:
            durations[item.id] = duration
    if not todo:
        return durations, 0
    bar = tqdm(total=len(todo), desc=f"tts {items[0].split}", unit="clip", disable=not progress)

    def done(item: Item, duration: float) -> None:
        durations[item.id] = duration
        bar.update()
        if on_item is not None:
            on_item(item)

    try:
        if workers <= 1:  # in this process: simplest to debug, and what the tests patch
            for item in todo:
                done(item, _synthesize(item.speaker, item.entry.text, str(speech_dir / item.audio)))
        else:
            # spawn, not fork: forking a process that has run torch's OpenMP threads can hang the child
            pool = ProcessPoolExecutor(
                workers, mp_context=get_context("spawn"), initializer=_init_worker
            )
            try:
                futures: dict[Future, Item] = {
                    pool.submit(
                        _synthesize, it.speaker, it.entry.text, str(speech_dir / it.audio)
                    ): it
                    for it in todo
                }
                pending = set(futures)
                while pending:
                    finished, pending = wait(pending, return_when=FIRST_COMPLETED)
                    for future in finished:
                        done(futures[future], future.result())
            finally:
                # on an error or Ctrl-C stop at once: queued clips would only be redone on resume
                pool.shutdown(wait=True, cancel_futures=True)
    finally:
        bar.close()
    return durations, len(todo)


def prepare_demo_data(
    out_dir: str | Path,
    *,
    scale: str = "demo",
    seed: int = 0,
    workers: int = 2,
    n_train: int | None = None,
    n_dev: int | None = None,
    n_test: int | None = None,
    train_voices: Iterable[str] = TRAIN_VOICES,
    heldout_voices: Iterable[str] = HELDOUT_VOICES,
    fortunes_dir: str | Path = FORTUNES_DIR,
    topics: Iterable[str] | None = None,
    speech_words: tuple[int, int] = (4, 30),
    text_words: tuple[int, int] = (3, 60),
    dev_fraction: float = 0.05,
    test_fraction: float = 0.05,
    progress: bool = True,
    on_item: Callable[[Item], None] | None = None,
) -> dict:
    """Build the demo corpus under ``out_dir`` (see the module docstring) and return its summary.

    ``scale`` picks the clip counts (``SCALES``); ``n_train``/``n_dev``/``n_test`` override them.
    ``speech_words`` and ``text_words`` are inclusive word-count ranges for the spoken clips and for
    the text-only corpus. ``workers`` processes synthesise in parallel (1: in this process).
    ``on_item`` is called after each newly synthesised clip.
    """
    start = time.perf_counter()
    out_dir = Path(out_dir)
    if scale not in SCALES:
        raise ValueError(f"unknown scale {scale!r}; choose from {sorted(SCALES)}")
    counts = {**SCALES[scale]}
    counts.update(
        {k: v for k, v in (("train", n_train), ("dev", n_dev), ("test", n_test)) if v is not None}
    )

    voices = {"train": _resolve_voices(train_voices, "training")}
    voices["dev"] = voices["test"] = _resolve_voices(heldout_voices, "held-out")
    # compared after resolving, as canonical names: "espeak-ng:en-us,speed=175" is "espeak-ng:en-us"
    if overlap := set(voices["train"]) & set(voices["test"]):
        raise ValueError(f"held-out voices must never be used for training: {sorted(overlap)}")

    entries = read_fortunes(Path(fortunes_dir), topics)
    by_split: dict[str, list[Entry]] = {split: [] for split in SPLITS}
    for entry in entries:
        by_split[split_of(entry, seed, dev_fraction, test_fraction)].append(entry)

    text_train = [e for e in by_split["train"] if text_words[0] <= e.n_words <= text_words[1]]
    _write_jsonl(
        out_dir / "text" / "train.jsonl",
        (
            {"id": f"text-{i:06d}", "text": e.text, "topic": e.topic}
            for i, e in enumerate(text_train)
        ),
    )

    speech_dir = out_dir / "speech"
    summary: dict = {
        "scale": scale,
        "seed": seed,
        "voices": {"train": voices["train"], "heldout": voices["test"]},
        "text": {"train": len(text_train), "topics": dict(Counter(e.topic for e in text_train))},
        "speech": {},
    }
    synth_seconds, n_new = 0.0, 0
    train_keys = {e.key for e in by_split["train"]}
    for split in SPLITS:
        candidates = [e for e in by_split[split] if speech_words[0] <= e.n_words <= speech_words[1]]
        items = _plan_split(split, candidates, counts[split], voices[split], seed)
        if split != "train" and any(it.entry.key in train_keys for it in items):
            raise RuntimeError(f"{split} text leaked into the training text")  # a bug: see split_of

        (speech_dir / "wav" / split).mkdir(parents=True, exist_ok=True)
        t0 = time.perf_counter()
        durations, new = _synthesize_split(items, speech_dir, workers, progress, on_item)
        if new:
            synth_seconds += time.perf_counter() - t0
            n_new += new

        _write_jsonl(
            speech_dir / f"{split}.jsonl",
            (
                {
                    "id": it.id,
                    "audio": it.audio,
                    "duration": round(durations[it.id], 4),
                    "text": it.entry.text,
                    "speaker": it.speaker,
                    "topic": it.entry.topic,
                }
                for it in items
            ),
        )
        summary["speech"][split] = {
            "clips": len(items),
            "synthesized": new,
            "hours": sum(durations.values()) / 3600,
            "voices": dict(Counter(it.speaker for it in items)),
            "topics": dict(Counter(it.entry.topic for it in items)),
        }

    summary["total_hours"] = sum(s["hours"] for s in summary["speech"].values())
    summary["synthesized"] = n_new
    summary["synthesis_clips_per_second"] = n_new / synth_seconds if n_new else None
    summary["seconds"] = time.perf_counter() - start
    _write_atomic(out_dir / "summary.json", json.dumps(summary, indent=2) + "\n")
    return summary


def print_summary(summary: dict) -> None:
    print(
        f"text: {summary['text']['train']} training texts from {len(summary['text']['topics'])} topics"
    )
    for split, s in summary["speech"].items():
        voices = ", ".join(f"{v} {n}" for v, n in s["voices"].items())
        print(f"{split}: {s['clips']} clips ({s['synthesized']} new), {s['hours']:.2f} h; {voices}")
    rate = summary["synthesis_clips_per_second"]
    print(
        f"total {summary['total_hours']:.2f} h in {summary['seconds']:.0f} s"
        + (f" ({rate:.1f} new clips/s)" if rate else "")
    )


def build_parser(parser: argparse.ArgumentParser | None = None) -> argparse.ArgumentParser:
    """The command-line options (pass a parser, e.g. a subcommand's, to add them to it)."""
    parser = parser or argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("out_dir", type=Path)
    parser.add_argument("--scale", choices=sorted(SCALES), default="demo")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--n-train", type=int)
    parser.add_argument("--n-dev", type=int)
    parser.add_argument("--n-test", type=int)
    parser.add_argument("--train-voices", nargs="+", default=list(TRAIN_VOICES), metavar="SPEC")
    parser.add_argument("--heldout-voices", nargs="+", default=list(HELDOUT_VOICES), metavar="SPEC")
    parser.add_argument("--fortunes-dir", type=Path, default=FORTUNES_DIR)
    parser.add_argument("--topics", nargs="+", help="fortune topic files to use (default: all)")
    return parser


def main(argv: list[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    summary = prepare_demo_data(
        args.out_dir,
        scale=args.scale,
        seed=args.seed,
        workers=args.workers,
        n_train=args.n_train,
        n_dev=args.n_dev,
        n_test=args.n_test,
        train_voices=args.train_voices,
        heldout_voices=args.heldout_voices,
        fortunes_dir=args.fortunes_dir,
        topics=args.topics,
    )
    print_summary(summary)


if __name__ == "__main__":
    main()
