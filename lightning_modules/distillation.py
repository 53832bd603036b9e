"""Stage 3, ``distill``: cross-modal distillation (SALAD stage I, PAPERS.md §3.2).

The student hears speech; the teacher, the original text LLM, reads the same words as text. At every
position that predicts a text token the loss is ``alpha * KL(teacher || student) + (1 - alpha) *
NLL`` (direction, temperature and T^2 configurable; SALAD: alpha 1, forward, T 1). The teacher is
the same weights with LoRA switched off, or a frozen copy of the original LLM when the LLM itself
is trained (never the adapted model: Ultravox's known bug, ANCHORS.md §2.1).

Inputs (``distill.format``): ``interleaved`` (SALAD: text spans of 10-30 words alternate with speech
spans of 5-15 words, cut at the manifest's word/chunk times) or ``instruction`` (speech in the
user turn, the transcript as the target). A ``text`` source (SALAD's text share) has the adapted
LLM read plain text against the original: it limits forgetting when the LLM is trained.
"""

from __future__ import annotations

import torch

from lightning_modules.base import SpeechLLMModule
from speechllm.interleave import Span
from speechllm.losses import lm_loss
from speechllm.sequences import (
    encode_speech_spans,
    fit_rows_to_context,
    match_label_counts,
    plan_batch,
    project_spans,
    span_rows,
)


class DistillModule(SpeechLLMModule):
    source_kinds = ("speech", "text")

    def __init__(self, cfg, stage_dir=None):
        super().__init__(cfg, stage_dir)
        llm = cfg.model.llm
        if llm.lora.enabled and any("lm_head" in m for m in llm.lora.target_modules):
            raise ValueError("distillation needs the original LM head for the teacher: keep lm_head out of "
                             "model.llm.lora.target_modules")
        if not llm.freeze and not llm.lora.enabled:
            self.model.attach_frozen_teacher()  # full fine-tuning (SALAD): the teacher is a frozen copy
        elif llm.freeze and not llm.lora.enabled and any(s.kind == "text" for s in cfg.data.sources.values()):
            raise ValueError("a `text` source trains the LLM to stay close to the original; with a frozen LLM "
                             "(no LoRA, llm.freeze) it has nothing to train: drop it or enable LoRA")
        if cfg.distill.format not in ("interleaved", "instruction"):
            raise ValueError(f"distill.format must be interleaved or instruction, not {cfg.distill.format!r}")

    def views(self, batch: dict) -> tuple[list, list, torch.Tensor | None, list, list]:
        """Student rows (speech in its slots), labels, speech vectors, and the teacher's text rows."""
        model, d = self.model, self.cfg.distill
        if batch["kind"] == "text":  # plain text, every token predicted, in both views
            plans = [[Span("text", 0, 1, text, None, None)] for text in batch["text"]]
            rows, labels = span_rows(model, plans, None, label_all=True)
            return rows, labels, None, [list(r) for r in rows], [list(lab) for lab in labels]
        if d.format == "interleaved":
            plans = plan_batch(batch["words"], self.sample_generators(batch), tuple(d.text_span_words),
                               tuple(d.speech_span_words))
            speech, lengths = project_spans(model, *encode_speech_spans(model, batch["waveform"], plans))
            return (*span_rows(model, plans, lengths), speech, *span_rows(model, plans, None))
        feats, feat_lengths = model.encoder.encode_speech(batch["waveform"])
        projected, lengths = model.project(feats, feat_lengths)
        targets = model.target_ids(batch["target"])
        lengths, _ = model.fit_to_context(lengths, targets)
        return (*model.instruction_rows(lengths.tolist(), targets), model.flatten(projected, lengths),
                *model.instruction_rows(model.text_ids(batch["text"]), targets))

    def training_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        model, d = self.model, self.cfg.distill
        s_rows, s_labels, speech, t_rows, t_labels = self.views(batch)
        s_rows, s_labels, speech, cut = fit_rows_to_context(model, s_rows, s_labels, speech)
        t_rows, t_labels, _, _ = fit_rows_to_context(model, t_rows, t_labels)
        if cut:
            match_label_counts(s_labels, t_labels)
        hidden, targets = model.labelled_hidden(s_rows, s_labels, speech)
        teacher_hidden = teacher_head = None
        if d.alpha > 0:
            with torch.no_grad(), model.original_llm() as teacher:
                teacher_hidden, teacher_targets = model.labelled_hidden(t_rows, t_labels, llm=teacher)
            teacher_head = teacher.get_output_embeddings()
            if not torch.equal(teacher_targets, targets):
                raise RuntimeError("student and teacher rows label different tokens (a span tokenised differently?)")
        out = lm_loss(hidden, model.lm_head, targets, teacher_hidden=teacher_hidden, teacher_head=teacher_head,
                      alpha=d.alpha, direction=d.direction, temperature=d.temperature, scale_by_t2=d.scale_by_t2,
                      chunk_size=model.cfg.loss_chunk_size)
        out["seq_len"], out["truncated"] = max(len(r) for r in s_rows), cut
        return self.finish_step(out, batch)
