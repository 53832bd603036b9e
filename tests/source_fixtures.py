"""Small real corpora in every source format, from generated audio: a Hugging Face DatasetDict saved to
disk (an ``Audio`` column of 22.05 kHz stereo flac), the same rows as parquet shards and JSON text for
streaming, a Lhotse CutSet manifest and a Shar directory, and TASU JSONL (wav files and a Kaldi ark).

The audio is noise (the tiny models are random anyway); the clips' texts, speakers and word times are
what the sources must carry to the stages.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

import numpy as np
import soundfile as sf

WORDS = "the a cat dog sat ran on mat big red blue we see go home now here good fast one two".split()
RATE = 22050  # not the encoder's 16 kHz: every format must resample


def clips(root: Path, n: int, seed: int = 0, prefix: str = "u", rate: int = RATE, channels: int = 2) -> list[dict]:
    """``n`` noise clips written as flac, with texts and evenly spaced word times."""
    rng, np_rng = random.Random(seed), np.random.default_rng(seed)
    (root / "audio").mkdir(parents=True, exist_ok=True)
    rows = []
    for i in range(n):
        seconds = round(rng.uniform(0.5, 1.1), 3)
        wave = (0.1 * np_rng.standard_normal((int(rate * seconds), channels))).astype(np.float32)
        path = root / "audio" / f"{prefix}{i:03d}.flac"
        sf.write(path, wave, rate)
        words = rng.choices(WORDS, k=rng.randint(3, 6))
        step = seconds / len(words)
        rows.append({"id": f"{prefix}{i:03d}", "path": str(path), "text": " ".join(words), "speaker": f"spk{i % 3}",
                     "seconds": seconds, "words": [{"w": w, "start": round(j * step, 4), "end": round((j + 1) * step, 4)}
                                                   for j, w in enumerate(words)]})
    return rows


def hf_dataset(rows: list[dict], **extra_columns):
    """A datasets.Dataset with an Audio column (paths cast to Audio; bytes embedded on save)."""
    from datasets import Audio, Dataset

    data = {"audio": [r["path"] for r in rows], "sentence": [r["text"] for r in rows], "utt": [r["id"] for r in rows],
            "spk": [r["speaker"] for r in rows], "words": [r["words"] for r in rows], **extra_columns}
    return Dataset.from_dict(data).cast_column("audio", Audio())


def build_hf(root: Path, rows: list[dict], test_rows: list[dict]) -> dict[str, str]:
    """A saved DatasetDict (train/test), the train rows as two parquet shards, text rows as JSON lines."""
    from datasets import DatasetDict

    train = hf_dataset(rows)
    DatasetDict({"train": train, "test": hf_dataset(test_rows)}).save_to_disk(str(root / "hf_saved"))
    (root / "parquet").mkdir(parents=True, exist_ok=True)
    for shard in range(2):
        train.shard(2, shard, contiguous=True).to_parquet(str(root / "parquet" / f"train-{shard}.parquet"))
    text = root / "text.jsonl"
    text.write_text("".join(json.dumps({"text": r["text"], "topic": "t"}) + "\n" for r in rows + test_rows))
    cols = "text=sentence&id=utt&speaker=spk"
    return {"hf_map": f"hf:{root / 'hf_saved'}?split=train&{cols}",
            "hf_test": f"hf:{root / 'hf_saved'}?split=test&{cols}",
            "hf_stream": f"hf:parquet?data_files={root / 'parquet'}/train-*.parquet&streaming=true&{cols}",
            # the saved dataset streamed (to_iterable_dataset): datasets' parquet streams sleep 5 s at the end
            # of every shuffled epoch (a pyarrow thread-shutdown workaround), too slow for shuffled tests
            "hf_saved_stream": f"hf:{root / 'hf_saved'}?split=train&streaming=true&{cols}",
            "hf_text_stream": f"hf:json?data_files={text}&streaming=true"}


def cutset(rows: list[dict], offset: float = 0.0):
    """A Lhotse CutSet: one MonoCut a clip starting ``offset`` s into its recording, one supervision with
    the text, the speaker and word alignments (in recording time, as Lhotse keeps them)."""
    from lhotse import CutSet, MonoCut, Recording, SupervisionSegment
    from lhotse.supervision import AlignmentItem

    cuts = []
    for r in rows:
        rec = Recording.from_file(r["path"], recording_id=r["id"])
        words = [AlignmentItem(w["w"], w["start"] + offset, round(w["end"] - w["start"], 4)) for w in r["words"]]
        sup = SupervisionSegment(id=r["id"], recording_id=r["id"], start=0.0, duration=r["seconds"] - offset,
                                 text=r["text"], speaker=r["speaker"], alignment={"word": words}, custom={"task": "ASR"})
        cuts.append(MonoCut(id=r["id"], start=offset, duration=round(r["seconds"] - offset, 4), channel=0,
                            recording=rec, supervisions=[sup]))
    return CutSet.from_cuts(cuts)


def build_lhotse(root: Path, rows: list[dict]) -> dict[str, str]:
    cuts = cutset(rows)
    cuts.to_file(root / "cuts.jsonl.gz")
    (root / "shar").mkdir(parents=True, exist_ok=True)
    cuts.to_shar(root / "shar", fields={"recording": "flac"}, shard_size=4)
    return {"lhotse": f"lhotse:{root / 'cuts.jsonl.gz'}", "lhotse_shar": f"lhotse-shar:{root / 'shar'}"}


def build_tasu(root: Path, rows: list[dict]) -> dict[str, str]:
    """TASU's JSONL: ASR lines whose audio is a Kaldi ark (16 kHz int16, as TASU stores it) and QA lines
    with a flac path relative to the file."""
    import kaldiio

    lines, arks = [], {}
    for i, r in enumerate(rows):
        if i % 2 == 0:
            wave, rate = sf.read(r["path"], dtype="int16")
            arks[r["id"]] = (rate, wave[:, 0].copy())
            continue
        lines.append({"key": r["id"], "task": "QA", "target": r["text"], "path": str(Path(r["path"]).relative_to(root)),
                      "GT": r["text"]})
    kaldiio.save_ark(str(root / "audio.ark"), arks, scp=str(root / "audio.scp"))
    for line in (root / "audio.scp").read_text().splitlines():
        key, ark = line.split(" ", 1)
        text = next(r["text"] for r in rows if r["id"] == key)
        lines.append({"key": key, "task": "ASR", "target": text, "path": ark})
    path = root / "tasu.jsonl"
    path.write_text("".join(json.dumps(line) + "\n" for line in lines))
    return {"tasu": f"tasu:{path}"}


def build_all(root: Path) -> dict[str, str]:
    rows, test_rows = clips(root, 10, seed=1), clips(root, 4, seed=2, prefix="t")
    return {**build_hf(root, rows, test_rows), **build_lhotse(root, rows), **build_tasu(root, rows)}
