"""Stage 1, ``align``: train the projector on text alone, validate zero-shot on real speech.

TASU: the text becomes simulated CTC posteriors (CPS) over the encoder's CTC vocabulary.
TESU-LLM: the text goes through the text tower of a unified encoder. Either way the LLM only ever
sees ``projector(encode_text(text))`` in training and ``projector(encode_speech(audio))`` at test.
"""

from __future__ import annotations

import torch

from lightning_modules.base import SpeechLLMModule
from speechllm.config import SourceKind


class AlignModule(SpeechLLMModule):
    source_kinds = (SourceKind.simulated,)  # so the encoder needs a text side (checked by the runner)

    def training_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        feats, lengths = self.model.encoder.encode_text(batch["text"], self.sample_generators(batch))
        out = self.model(feats, lengths, self.model.target_ids(batch["target"]))
        return self.finish_step(out, batch)
