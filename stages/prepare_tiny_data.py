"""A tiny synthetic data set for plumbing tests and the ``tiny`` pipeline: random sentences as the
text corpus and noise clips as "speech" (the tiny encoder is random anyway)."""

from __future__ import annotations

import random
from pathlib import Path

import numpy as np
import soundfile as sf

from datamodules.manifest import write_manifest

WORDS = ("the a cat dog sat ran on under mat big small red blue we you they see saw go went home "
         "now then here there good bad fast slow one two three").split()


def prepare_tiny_data(out_dir: str | Path, n_text: int = 200, n_speech: int = 8, seed: int = 0) -> dict[str, str]:
    out = Path(out_dir)
    rng = random.Random(seed)
    text_rows = [{"id": f"t{i:04d}", "text": " ".join(rng.choices(WORDS, k=rng.randint(2, 6)))} for i in range(n_text)]
    write_manifest(out / "text" / "train.jsonl", text_rows)
    np_rng = np.random.default_rng(seed)
    speech_rows = []
    for i in range(n_speech):
        duration = rng.uniform(0.3, 0.8)
        wav = (0.1 * np_rng.standard_normal(int(16000 * duration))).astype(np.float32)
        rel = f"wav/s{i:03d}.wav"
        (out / "speech" / "wav").mkdir(parents=True, exist_ok=True)
        sf.write(out / "speech" / rel, wav, 16000, subtype="PCM_16")
        speech_rows.append({"id": f"s{i:03d}", "audio": rel, "duration": round(duration, 3),
                            "text": " ".join(rng.choices(WORDS, k=rng.randint(2, 5)))})
    write_manifest(out / "speech" / "val.jsonl", speech_rows)
    return {"text": str(out / "text" / "train.jsonl"), "speech": str(out / "speech" / "val.jsonl")}


def main(argv: list[str] | None = None) -> int:
    import argparse

    parser = argparse.ArgumentParser(prog="python -m stages prepare tiny")
    parser.add_argument("--out", required=True, help="output folder (text/ and speech/ manifests)")
    args = parser.parse_args(argv)
    print(prepare_tiny_data(args.out))
    return 0
