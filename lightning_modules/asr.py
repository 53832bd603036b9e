"""Stage 2, ``asr``: curriculum ASR fine-tuning (TASU's curriculum, TASU2's controlled difficulty).

Starts from stage 1's projector (``init_from``) and trains on real speech through the encoder path
(LSD-compressed CTC posteriors, or frame-stacked states of a continuous encoder such as Whisper),
mixed batch by batch with input simulated from text. The mixture follows each source's share ramp;
the simulation's difficulty (CPS smoothing, deletion, insertion, or the WER range requested of the
learned simulator: TASU2's controlled curriculum) follows ``data.difficulty``. Both
are logged to TensorBoard as they change.
"""

from __future__ import annotations

import dataclasses

import torch
from omegaconf import OmegaConf

from lightning_modules.base import SpeechLLMModule
from speechllm.config import CPSConfig, SourceKind
from speechllm.schedules import ramp


class CurriculumASRModule(SpeechLLMModule):
    source_kinds = (SourceKind.speech, SourceKind.simulated)

    def simulation_rates(self, step: int) -> CPSConfig:
        """The encoder's CPS rates with every ramp of ``data.difficulty`` applied at ``step``."""
        rates = OmegaConf.to_object(self.cfg.model.encoder.cps)
        changes = {name: ramp(r.kind, r.start, r.end, r.start_step, r.end_step, step)
                   for name, r in self.cfg.data.difficulty.items() if r is not None}
        return dataclasses.replace(rates, **changes)

    def training_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        encoder = self.model.encoder
        rates = self.simulation_rates(self.global_step)
        if batch["kind"] == "speech":
            feats, lengths = encoder.encode_speech(batch["waveform"])
        else:
            feats, lengths = encoder.encode_text(batch["text"], self.sample_generators(batch), cps=rates)
        if self.logs_this_step():
            learned = ("wer_min", "wer_max") if self.cfg.model.encoder.text_side == "learned" else ()
            for name in ("smoothing_max", "keep_prob", "insert_prob", *learned):
                self.log(f"curriculum/cps/{name}", float(getattr(rates, name)), batch_size=len(batch["id"]))
        out = self.model(feats, lengths, self.model.target_ids(batch["target"]))
        return self.finish_step(out, batch)
