"""Decode a speech manifest with an exported model: hypotheses as JSONL + corpus WER (S/D/I)."""

from __future__ import annotations

import json
from pathlib import Path

import torch
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
    hyps: list[str] = []
    model.eval()
    for start in tqdm(range(0, len(items), batch_size), desc=f"decode {Path(manifest).name}", unit="batch"):
        chunk = items[start : start + batch_size]
        hyps += model.transcribe([load_audio(u.audio, rate) for u in chunk], gen)
    refs = [normalize_target(u.target_text, "none") for u in items]
    total, per_utt = corpus_errors(refs, hyps, normalizer)
    out_path = Path(out_path)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    with out_path.open("w", encoding="utf-8") as f:
        for u, hyp, ref, c in zip(items, hyps, refs, per_utt):
            f.write(json.dumps({"id": u.id, "ref": ref, "hyp": hyp, "ref_norm": normalize(ref, normalizer),
                                "hyp_norm": normalize(hyp, normalizer), **c.as_dict()}) + "\n")
    return {"manifest": str(manifest), "utterances": len(items), "normalizer": normalizer, **total.as_dict()}


def load_for_decoding(model_dir: str | Path) -> SpeechLLM:
    model = SpeechLLM.from_pretrained(model_dir)
    return model.to("cuda" if torch.cuda.is_available() else "cpu")
