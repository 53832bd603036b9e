"""One resumable, parallel TTS job: a list of items in, 16 kHz wavs (+ chunk boundaries) out.

Demo-data preparation and stage 4's synthesis both run their speech through ``synthesize_items``.
An item is done when its wav is a valid 16 kHz mono file and, for an item spoken chunk by chunk, its
``<wav>.words.json`` sidecar is there too. The sidecar is written first and the wav last, each
atomically (temporary name, then rename), so a job killed at any point restarts exactly where it
stopped: finished items are only read back, and half an item is never trusted.

Rank ``r`` of ``world_size`` processes takes ``items[r::world_size]``, so a multi-process (or
multi-node) job shares the work without any coordination. ``chunk_words`` cuts a text into the
seeded 3-6-word (say) chunks of a chunked item; ``manifest_rows`` turns results into manifest rows.
"""

from __future__ import annotations

import json
import random
from collections.abc import Callable
from concurrent.futures import FIRST_COMPLETED, Future, ProcessPoolExecutor, wait
from dataclasses import dataclass
from multiprocessing import get_context
from pathlib import Path

import soundfile as sf
from tqdm import tqdm

from speechllm.io import atomic_write
from speechllm.tts import (
    SAMPLE_RATE,
    TTSVoice,
    get_voice,
    normalize_text,
    synthesize_spans,
    synthesize_to_file,
    write_wav,
)


@dataclass(frozen=True)
class SynthesisItem:
    """One clip: ``text`` spoken by ``voice`` (a ``get_voice`` spec; manifests record it as the speaker,
    so pass the canonical ``get_voice(spec).name``).

    With ``chunks`` (which must join up to ``text``) each chunk is its own utterance and the result's
    ``words`` holds one exact ``{"w", "start", "end"}`` per chunk. ``audio`` is the wav's path relative
    to the output folder (default ``wav/<id>.wav``).
    """

    id: str
    text: str
    voice: str
    chunks: tuple[str, ...] | None = None
    audio: str = ""

    def __post_init__(self) -> None:
        if not self.id:
            raise ValueError(f"synthesis item with text {self.text!r} has an empty id")
        if not normalize_text(self.text):
            raise ValueError(f"synthesis item {self.id!r} has empty text")
        joined = None if self.chunks is None else " ".join(map(normalize_text, self.chunks))
        if joined is not None and joined != normalize_text(self.text):
            raise ValueError(
                f"synthesis item {self.id!r}: its chunks {list(self.chunks)!r} do not join up to its "
                f"text {self.text!r}"
            )
        if not self.audio:
            object.__setattr__(self, "audio", f"wav/{self.id}.wav")


def _has_alnum(token: str) -> bool:
    return any(c.isalnum() for c in token)


def chunk_words(text: str, sizes: tuple[int, int], rng: random.Random) -> tuple[str, ...]:
    """``text`` cut at word boundaries into chunks of ``sizes[0]``-``sizes[1]`` words (random sizes).

    A token without letters or digits ("--", "...") sticks to its neighbour and is not counted: no
    chunk is punctuation only (festival cannot say one). The chunks join up to ``normalize_text(text)``;
    a text shorter than ``sizes[0]`` words is one chunk. For ``SynthesisItem.chunks``.
    """
    lo, hi = sizes
    if not (1 <= lo and 2 * lo - 1 <= hi):
        raise ValueError(f"chunk sizes {sizes}: need 1 <= min and max >= 2 * min - 1 (so any text splits)")
    words: list[str] = []
    for token in text.split():
        if words and not (_has_alnum(token) and _has_alnum(words[-1])):
            words[-1] += " " + token
        else:
            words.append(token)
    chunks, start = [], 0
    while len(words) - start > hi:  # then at least 2 * lo remain: this chunk and the next can be lo long
        size = rng.randint(lo, min(hi, len(words) - start - lo))
        chunks.append(" ".join(words[start : start + size]))
        start += size
    chunks.append(" ".join(words[start:]))
    return tuple(chunks)


def words_path(wav: Path) -> Path:
    """The chunk-boundary sidecar of a wav."""
    return wav.with_name(wav.name + ".words.json")


def _finished(item: SynthesisItem, wav: Path) -> dict | None:
    """The result of an item already on disk, or None if any part of it is missing or not valid."""
    try:
        info = sf.info(wav)
    except sf.SoundFileError:  # missing or not a sound file
        return None
    if info.samplerate != SAMPLE_RATE or info.channels != 1 or info.frames == 0:
        return None
    words = None
    if item.chunks is not None:
        try:
            words = json.loads(words_path(wav).read_text(encoding="utf-8"))
            spoken = [w["w"] for w in words]
        except (OSError, ValueError, TypeError, KeyError):  # missing or not a list of {"w", ...}
            return None
        # a sidecar left by a different chunking of this id would give wrong boundaries
        if spoken != [normalize_text(c) for c in item.chunks]:
            return None
    return {"duration": info.frames / info.samplerate, "words": words}


_worker_voices: dict[str, TTSVoice] = {}


def _init_worker() -> None:
    import torch

    torch.set_num_threads(1)  # one process per core already; threads would only contend


def _synthesize(item: SynthesisItem, out_dir: str) -> dict:
    """Synthesise one item (in a worker or in process), building each voice once per process."""
    wav = Path(out_dir) / item.audio
    try:
        if item.voice not in _worker_voices:
            _worker_voices[item.voice] = get_voice(item.voice)
        voice = _worker_voices[item.voice]
        if item.chunks is None:
            return {"duration": synthesize_to_file(voice, item.text, wav), "words": None}
        audio, rate, words = synthesize_spans(voice, list(item.chunks))
        atomic_write(words_path(wav), json.dumps(words) + "\n")
        return {"duration": write_wav(wav, audio, rate), "words": words}  # the wav last: it marks done
    except Exception as err:  # name the item: a traceback from a worker process does not
        raise RuntimeError(f"{item.voice} failed on item {item.id} ({item.text!r}): {err}") from err


def synthesize_items(
    items: list[SynthesisItem],
    out_dir: str | Path,
    *,
    workers: int = 2,
    rank: int = 0,
    world_size: int = 1,
    progress: bool = True,
    on_item: Callable[[SynthesisItem], None] | None = None,
    desc: str = "tts",
) -> dict[str, dict]:
    """Synthesise this rank's share of ``items`` under ``out_dir``, skipping finished ones.

    Returns ``{id: {"duration": seconds, "words": [...] or None}}`` for every item of the shard.
    ``workers > 1`` synthesises in a spawn process pool, otherwise in this process. ``on_item`` is
    called (in this process) after each newly synthesised item.
    """
    if not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} is not in [0, world_size={world_size})")
    for field in ("id", "audio"):
        seen: set[str] = set()
        for item in items:
            if getattr(item, field) in seen:
                raise ValueError(f"two synthesis items share the {field} {getattr(item, field)!r}")
            seen.add(getattr(item, field))
    out_dir, shard = Path(out_dir), items[rank::world_size]
    results: dict[str, dict] = {}
    todo = []
    for item in shard:
        done = _finished(item, out_dir / item.audio)
        if done is None:
            todo.append(item)
        else:
            results[item.id] = done
    bar = tqdm(total=len(todo), desc=desc, unit="clip", disable=not progress or not todo)

    def finish(item: SynthesisItem, result: dict) -> None:
        results[item.id] = result
        bar.update()
        if on_item is not None:
            on_item(item)

    try:
        if workers <= 1 or len(todo) <= 1:  # in this process: simplest to debug, no start-up cost
            for item in todo:
                finish(item, _synthesize(item, str(out_dir)))
        else:
            # spawn, not fork: forking a process that has run torch's OpenMP threads can hang the child
            pool = ProcessPoolExecutor(workers, mp_context=get_context("spawn"), initializer=_init_worker)
            try:
                futures: dict[Future, SynthesisItem] = {
                    pool.submit(_synthesize, item, str(out_dir)): item for item in todo
                }
                pending = set(futures)
                while pending:
                    finished, pending = wait(pending, return_when=FIRST_COMPLETED)
                    for future in finished:
                        finish(futures[future], future.result())
            finally:
                # on an error or Ctrl-C stop at once: queued items would only be redone on resume
                pool.shutdown(wait=True, cancel_futures=True)
    finally:
        bar.close()
    return {item.id: results[item.id] for item in shard}


def manifest_rows(
    items: list[SynthesisItem], results: dict[str, dict], extra: dict[str, dict] | None = None
) -> list[dict]:
    """Manifest rows (``id, audio, duration, text, speaker[, words]`` + ``extra[id]``) in item order,
    for ``speechllm.manifest.write_manifest``; ``audio`` stays relative to the output folder."""
    extra = extra or {}
    rows = []
    for item in items:
        if item.id not in results:
            raise ValueError(f"no synthesis result for item {item.id!r} (was its rank's job run?)")
        result = results[item.id]
        row = {
            "id": item.id,
            "audio": item.audio,
            "duration": round(result["duration"], 4),
            "text": item.text,
            "speaker": item.voice,
        }
        if result["words"] is not None:
            row["words"] = result["words"]
        rows.append({**row, **extra.get(item.id, {})})
    return rows
