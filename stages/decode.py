"""Decode a speech manifest with an exported model: hypotheses as JSONL + corpus WER (S/D/I).

``python -m stages decode --model runs/tiny/align/model --manifest data/tiny/speech/val.jsonl --out hyps.jsonl``
"""

from __future__ import annotations

import argparse
import dataclasses
import json
from pathlib import Path

import torch
from omegaconf import OmegaConf
from tqdm import tqdm

from speechllm.config import GenerationConfig
from speechllm.manifest import load_audio, load_manifest, normalize_target
from speechllm.metrics import corpus_errors, normalize
from speechllm.model import SpeechLLM


def decode_manifest(model: SpeechLLM, manifest: str | Path, out_path: str | Path, *, batch_size: int = 8,
                    gen: GenerationConfig | None = None, normalizer: str = "whisper", limit: int = 0) -> dict:
    items = load_manifest(manifest, require_audio=True)
    items = items[:limit] if limit else items
    rate = model.cfg.encoder.sample_rate
    decoded: list[tuple[str, str]] = []
    model.eval()
    for start in tqdm(range(0, len(items), batch_size), desc=f"decode {Path(manifest).name}", unit="batch"):
        chunk = items[start : start + batch_size]
        decoded += model.transcribe_with_sources([load_audio(u.audio, rate) for u in chunk], gen)
    hyps, sources = [h for h, _ in decoded], [s for _, s in decoded]
    joint = (gen or model.cfg.generation).ctc_weight > 0
    refs = [normalize_target(u.target_text, "none") for u in items]
    total, per_utt = corpus_errors(refs, hyps, normalizer)
    out_path = Path(out_path)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    with out_path.open("w", encoding="utf-8") as f:
        for u, hyp, source, ref, c in zip(items, hyps, sources, refs, per_utt):
            f.write(json.dumps({"id": u.id, "ref": ref, "hyp": hyp, "ref_norm": normalize(ref, normalizer),
                                "hyp_norm": normalize(hyp, normalizer), **c.as_dict(),
                                **({"source": source} if joint else {})}) + "\n")
    out = {"manifest": str(manifest), "utterances": len(items), "normalizer": normalizer, **total.as_dict()}
    if joint:  # how often the CTC head's own transcript won
        out["ctc_chosen"] = sources.count("ctc") / max(len(sources), 1)
    return out


def load_for_decoding(model_dir: str | Path) -> SpeechLLM:
    model = SpeechLLM.from_pretrained(model_dir)
    return model.to("cuda" if torch.cuda.is_available() else "cpu")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", required=True, help="a stage's model/ directory")
    parser.add_argument("--manifest", required=True, help="speech manifest (JSONL) to transcribe")
    parser.add_argument("--out", required=True, help="hypotheses JSONL (one row per clip, with its errors)")
    parser.add_argument("--batch-size", type=int, default=8, help="clips per generate call (default: %(default)s)")
    parser.add_argument("--beam", type=int, default=None, help="beam size (default: the model's config)")
    parser.add_argument("--max-new-tokens", type=int, default=None, help="default: the model's config")
    parser.add_argument("--no-repeat-ngram", type=int, default=None, metavar="N",
                        help="repetition guard: no n-gram of N tokens twice (default: the model's config)")
    parser.add_argument("--repetition-penalty", type=float, default=None, help="default: the model's config")
    parser.add_argument("--ctc-weight", type=float, default=None, metavar="W",
                        help="joint CTC/LLM decoding with this CTC weight in [0, 1] (default: the model's config)")
    parser.add_argument("--normalizer", default="whisper", choices=["whisper", "tasu", "none"],
                        help="text normaliser applied to both sides before scoring (default: %(default)s)")
    parser.add_argument("--limit", type=int, default=0, help="decode only the first N clips (0: all)")


def run(args: argparse.Namespace) -> int:
    model = load_for_decoding(args.model)
    gen = GenerationConfig(**OmegaConf.to_container(model.cfg.generation))
    gen.num_beams = args.beam or gen.num_beams
    gen.max_new_tokens = args.max_new_tokens or gen.max_new_tokens
    if args.no_repeat_ngram is not None:
        gen.no_repeat_ngram_size = args.no_repeat_ngram
    if args.repetition_penalty is not None:
        gen.repetition_penalty = args.repetition_penalty
    if args.ctc_weight is not None:
        gen = dataclasses.replace(gen, ctc_weight=args.ctc_weight)  # (validated, as at load)
    result = decode_manifest(model, args.manifest, args.out, batch_size=args.batch_size, gen=gen,
                             normalizer=args.normalizer, limit=args.limit)
    chosen = f", the CTC head's own transcript on {result['ctc_chosen']:.0%} of clips" if "ctc_chosen" in result else ""
    print(f"WER {result['wer']:.4f}  (S={result['substitutions']} D={result['deletions']} "
          f"I={result['insertions']} N={result['ref_words']}, {result['utterances']} utterances, "
          f"normaliser {result['normalizer']}{chosen}) -> {args.out}")
    return 0
