"""Transcribe audio files with an exported model: one ``<path>\\t<transcript>`` line per file, in order.

``python -m stages transcribe --model runs/demo/asr/model a.wav b.flac``

Any file soundfile reads, at any sample rate, mono or not (channels averaged, resampled in torch).
Every file is checked before the model is loaded: a missing or unreadable one is an error naming it
(exit code 2), and nothing is transcribed.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from omegaconf import OmegaConf

from speechllm.audio import AudioError, check_audio_file
from speechllm.config import GenerationConfig


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("files", nargs="+", metavar="FILE", help="audio files (wav, flac, ogg, ...; any rate or channels)")
    parser.add_argument("--model", required=True, help="an exported model/ directory (a stage's, or `export`'s)")
    parser.add_argument("--beam", type=int, default=None, help="beam size (default: the model's config)")
    parser.add_argument("--max-new-tokens", type=int, default=None, help="default: the model's config")
    parser.add_argument("--batch-size", type=int, default=8, help="files per generate call (default: %(default)s)")


def bad_files(paths: list[str]) -> list[str]:
    """One message per file that is missing or not audio."""
    problems = []
    for path in paths:
        try:
            check_audio_file(path)
        except AudioError as err:
            problems.append(str(err))
    return problems


def output_line(path: str, text: str) -> str:
    """``<path>\t<transcript>``, the transcript's whitespace runs (tabs, newlines) as single spaces."""
    return f"{path}\t{' '.join(text.split())}"


def run(args: argparse.Namespace) -> int:
    problems = bad_files(args.files)
    if not (Path(args.model) / "model.json").is_file():
        problems.append(f"--model {args.model}: not an exported model directory (no model.json)")
    if problems:
        for problem in problems:
            print(f"error: {problem}", file=sys.stderr)
        return 2
    from stages.decode import load_for_decoding  # after the checks: loading takes seconds

    model = load_for_decoding(args.model)
    gen = GenerationConfig(**OmegaConf.to_container(model.cfg.generation))
    gen.num_beams = args.beam or gen.num_beams
    gen.max_new_tokens = args.max_new_tokens or gen.max_new_tokens
    size = max(1, args.batch_size)
    for start in range(0, len(args.files), size):  # each batch printed as soon as it is done
        chunk = args.files[start:start + size]
        for path, text in zip(chunk, model.transcribe(chunk, gen)):
            print(output_line(path, text), flush=True)  # one line per file, whatever the text holds
    return 0
