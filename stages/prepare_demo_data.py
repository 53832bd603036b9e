"""Prepare the demo corpus: fortunes text plus speech synthesised with offline TTS voices.

Outputs under ``out_dir``::

    text/train.jsonl                   {"id", "text", "topic"}  (text-only corpus)
    speech/{train,dev,test}.jsonl      {"id", "audio", "duration", "text", "speaker", "topic"}
    speech/wav/<split>/<id>.wav        16 kHz, 16-bit PCM mono
    docs/pool.jsonl                    {"id", "text", "topic", "n_words"}  (training documents)
    docs/{train,dev,test}.jsonl        speech fields + "words" (one exact span per chunk), "doc", "topic",
                                       "n_words"
    docs/wav/<split>/<id>.wav
    mc/test.jsonl                      speech fields (the spoken context) + "topic", "options", "answer"
    mc/wav/<id>.wav
    summary.json

Texts are split into train/dev/test by a seeded hash of their normalised form, so a sentence (or a
near-duplicate differing only in case and punctuation) lands in one split only. dev/test speech
uses held-out voices never heard in training. An item's id hashes its text and voice, so a wav on
disk is always the right one: re-runs skip finished wavs, and a killed run resumes where it stopped.

``--voices demo`` (the default) deals the few ``TRAIN_VOICES`` out in turn. ``--voices varied`` gives
each training clip and document a voice of its own instead: drawn (``speechllm.tts.draw_voice``) from
every English voice installed of espeak-ng (accents x variants), flite and festival, less the held-out
voices, with a pitch shift and speaking rate of its own, all seeded by the clip's id (the seed and
its text), so a re-run draws the same; those rows also record ``voice``, ``pitch`` (semitones) and
``rate``. dev/test and the multiple-choice set are the same in both.

Documents are consecutive fortunes of one topic and one split (in a seeded order) joined into texts of
40-80 words. The training ones form the pool, the broad text pool of SALAD stage II; a sample of the
pool (and documents built the same way from dev/test fortunes) is spoken chunk by chunk (3-6 words,
seeded sizes), so each manifest row's ``words`` holds exact chunk boundaries. The multiple-choice set
is a spoken StoryCloze-like test: the first words of a test fortune are spoken, and the true rest must
be told from three rests of other test fortunes of similar length.

    python -m stages.prepare_demo_data data/demo [--scale demo|full] [--seed 0] [--workers 2]
        [--voices demo|varied]
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import random
import re
import time
from collections import Counter
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

from speechllm.io import atomic_write
from speechllm.manifest import write_manifest
from speechllm.synthesis import SynthesisItem, chunk_words, manifest_rows, synthesize_items
from speechllm.tts import (
    VARIED_ENGINES,
    TTSUnavailableError,
    VoiceDraw,
    base_spec,
    draw_voice,
    get_voice,
    normalize_text,
    voice_pool,
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
VOICE_SETS = ("demo", "varied")  # the training voices: TRAIN_VOICES in turn, or a drawn voice per clip
# clips per set: speech/<split>, docs/<split> (spoken documents) and mc/test (questions)
SCALES = {
    "demo": {
        "speech": {"train": 1500, "dev": 100, "test": 100},
        "docs": {"train": 300, "dev": 40, "test": 40},
        "mc": 60,
    },
    "full": {
        "speech": {"train": 6000, "dev": 200, "test": 300},
        "docs": {"train": 1500, "dev": 100, "test": 100},
        "mc": 200,
    },
}
SPLITS = ("train", "dev", "test")
DOC_WORDS = (40, 80)  # a document's length in words
DOC_ENTRY_WORDS = (4, 60)  # the fortunes documents are made of (at most DOC_WORDS[1] - DOC_WORDS[0])
CHUNK_WORDS = (3, 6)  # a spoken document's chunks
MC_CONTEXT_WORDS, MC_REST_WORDS, MC_OPTIONS = 5, 3, 4  # at least, at least, exactly

# Plain prose only: brackets, slashes, '@', '$', '*' ... mark code, IRC logs or ASCII art, which TTS
# reads badly (espeak-ng even takes "[[...]]" as phoneme input).
_SPEAKABLE = re.compile(r"[A-Za-z0-9 .,;:!?'\"()\-]+")

T = TypeVar("T")


def text_key(text: str) -> str:
    """Case- and punctuation-blind form of a text."""
    return " ".join(re.sub(r"[^a-z0-9]+", " ", text.lower()).split())


@dataclass(frozen=True)
class Entry:
    text: str
    topic: str

    @property
    def key(self) -> str:
        """Case- and punctuation-blind form: what dedup and the split hash look at."""
        return text_key(self.text)

    @property
    def n_words(self) -> int:
        return len(self.text.split())


@dataclass(frozen=True)
class Document:
    """Consecutive fortunes of one topic and one split, joined with spaces."""

    entries: tuple[Entry, ...]

    @property
    def text(self) -> str:
        return " ".join(e.text for e in self.entries)

    @property
    def topic(self) -> str:
        return self.entries[0].topic

    @property
    def n_words(self) -> int:
        return sum(e.n_words for e in self.entries)

    @property
    def id(self) -> str:
        return "doc-" + hashlib.sha1(self.text.encode()).hexdigest()[:12]


@dataclass(frozen=True)
class SpokenSet:
    """One manifest of synthesised speech, ``<folder>/<split>.jsonl``: its items (audio paths relative
    to the folder) and each item's extra manifest fields (at least ``topic``)."""

    folder: str
    split: str
    items: list[SynthesisItem]
    extra: dict[str, dict]


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


def _digest(*parts: str) -> str:
    return hashlib.sha1("\n".join(parts).encode()).hexdigest()[:12]


def _sample(candidates: Sequence[T], n: int, seed: str, what: str) -> list[T]:
    """``n`` of ``candidates`` at random (all of them, with a warning, when there are fewer)."""
    if n > len(candidates):
        log.warning("%s: asked for %d but only %d qualify; using %d", what, n, len(candidates), len(candidates))
        n = len(candidates)
    return random.Random(seed).sample(list(candidates), n)


VoiceDrawer = Callable[[str], VoiceDraw]


def _drawer(pools: dict[str, list[str]], seed: int) -> VoiceDrawer:
    """The voice of a clip, from its key (its text or document id), for ``--voices varied``."""
    return lambda key: draw_voice(pools, f"{seed}/{key}")


def _voice_fields(draw: VoiceDraw) -> dict:
    return {"voice": draw.voice, "pitch": draw.pitch, "rate": draw.rate}


def _plan_speech(
    split: str, candidates: list[Entry], n: int, voices: list[str], seed: int,
    drawer: VoiceDrawer | None = None,
) -> SpokenSet:  # fmt: skip
    """Pick ``n`` entries at random and deal the voices out in turn: equal shares per voice. With
    ``drawer`` each entry gets the voice drawn for ``<split>-<digest of its text>`` instead."""
    items, extra = [], {}
    for i, entry in enumerate(_sample(candidates, n, f"{seed}/{split}", f"speech {split}")):
        draw = None if drawer is None else drawer(f"{split}-{_digest(entry.text)}")
        speaker = voices[i % len(voices)] if draw is None else draw.spec
        item_id = f"{split}-{_digest(speaker, entry.text)}"
        items.append(SynthesisItem(item_id, entry.text, speaker, audio=f"wav/{split}/{item_id}.wav"))
        extra[item_id] = {"topic": entry.topic} | ({} if draw is None else _voice_fields(draw))
    return SpokenSet("speech", split, items, extra)


def build_documents(entries: list[Entry], seed: str, words: tuple[int, int] = DOC_WORDS) -> list[Document]:
    """Documents of ``words[0]``-``words[1]`` words from consecutive entries of one topic.

    Each topic's entries are shuffled (seeded by ``seed`` and the topic) and taken in turn; a document
    closes as soon as it reaches ``words[0]`` words. An entry that would push it past ``words[1]`` is a
    document on its own if it is long enough, and is left out otherwise, as is each topic's remainder.
    """
    lo, hi = words
    if too_long := [e.text for e in entries if e.n_words > hi]:
        raise ValueError(f"entries longer than a document ({hi} words): {too_long[:3]}")
    by_topic: dict[str, list[Entry]] = {}
    for entry in entries:
        by_topic.setdefault(entry.topic, []).append(entry)
    documents = []
    for topic in sorted(by_topic):
        order = by_topic[topic]
        random.Random(f"{seed}/{topic}").shuffle(order)
        current: list[Entry] = []
        for entry in order:
            n_words = sum(e.n_words for e in current)
            if n_words + entry.n_words > hi:
                if entry.n_words >= lo:
                    documents.append(Document((entry,)))
                continue
            current.append(entry)
            if n_words + entry.n_words >= lo:
                documents.append(Document(tuple(current)))
                current = []
    return documents


def _plan_docs(
    split: str, documents: list[Document], n: int, voices: list[str], seed: int,
    drawer: VoiceDrawer | None = None,
) -> SpokenSet:  # fmt: skip
    """Sample ``n`` documents and speak each chunk by chunk, dealing the voices out in turn (with
    ``drawer``: in the voice drawn for ``docs-<split>-<document id>``, one voice a document)."""
    items, extra = [], {}
    for i, doc in enumerate(_sample(documents, n, f"{seed}/docs/{split}", f"docs {split}")):
        draw = None if drawer is None else drawer(f"docs-{split}-{doc.id}")
        speaker = voices[i % len(voices)] if draw is None else draw.spec
        chunks = chunk_words(doc.text, CHUNK_WORDS, random.Random(f"{seed}/chunks/{doc.id}"))
        item_id = f"docs-{split}-{_digest(speaker, *chunks)}"
        items.append(SynthesisItem(item_id, doc.text, speaker, chunks, audio=f"wav/{split}/{item_id}.wav"))
        extra[item_id] = {"doc": doc.id, "topic": doc.topic, "n_words": doc.n_words}
        if draw is not None:
            extra[item_id] |= _voice_fields(draw)
    return SpokenSet("docs", split, items, extra)


def split_for_continuation(entry: Entry, rng: random.Random) -> tuple[str, str]:
    """(context, rest) of an entry cut at a word boundary: at least ``MC_CONTEXT_WORDS`` and
    ``MC_REST_WORDS`` words. The cut follows a sentence or clause end where one falls in range."""
    words = entry.text.split()
    cuts = list(range(MC_CONTEXT_WORDS, len(words) - MC_REST_WORDS + 1))
    if not cuts:
        raise ValueError(f"{entry.text!r} is too short to split into a context and a rest")
    natural = [k for k in cuts if words[k - 1][-1] in ".!?;:"]
    cut = rng.choice(natural or cuts)
    return " ".join(words[:cut]), " ".join(words[cut:])


def _plan_mc(entries: list[Entry], n: int, voices: list[str], seed: int) -> SpokenSet:
    """Spoken multiple-choice continuations of test ``entries``: options are the true rest and the
    rests of the ``MC_OPTIONS - 1`` other entries most like it (the same capitalisation of the first
    letter, so a sentence start gives nothing away; then the closest length; seeded ties), shuffled."""
    parts = {e: split_for_continuation(e, random.Random(f"{seed}/mc-cut/{e.key}")) for e in entries}
    if n and len(different := {text_key(rest) for _, rest in parts.values()}) < MC_OPTIONS:
        raise RuntimeError(
            f"mc: needs {MC_OPTIONS} test fortunes with different rests, found {len(different)}"
        )
    items, extra = [], {}
    for i, entry in enumerate(_sample(entries, n, f"{seed}/mc", "mc test")):
        context, rest = parts[entry]
        rng = random.Random(f"{seed}/mc-options/{entry.key}")
        others = [r for e, (_, r) in parts.items() if e != entry]
        rng.shuffle(others)
        others.sort(key=lambda r: (r[0].isupper() != rest[0].isupper(), abs(len(r.split()) - len(rest.split()))))
        options, keys = [rest], {text_key(rest)}
        for other in others:
            if len(options) == MC_OPTIONS:
                break
            if text_key(other) not in keys:
                options.append(other)
                keys.add(text_key(other))
        rng.shuffle(options)
        speaker = voices[i % len(voices)]
        item_id = f"mc-{_digest(speaker, context, rest)}"
        items.append(SynthesisItem(item_id, context, speaker))
        extra[item_id] = {"topic": entry.topic, "options": options, "answer": options.index(rest)}
    return SpokenSet("mc", "test", items, extra)


def _speak(
    out_dir: Path,
    spoken: SpokenSet,
    workers: int,
    progress: bool,
    on_item: Callable[[SynthesisItem], None] | None,
) -> dict:
    """Synthesise a set (resuming), write its manifest and return its summary."""
    new = []

    def count(item: SynthesisItem) -> None:
        new.append(item.id)
        if on_item is not None:
            on_item(item)

    start = time.perf_counter()
    results = synthesize_items(
        spoken.items, out_dir / spoken.folder, workers=workers, progress=progress, on_item=count,
        desc=f"tts {spoken.folder}/{spoken.split}",
    )  # fmt: skip
    seconds = time.perf_counter() - start
    write_manifest(
        out_dir / spoken.folder / f"{spoken.split}.jsonl", manifest_rows(spoken.items, results, spoken.extra)
    )
    return {
        "clips": len(spoken.items),
        "synthesized": len(new),
        "synthesis_seconds": seconds if new else 0.0,
        "hours": sum(r["duration"] for r in results.values()) / 3600,
        "voices": dict(Counter(spoken.extra[it.id].get("voice", it.voice) for it in spoken.items)),
        "topics": dict(Counter(spoken.extra[it.id]["topic"] for it in spoken.items)),
    }


def varied_pools(heldout: Iterable[str]) -> dict[str, list[str]]:
    """Every English voice installed here of each of ``VARIED_ENGINES`` (``speechllm.tts.voice_pool``),
    less the ``heldout`` voices (whatever their settings): the pools ``--voices varied`` draws from."""
    excluded = {base_spec(spec) for spec in heldout}
    pools = {engine: [v for v in voice_pool(engine) if v not in excluded] for engine in VARIED_ENGINES}
    for engine, pool in pools.items():
        # a voice missing here changes every draw (pools are drawn from by position): say so
        if missing := [v for v in voice_pool(engine, installed=False) if v not in pool and v not in excluded]:
            log.warning(
                "--voices varied: %d %s voice(s) not installed here, so the draws differ from a machine "
                "with them (make system-deps): %s", len(missing), engine, ", ".join(missing[:5]),
            )  # fmt: skip
    log.info("--voices varied: %s", ", ".join(f"{len(p)} {e} voices" for e, p in pools.items()))
    if not any(pools.values()):
        raise RuntimeError("--voices varied: no training voice is installed (make system-deps)")
    return pools


def prepare_demo_data(
    out_dir: str | Path,
    *,
    scale: str = "demo",
    seed: int = 0,
    workers: int = 2,
    n_train: int | None = None,
    n_dev: int | None = None,
    n_test: int | None = None,
    n_docs: tuple[int, int, int] | None = None,
    n_mc: int | None = None,
    train_voices: Iterable[str] = TRAIN_VOICES,
    heldout_voices: Iterable[str] = HELDOUT_VOICES,
    voices: str = "demo",
    fortunes_dir: str | Path = FORTUNES_DIR,
    topics: Iterable[str] | None = None,
    speech_words: tuple[int, int] = (4, 30),
    text_words: tuple[int, int] = (3, 60),
    dev_fraction: float = 0.05,
    test_fraction: float = 0.05,
    progress: bool = True,
    on_item: Callable[[SynthesisItem], None] | None = None,
) -> dict:
    """Build the demo corpus under ``out_dir`` (see the module docstring) and return its summary.

    ``scale`` picks the clip counts (``SCALES``); ``n_train``/``n_dev``/``n_test`` (speech clips),
    ``n_docs`` (spoken documents per split) and ``n_mc`` (questions) override them. ``speech_words``
    and ``text_words`` are inclusive word-count ranges for the spoken clips and for the text-only
    corpus. ``workers`` processes synthesise in parallel (1: in this process). ``on_item`` is called
    after each newly synthesised clip. ``voices="varied"`` draws each training clip's voice, pitch and
    rate (see the module docstring; ``train_voices`` is then not used).
    """
    start = time.perf_counter()
    out_dir = Path(out_dir)
    if scale not in SCALES:
        raise ValueError(f"unknown scale {scale!r}; choose from {sorted(SCALES)}")
    counts = {**SCALES[scale]["speech"]}
    counts.update(
        {k: v for k, v in (("train", n_train), ("dev", n_dev), ("test", n_test)) if v is not None}
    )
    doc_counts = dict(zip(SPLITS, n_docs, strict=True)) if n_docs is not None else SCALES[scale]["docs"]
    mc_count = n_mc if n_mc is not None else SCALES[scale]["mc"]
    if voices not in VOICE_SETS:
        raise ValueError(f"unknown voice set {voices!r}; choose from {list(VOICE_SETS)}")
    voice_set = voices
    if voice_set == "varied" and list(train_voices) != list(TRAIN_VOICES):
        raise ValueError("--train-voices is for --voices demo: --voices varied draws the training voices")

    heldout = _resolve_voices(heldout_voices, "held-out")
    pools = varied_pools(heldout) if voice_set == "varied" else None
    drawer = None if pools is None else _drawer(pools, seed)
    voices = {"train": _resolve_voices(train_voices, "training") if pools is None else [], "dev": heldout}
    voices["test"] = heldout
    # compared after resolving, as canonical names: "espeak-ng:en-us,speed=175" is "espeak-ng:en-us", and
    # without settings: "flite:slt,stretch=1.1" is the held-out "flite:slt" spoken slower
    if overlap := {base_spec(v) for v in voices["train"]} & {base_spec(v) for v in heldout}:
        raise ValueError(f"held-out voices must never be used for training: {sorted(overlap)}")

    entries = read_fortunes(Path(fortunes_dir), topics)
    by_split: dict[str, list[Entry]] = {split: [] for split in SPLITS}
    for entry in entries:
        by_split[split_of(entry, seed, dev_fraction, test_fraction)].append(entry)
    train_keys = {e.key for e in by_split["train"]}

    text_train = [e for e in by_split["train"] if text_words[0] <= e.n_words <= text_words[1]]
    write_manifest(
        out_dir / "text" / "train.jsonl",
        [{"id": f"text-{i:06d}", "text": e.text, "topic": e.topic} for i, e in enumerate(text_train)],
    )

    documents = {
        split: build_documents(
            [e for e in by_split[split] if DOC_ENTRY_WORDS[0] <= e.n_words <= DOC_ENTRY_WORDS[1]],
            f"{seed}/documents/{split}",
        )
        for split in SPLITS
    }
    pool = documents["train"]
    write_manifest(
        out_dir / "docs" / "pool.jsonl",
        [{"id": d.id, "text": d.text, "topic": d.topic, "n_words": d.n_words} for d in pool],
    )

    spoken_sets = []
    for split in SPLITS:
        candidates = [e for e in by_split[split] if speech_words[0] <= e.n_words <= speech_words[1]]
        train_drawer = drawer if split == "train" else None
        spoken_sets.append(_plan_speech(split, candidates, counts[split], voices[split], seed, train_drawer))
    # festival speaks all of a document's chunks in one process (FestivalVoice.synthesize_many), so it
    # costs about what espeak-ng does per document (~0.9 s for ~12 chunks) and stays among the voices
    for split in SPLITS:
        train_drawer = drawer if split == "train" else None
        spoken_sets.append(
            _plan_docs(split, documents[split], doc_counts[split], voices[split], seed, train_drawer)
        )
    mc_entries = [
        e for e in by_split["test"] if MC_CONTEXT_WORDS + MC_REST_WORDS <= e.n_words <= speech_words[1]
    ]
    spoken_sets.append(_plan_mc(mc_entries, mc_count, voices["test"], seed))
    # every dev/test set above draws on these entries only
    if any(e.key in train_keys for e in by_split["dev"] + by_split["test"]):
        raise RuntimeError("dev/test text leaked into the training text")  # a bug: see split_of
    # whatever pitch or rate it is spoken with, a held-out voice is never heard in training
    heldout_bases = {base_spec(v) for v in heldout}
    trained = {base_spec(it.voice) for s in spoken_sets if s.split == "train" for it in s.items}
    if leaked := trained & heldout_bases:
        raise RuntimeError(f"held-out voices drawn for training: {sorted(leaked)}")  # a bug: see varied_pools

    summary: dict = {
        "scale": scale,
        "seed": seed,
        "voices": {"train": voices["train"], "heldout": voices["test"]},
        "text": {"train": len(text_train), "topics": dict(Counter(e.topic for e in text_train))},
        "pool": {
            "documents": len(pool),
            "words": sum(d.n_words for d in pool),
            "topics": dict(Counter(d.topic for d in pool)),
        },
        "speech": {},
        "docs": {},
        "mc": {},
    }
    if pools is not None:  # only then, so that a demo summary stays as it was
        summary["voices"] = {"set": voice_set, "pools": pools, "heldout": voices["test"]}
    for spoken in spoken_sets:
        summary[spoken.folder][spoken.split] = _speak(out_dir, spoken, workers, progress, on_item)

    sets = [s for group in ("speech", "docs", "mc") for s in summary[group].values()]
    n_new, synth_seconds = sum(s["synthesized"] for s in sets), sum(s["synthesis_seconds"] for s in sets)
    summary["total_hours"] = sum(s["hours"] for s in sets)
    summary["synthesized"] = n_new
    summary["synthesis_clips_per_second"] = n_new / synth_seconds if n_new else None
    summary["seconds"] = time.perf_counter() - start
    atomic_write(out_dir / "summary.json", json.dumps(summary, indent=2) + "\n")
    return summary


def print_summary(summary: dict) -> None:
    pool = summary["pool"]
    print(
        f"text: {summary['text']['train']} training texts from {len(summary['text']['topics'])} topics; "
        f"pool: {pool['documents']} documents, {pool['words']} words"
    )
    for group in ("speech", "docs", "mc"):
        for split, s in summary[group].items():
            voices = ", ".join(f"{v} {n}" for v, n in s["voices"].items())
            if len(s["voices"]) > 12:  # --voices varied: too many to list
                engines: Counter[str] = Counter()
                for voice, n in s["voices"].items():
                    engines[voice.split(":", 1)[0]] += n
                by_engine = ", ".join(f"{e} {n}" for e, n in engines.items())
                voices = f"{len(s['voices'])} voices ({by_engine})"
            print(
                f"{group}/{split}: {s['clips']} clips ({s['synthesized']} new in "
                f"{s['synthesis_seconds']:.0f} s), {s['hours']:.2f} h; {voices}"
            )
    rate = summary["synthesis_clips_per_second"]
    print(
        f"total {summary['total_hours']:.2f} h in {summary['seconds']:.0f} s"
        + (f" ({rate:.1f} new clips/s)" if rate else "")
    )


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The options of ``python -m stages prepare demo-data``."""
    parser.add_argument("out_dir", type=Path, help="output folder (text/, speech/, docs/, mc/, summary.json)")
    parser.add_argument("--scale", choices=sorted(SCALES), default="demo",
                        help="clips per set (default: %(default)s); the --n-* options override it")
    parser.add_argument("--seed", type=int, default=0, help="seed of the splits and samples (default: %(default)s)")
    parser.add_argument("--workers", type=int, default=2, help="synthesis processes (default: %(default)s)")
    parser.add_argument("--n-train", type=int, help="training speech clips")
    parser.add_argument("--n-dev", type=int, help="dev speech clips (held-out voices)")
    parser.add_argument("--n-test", type=int, help="test speech clips (held-out voices)")
    parser.add_argument("--n-docs", type=int, nargs=3, metavar=("TRAIN", "DEV", "TEST"),
                        help="spoken documents per split")  # fmt: skip
    parser.add_argument("--n-mc", type=int, help="spoken multiple-choice questions")
    parser.add_argument("--train-voices", nargs="+", default=list(TRAIN_VOICES), metavar="SPEC",
                        help="TTS voices of the training speech, ENGINE:VOICE (default: %(default)s)")
    parser.add_argument("--heldout-voices", nargs="+", default=list(HELDOUT_VOICES), metavar="SPEC",
                        help="TTS voices of dev/test speech, never heard in training (default: %(default)s)")
    parser.add_argument("--voices", choices=VOICE_SETS, default="demo",
                        help="training voices: demo deals out --train-voices in turn; varied draws each "
                             "clip's voice, pitch and rate from every installed English voice but the "
                             "held-out ones (default: %(default)s)")
    parser.add_argument("--fortunes-dir", type=Path, default=FORTUNES_DIR,
                        help="Debian fortunes folder (default: %(default)s)")
    parser.add_argument("--topics", nargs="+", help="fortune topic files to use (default: all)")


def main(argv: list[str] | None = None) -> int:
    """``python -m stages.prepare_demo_data ...``, the same as ``python -m stages prepare demo-data ...``."""
    from stages.__main__ import main as cli

    return cli(argv, command=("prepare", "demo-data"))


def run(args: argparse.Namespace) -> int:
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    summary = prepare_demo_data(
        args.out_dir,
        scale=args.scale,
        seed=args.seed,
        workers=args.workers,
        n_train=args.n_train,
        n_dev=args.n_dev,
        n_test=args.n_test,
        n_docs=tuple(args.n_docs) if args.n_docs else None,
        n_mc=args.n_mc,
        train_voices=args.train_voices,
        heldout_voices=args.heldout_voices,
        voices=args.voices,
        fortunes_dir=args.fortunes_dir,
        topics=args.topics,
    )
    print_summary(summary)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
