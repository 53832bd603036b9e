"""Whisper's own encoder-decoder transcription: what a user would pick instead of our models.

Our Whisper-based encoders use only Whisper's encoder; where the checkpoint holds the whole
``WhisperForConditionalGeneration`` (the demo's whisper-tiny.en does), its own greedy decoding gives the
honest anchor that every WER we report is printed next to.
"""

from __future__ import annotations

import torch
from transformers import AutoConfig


def has_whisper_decoder(pretrained: str | None) -> bool:
    """Whether ``pretrained`` (a Hub id or path) is a whole Whisper model, decoder included."""
    if not pretrained:
        return False
    try:
        config = AutoConfig.from_pretrained(pretrained)
    except (OSError, ValueError):
        return False
    return config.model_type == "whisper" and "WhisperForConditionalGeneration" in (config.architectures or [])


class WhisperTranscriber:
    """Whisper's own decoding, as its checkpoint configures it (greedy for the demo's), batched: 16 kHz
    mono waveforms in, text out."""

    sample_rate = 16_000

    def __init__(self, pretrained: str):
        from transformers import WhisperForConditionalGeneration, WhisperProcessor

        self.processor = WhisperProcessor.from_pretrained(pretrained)
        self.model = WhisperForConditionalGeneration.from_pretrained(pretrained).eval()

    @torch.no_grad()
    def transcribe(self, waveforms: list[torch.Tensor]) -> list[str]:
        inputs = self.processor.feature_extractor([w.numpy() for w in waveforms], sampling_rate=self.sample_rate,
                                                  return_tensors="pt", return_attention_mask=True)
        ids = self.model.generate(inputs.input_features, attention_mask=inputs.attention_mask)
        return [t.strip() for t in self.processor.batch_decode(ids, skip_special_tokens=True)]
