"""Whisper's own encoder-decoder transcription: what a user would pick instead of our models.

Our Whisper-based encoders use only Whisper's encoder; where the checkpoint holds the whole
``WhisperForConditionalGeneration`` (the demo's whisper-tiny.en does), its own greedy decoding gives the
honest anchor that every WER we report is printed next to. It decodes as OpenAI's ``transcribe`` does by
default: greedy first, re-sampled at rising temperatures where the text repeats itself. Plain greedy
decoding loops on hard real speech ("the one, the one, ..." to 448 tokens): on 300 non-native clips
two such loops alone raised Whisper tiny.en's WER from 0.38 to 0.65, an anchor no user would see.
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
    """Whisper's own decoding (its checkpoint's generation config plus the temperature fallback),
    batched: 16 kHz mono waveforms in, text out. Seeded, so a set's transcripts repeat."""

    sample_rate = 16_000
    # OpenAI's defaults; transformers measures repetition by the gzip ratio of the token ids, where 1.35
    # stands for OpenAI's 2.4 on text (transformers' Whisper docs).
    decoding = {"temperature": (0.0, 0.2, 0.4, 0.6, 0.8, 1.0), "compression_ratio_threshold": 1.35}

    def __init__(self, pretrained: str):
        from transformers import WhisperForConditionalGeneration, WhisperProcessor

        self.processor = WhisperProcessor.from_pretrained(pretrained)
        self.model = WhisperForConditionalGeneration.from_pretrained(pretrained).eval()

    @torch.no_grad()
    def transcribe(self, waveforms: list[torch.Tensor]) -> list[str]:
        inputs = self.processor.feature_extractor([w.numpy() for w in waveforms], sampling_rate=self.sample_rate,
                                                  return_tensors="pt", return_attention_mask=True)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(0)
            ids = self.model.generate(inputs.input_features, attention_mask=inputs.attention_mask, **self.decoding)
        return [t.strip() for t in self.processor.batch_decode(ids, skip_special_tokens=True)]
