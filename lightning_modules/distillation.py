"""Stage 3, ``distill``: cross-modal distillation (SALAD stage I, docs/methods.md#distillation).

The student hears speech; the teacher, the original text LLM, reads the same words as text. At every
position that predicts a text token the loss is ``alpha * KL(teacher || student) + (1 - alpha) *
NLL`` (direction, temperature and T^2 configurable; SALAD: alpha 1, forward, T 1). The teacher is
the same weights with LoRA switched off, or a frozen copy of the original LLM when the LLM itself
is trained (never the adapted model, which would move with the student: docs/methods.md#distillation).

Inputs (``distill.format``): ``interleaved`` (SALAD: text spans of 10-30 words alternate with speech
spans of 5-15 words, cut at the manifest's word/chunk times) or ``instruction`` (speech in the
user turn, the transcript as the target). A ``text`` source (SALAD's text share) has the adapted
LLM read plain text against the original: it limits forgetting when the LLM is trained.
"""

from __future__ import annotations

import torch

from lightning_modules.base import SpeechLLMModule
from speechllm.config import SourceKind
from speechllm.losses import lm_loss
from speechllm.sequences import Views, speech_and_text_views, text_views


class DistillModule(SpeechLLMModule):
    source_kinds = (SourceKind.speech, SourceKind.text)
    config_sections = ("distill",)

    @classmethod
    def config_errors(cls, cfg) -> list[tuple[str, str]]:
        lora = cfg.model.llm.lora
        if lora.enabled and any("lm_head" in m for m in lora.target_modules):
            return [("model.llm.lora.target_modules", "distillation needs the original LM head for the teacher: "
                     "keep lm_head out of it")]
        return []

    def __init__(self, cfg, stage_dir=None):
        super().__init__(cfg, stage_dir)
        if not cfg.model.llm.freeze and not cfg.model.llm.lora.enabled:
            self.model.attach_frozen_teacher()  # full fine-tuning (SALAD): the teacher is a frozen copy

    def views(self, batch: dict) -> Views:
        if batch["kind"] == "text":
            return text_views(self.model, batch["text"])
        d = self.cfg.distill
        return speech_and_text_views(self.model, batch["waveform"], batch["words"], batch["text"], batch["target"],
                                     self.sample_generators(batch), fmt=d.format, text_words=tuple(d.text_span_words),
                                     speech_words=tuple(d.speech_span_words))

    def training_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        model, d = self.model, self.cfg.distill
        views = self.views(batch)
        hidden, targets = model.labelled_hidden(views.student_rows, views.student_labels, views.speech)
        teacher_hidden = teacher_head = None
        if d.alpha > 0:
            with torch.no_grad(), model.original_llm() as teacher:
                teacher_hidden, teacher_targets = model.labelled_hidden(views.teacher_rows, views.teacher_labels, llm=teacher)
            teacher_head = teacher.get_output_embeddings()
            if not torch.equal(teacher_targets, targets):
                raise RuntimeError("student and teacher rows label different tokens (a span tokenised differently?)")
        out = lm_loss(hidden, model.lm_head, targets, teacher_hidden=teacher_hidden, teacher_head=teacher_head,
                      alpha=d.alpha, direction=d.direction, temperature=d.temperature, scale_by_t2=d.scale_by_t2,
                      chunk_size=model.cfg.loss_chunk_size, kernel=model.cfg.loss_kernel)
        out["row_lengths"], out["truncated"] = [len(r) for r in views.student_rows], views.cut
        return self.finish_step(out, batch)
