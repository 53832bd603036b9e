"""Speech encoders behind one contract (see base.py), chosen by ``encoder.kind``."""

from __future__ import annotations

from speechllm.config import EncoderConfig, plain
from speechllm.encoders.base import SpeechEncoder, UnifiedEncoder


def build_encoder(cfg: EncoderConfig) -> SpeechEncoder:
    if cfg.kind == "ctc":
        from speechllm.encoders.ctc import build_ctc_encoder

        return build_ctc_encoder(cfg)
    if cfg.kind == "whisper":
        from speechllm.encoders.whisper import WhisperSpeechEncoder

        if cfg.from_config is not None:
            return WhisperSpeechEncoder.from_config(plain(cfg.from_config), seed=cfg.init_seed)
        return WhisperSpeechEncoder.from_pretrained(cfg.pretrained)
    if cfg.kind == "dual_tower":
        from speechllm.encoders.dual_tower import build_dual_tower_encoder

        return build_dual_tower_encoder(cfg)
    raise ValueError(f"unknown encoder.kind {cfg.kind!r} (ctc | whisper | dual_tower)")


__all__ = ["SpeechEncoder", "UnifiedEncoder", "build_encoder"]
