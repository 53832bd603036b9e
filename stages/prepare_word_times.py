"""``python -m stages prepare word-times``: word times for natural speech by CTC forced alignment.

SALAD's interleaving cuts speech between ``words`` entries; synthesised demo speech has exact chunk
times, natural speech has none. This aligns each clip's transcript to the frame posteriors of a
pipeline stage's CTC encoder and writes the manifest again with ``words`` (one entry per whitespace
word of ``text``). Clips that cannot be aligned are kept without ``words`` and counted.
"""

from __future__ import annotations

import argparse
import json
import os
from collections import Counter
from pathlib import Path
from typing import Any

from tqdm import tqdm

from speechllm.config import ConfigError, TextSide
from speechllm.encoders import build_encoder, encoder_kind, kinds_with
from speechllm.encoders.ctc import CTCPosteriorEncoder
from speechllm.forced_alignment import units_per_word, word_times
from speechllm.manifest import Utterance, load_audio, load_manifest, write_manifest
from stages.runner import resolve_stage_configs

# Posteriors are softmax outputs; a unit with probability 0 must stay alignable (just very unlikely).
_MIN_PROB = 1e-30


def align_clip(encoder: CTCPosteriorEncoder, utt: Utterance) -> tuple[list[dict[str, Any]] | None, str | None]:
    """``(words, None)`` for a clip, or ``(None, why)`` when it cannot be aligned."""
    words = utt.text.split()
    try:
        units = units_per_word(encoder.vocab.encode, words)
    except ValueError:  # a tokenizer that merges units across words
        return None, "units_across_words"
    if not any(units):
        return None, "no_units"
    waveform = load_audio(utt.audio, encoder.sample_rate)
    probs, lengths = encoder.posteriors([waveform])
    frames = int(lengths[0])
    log_probs = probs[0, :frames].clamp_min(_MIN_PROB).log()
    try:
        times = word_times(log_probs, units, encoder.blank_id, waveform.numel() / encoder.sample_rate / frames)
    except ValueError:  # too few frames for the transcript
        return None, "too_short"
    return [{"w": w, "start": round(start, 3), "end": round(end, 3)} for w, (start, end) in zip(words, times)], None


def _raw_rows(path: Path) -> list[dict[str, Any]]:
    """The manifest's lines as written (every field kept), in the order ``load_manifest`` returns them."""
    with path.open(encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def _relocate_audio(row: dict[str, Any], utt: Utterance, out_dir: Path) -> None:
    """Audio paths are relative to the manifest: rewrite them for the output's folder."""
    key = "audio" if "audio" in row else "audio_filepath"
    row[key] = os.path.relpath(utt.audio.resolve(), out_dir.resolve())


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--pipeline", required=True, help="the CTC encoder comes from this pipeline's stage")
    parser.add_argument("--stage", default="align", help="that stage (default: %(default)s)")
    parser.add_argument("--scale", help="one of the pipeline's scales (default: its first)")
    parser.add_argument("--manifest", required=True, type=Path, help="speech manifest to align")
    parser.add_argument("--out", required=True, type=Path, help="the manifest with `words` added")
    parser.add_argument("overrides", nargs="*", metavar="key=value", help="overrides of the stage config")


def main(argv: list[str] | None = None) -> int:
    """``python -m stages prepare word-times ...`` in-process."""
    from stages.__main__ import main as cli

    return cli(argv, command=("prepare", "word-times"))


def run(args: argparse.Namespace) -> int:
    stages = resolve_stage_configs(args.pipeline, args.overrides, None, args.scale)
    cfg = next((c for name, _, c in stages if name == args.stage), None)
    if cfg is None:
        raise ConfigError(f"{args.pipeline}: no stage {args.stage!r} (have {[name for name, _, _ in stages]})")
    if not encoder_kind(cfg.model.encoder.kind).is_ctc:
        raise ConfigError(f"{args.pipeline}: stage {args.stage!r} has encoder.kind {cfg.model.encoder.kind!r}; "
                          f"forced alignment needs a CTC encoder ({' | '.join(kinds_with('is_ctc'))})")
    cfg.model.encoder.text_side = TextSide.cps  # the text side is not used: no statistics or simulator needed
    encoder = build_encoder(cfg.model.encoder)

    items = load_manifest(args.manifest, require_audio=True)
    rows, skipped = _raw_rows(args.manifest), Counter()
    for utt, row in zip(tqdm(items, desc="forced alignment", unit="clip"), rows):
        words, why = align_clip(encoder, utt)
        row.pop("words", None)
        if words is None:
            skipped[why] += 1
        else:
            row["words"] = words
        _relocate_audio(row, utt, args.out.parent)
    write_manifest(args.out, rows)
    summary = ", ".join(f"{why} {n}" for why, n in sorted(skipped.items())) or "none"
    print(f"word times for {len(items) - sum(skipped.values())} of {len(items)} clips -> {args.out} "
          f"(kept without words: {summary})")
    return 0
