"""A tiny synthetic data set for plumbing tests and the ``tiny`` pipeline: random sentences as the
text corpus and noise clips as "speech" (the tiny encoder is random anyway).

    text/train.jsonl     text corpus (with a `topic`, for clustering)
    speech/train.jsonl   noise clips with sentences and evenly spaced word times (stages 2-4)
    speech/val.jsonl     noise clips for validation (with word times)
    mc/test.jsonl        multiple choice: a spoken context, three options, the answer
"""

from __future__ import annotations

import argparse
import random
from pathlib import Path

import numpy as np
import soundfile as sf

from speechllm.manifest import write_manifest

WORDS = ("the a cat dog sat ran on under mat big small red blue we you they see saw go went home "
         "now then here there good bad fast slow one two three").split()
TOPICS = ("animals", "colours", "moves")
RATE = 16000


def _noise_clips(out: Path, split: str, n: int, words: tuple[int, int], seconds: tuple[float, float],
                 rng: random.Random, np_rng: np.random.Generator) -> list[dict]:
    rows = []
    (out / "wav").mkdir(parents=True, exist_ok=True)
    for i in range(n):
        duration = round(rng.uniform(*seconds), 3)
        wav = (0.1 * np_rng.standard_normal(int(RATE * duration))).astype(np.float32)
        rel = f"wav/{split}{i:03d}.wav"
        sf.write(out / rel, wav, RATE, subtype="PCM_16")
        text = rng.choices(WORDS, k=rng.randint(*words))
        step = len(wav) / RATE / len(text)
        rows.append({"id": f"{split}{i:03d}", "audio": rel, "duration": round(len(wav) / RATE, 4), "text": " ".join(text),
                     "words": [{"w": w, "start": round(j * step, 4), "end": round((j + 1) * step, 4)} for j, w in enumerate(text)]})
    return rows


def prepare_tiny_data(out_dir: str | Path, n_text: int = 200, n_speech: int = 8, n_train_speech: int = 24,
                      n_mc: int = 6, seed: int = 0) -> dict[str, str]:
    out = Path(out_dir)
    rng = random.Random(seed)
    np_rng = np.random.default_rng(seed)
    text_rows = [{"id": f"t{i:04d}", "text": " ".join(rng.choices(WORDS, k=rng.randint(2, 6))), "topic": rng.choice(TOPICS)}
                 for i in range(n_text)]
    write_manifest(out / "text" / "train.jsonl", text_rows)
    write_manifest(out / "speech" / "val.jsonl", _noise_clips(out / "speech", "s", n_speech, (2, 5), (0.3, 0.8), rng, np_rng))
    write_manifest(out / "speech" / "train.jsonl",
                   _noise_clips(out / "speech", "train", n_train_speech, (4, 8), (0.8, 1.6), rng, np_rng))
    mc = _noise_clips(out / "mc", "mc", n_mc, (2, 4), (0.3, 0.6), rng, np_rng)
    for row in mc:
        row["options"] = [" ".join(rng.choices(WORDS, k=rng.randint(1, 3))) for _ in range(3)]
        row["answer"] = rng.randrange(3)
    write_manifest(out / "mc" / "test.jsonl", mc)
    return {"text": str(out / "text" / "train.jsonl"), "speech": str(out / "speech" / "val.jsonl"),
            "speech_train": str(out / "speech" / "train.jsonl"), "mc": str(out / "mc" / "test.jsonl")}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--out", required=True, help="output folder (text/, speech/, mc/ manifests)")


def run(args: argparse.Namespace) -> int:
    print(prepare_tiny_data(args.out))
    return 0
