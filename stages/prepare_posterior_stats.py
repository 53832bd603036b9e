"""``python -m stages prepare posterior-stats``: measure a pipeline's CTC encoder on training-voice
speech (confusions, insertions, real LSD vectors) for CPS noise matched to real posteriors."""

from __future__ import annotations

import argparse
import hashlib
import json
from pathlib import Path

from speechllm.config import ConfigError, TextSide
from speechllm.encoders import build_encoder
from speechllm.manifest import load_audio, load_manifest
from speechllm.posterior_stats import PosteriorStats, collect_posterior_stats
from stages.runner import resolve_stage_configs


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--pipeline", required=True, help="the encoder comes from this pipeline's stage")
    parser.add_argument("--stage", default="align", help="that stage (default: %(default)s)")
    parser.add_argument("--scale", help="one of the pipeline's scales (default: its first)")
    parser.add_argument("--manifest", required=True, help="speech from TRAINING voices only")
    parser.add_argument("--limit", type=int, default=600, help="clips to measure (default: %(default)s)")
    parser.add_argument("--batch-size", type=int, default=16, help="clips per encoder call (default: %(default)s)")
    parser.add_argument("overrides", nargs="*", metavar="key=value", help="overrides of the stage config")


def run(args: argparse.Namespace) -> int:
    stages = resolve_stage_configs(args.pipeline, args.overrides, None, args.scale)
    cfg = next((c for name, _, c in stages if name == args.stage), None)
    if cfg is None:
        raise ConfigError(f"{args.pipeline}: no stage {args.stage!r} (have {[name for name, _, _ in stages]})")
    out = Path(cfg.model.encoder.cps.stats or "")
    if not cfg.model.encoder.cps.stats:
        raise ConfigError(f"{args.pipeline}: stage {args.stage!r} sets no model.encoder.cps.stats path")
    enc = cfg.model.encoder
    # Measured with this encoder (its CTC head's weights), this LSD threshold and this speech.
    head = Path(enc.ctc_head) / "head.safetensors" if enc.ctc_head else None
    key = hashlib.sha1(json.dumps({
        "encoder": str(enc.pretrained), "lsd": [enc.lsd, enc.lsd_blank_threshold], "limit": args.limit,
        "head": hashlib.sha1(head.read_bytes()).hexdigest() if head and head.is_file() else None,
        "manifest": hashlib.sha1(Path(args.manifest).read_bytes()).hexdigest()}).encode()).hexdigest()
    if PosteriorStats.saved_key(out) == key:
        print(f"posterior statistics already at {out}")
        return 0
    cfg.model.encoder.text_side = TextSide.cps  # measuring, not simulating
    encoder = build_encoder(cfg.model.encoder)
    items = load_manifest(args.manifest, require_audio=True)[: args.limit]
    batches = (
        ([load_audio(u.audio, encoder.sample_rate) for u in items[i : i + args.batch_size]],
         [u.text for u in items[i : i + args.batch_size]])
        for i in range(0, len(items), args.batch_size)
    )
    stats = collect_posterior_stats(encoder, batches)
    stats.save(out, key)
    kept = stats.confusion.diagonal()[: stats.confusion.shape[0]]
    print(f"posterior statistics of {len(items)} clips -> {out}: insertion rate {stats.insert_rate:.3f}, "
          f"mean P(correct unit) {kept.mean():.3f}, pools for {len(stats.pools)} units")
    return 0
