"""Token rows beyond the instruction prompt: SALAD's interleaved speech/text sequences and scored
continuations (multiple choice), built on :meth:`SpeechLLM.splice`'s contract (``SPEECH`` slots +
labels).

One plan of spans (:func:`speechllm.interleave.plan_spans`) gives two aligned views: the *student*
hears the speech spans (their slots hold projected speech vectors), the *teacher* reads their words;
in both, exactly the text-span tokens are labelled (SALAD's ``1{w_{i+1} is text}``), so the labelled
positions of the two views pair up one to one.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from speechllm.interleave import Span, cut_speech, plan_spans
from speechllm.model import IGNORE_INDEX, SPEECH, SpeechLLM


def bos_ids(model: SpeechLLM) -> list[int]:
    """What the tokenizer puts before a text of its own accord (a BOS for Llama, nothing for Qwen)."""
    with_special = model.tokenizer("a", add_special_tokens=True).input_ids
    plain = model.tokenizer("a", add_special_tokens=False).input_ids
    return with_special[: len(with_special) - len(plain)] if with_special[-len(plain):] == plain else []


def plan_batch(words: list[list[dict]], generators: list[torch.Generator], text_words: tuple[int, int],
               speech_words: tuple[int, int]) -> list[list[Span]]:
    """One span plan per utterance, each with at least one speech span followed by text when the
    utterance is long enough (a plan that drew no speech is redrawn starting with text)."""
    plans = []
    for entries, g in zip(words, generators):
        if not entries:
            raise ValueError("interleaved input needs `words` (word or chunk times) in the manifest; "
                             "see `python -m stages prepare word-times`")
        plan = plan_spans(entries, text_words=text_words, speech_words=speech_words, generator=g)
        if not any(s.kind == "speech" for s in plan) and len(entries) > 1:
            plan = plan_spans(entries, text_words=text_words, speech_words=speech_words, generator=g, first_kind="text")
        plans.append(plan)
    return plans


@torch.no_grad()
def encode_speech_spans(model: SpeechLLM, waveforms: list[torch.Tensor], plans: list[list[Span]]
                        ) -> tuple[torch.Tensor, torch.Tensor]:
    """Encoder features of every speech span of every plan, in order: (B_spans, T, D) and lengths."""
    rate = model.encoder.sample_rate
    clips = [cut_speech(wav, rate, span) for wav, plan in zip(waveforms, plans) for span in plan if span.kind == "speech"]
    if not clips:
        return torch.zeros(0, 1, model.encoder.output_dim), torch.zeros(0, dtype=torch.long)
    return model.encoder.encode_speech(clips)


def project_spans(model: SpeechLLM, feats: torch.Tensor, lengths: torch.Tensor) -> tuple[torch.Tensor, list[int]]:
    """Projected speech vectors of all spans, flat in slot order, and the count of each span."""
    if not len(lengths):
        return torch.zeros(0, model.llm.get_input_embeddings().embedding_dim), []
    speech, speech_lengths = model.project(feats, lengths)
    return model.flatten(speech, speech_lengths), speech_lengths.tolist()


def span_rows(model: SpeechLLM, plans: list[list[Span]], speech_lengths: list[int] | None, *,
              label_all: bool = False) -> tuple[list[list[int]], list[list[int]]]:
    """Rows of alternating spans, and their labels.

    ``speech_lengths`` given: speech spans become that many ``SPEECH`` slots (the student); ``None``:
    their words are read as text (the teacher). Labels: the text-span tokens (never a row's first
    token, which nothing predicts); ``label_all`` labels every token (a pure-text view).
    """
    bos = bos_ids(model)
    lengths = iter(speech_lengths or [])
    rows, labels = [], []
    for plan in plans:
        row, lab = list(bos), [IGNORE_INDEX] * len(bos)
        for j, span in enumerate(plan):
            ids = model.tokenizer((" " if j else "") + span.text, add_special_tokens=False).input_ids
            if span.kind == "speech" and speech_lengths is not None:
                row += [SPEECH] * next(lengths)
                lab += [IGNORE_INDEX] * (len(row) - len(lab))
                continue
            row += ids
            lab += ids if (span.kind == "text" or label_all) else [IGNORE_INDEX] * len(ids)
        if lab:
            lab[0] = IGNORE_INDEX
        rows.append(row)
        labels.append(lab)
    return rows, labels


def fit_rows_to_context(model: SpeechLLM, rows: list[list[int]], labels: list[list[int]],
                        speech: torch.Tensor | None = None) -> tuple[list[list[int]], list[list[int]], torch.Tensor | None, int]:
    """Cut rows longer than the LLM's context at its end (dropping the speech vectors of cut slots),
    before any forward: returns the rows, labels, speech and how many rows were cut."""
    limit, cut, keep, start = model.max_positions, 0, [], 0
    out_rows, out_labels = [], []
    for row, lab in zip(rows, labels):
        n_slots = sum(1 for t in row if t == SPEECH)
        if len(row) > limit:
            cut += 1
            row, lab = row[:limit], lab[:limit]
        kept = sum(1 for t in row if t == SPEECH)
        keep.append(torch.arange(start, start + kept))
        start += n_slots
        out_rows.append(row)
        out_labels.append(lab)
    if speech is not None and cut:
        speech = speech[torch.cat(keep)] if keep else speech[:0]
    return out_rows, out_labels, speech, cut


def continuation_plans(contexts: list[str], options: list[list[str]], context_kind: str) -> list[list[Span]]:
    """For scoring options: one plan per (item, option): the context span, then the option as text."""
    plans = []
    for context, opts in zip(contexts, options):
        for option in opts:
            plans.append([Span(context_kind, 0, 1, context, None, None), Span("text", 1, 2, option, None, None)])
    return plans


def match_label_counts(labels_a: list[list[int]], labels_b: list[list[int]]) -> None:
    """Keep, in each row pair, only as many labelled tokens as the shorter side has (in place).

    Two views of a row label the same tokens; after a cut to the context one may lose some at its
    end, and the pairs must stay one to one.
    """
    for a, b in zip(labels_a, labels_b):
        keep = min(sum(t >= 0 for t in a[1:]), sum(t >= 0 for t in b[1:]))
        for lab in (a, b):
            seen = 0
            for i in range(1, len(lab)):
                if lab[i] >= 0:
                    seen += 1
                    if seen > keep:
                        lab[i] = IGNORE_INDEX


@dataclass
class Views:
    """One batch seen two ways: the student hears speech, the teacher reads the same words; both label
    the same tokens. ``text_*`` is the all-text view with every token labelled (for forgetting)."""

    student_rows: list[list[int]]
    student_labels: list[list[int]]
    speech: torch.Tensor | None
    teacher_rows: list[list[int]]
    teacher_labels: list[list[int]]
    text_rows: list[list[int]]
    text_labels: list[list[int]]
    cut: int = 0  # rows cut to the LLM's context


def speech_and_text_views(model: SpeechLLM, waveforms: list[torch.Tensor], words: list, texts: list[str],
                          targets: list[str], generators: list[torch.Generator], *, fmt: str,
                          text_words: tuple[int, int], speech_words: tuple[int, int]) -> Views:
    """``interleaved``: spans planned per utterance (seeded by its generator) from its ``words``;
    ``instruction``: the speech (or the transcript ``texts``) in the user turn, ``targets`` after it.
    Rows are cut to the LLM's context here, before any forward, with the label pairs kept one to one."""
    if fmt == "interleaved":
        plans = plan_batch(words, generators, text_words, speech_words)
        speech, lengths = project_spans(model, *encode_speech_spans(model, waveforms, plans))
        s_rows, s_labels = span_rows(model, plans, lengths)
        t_rows, t_labels = span_rows(model, plans, None)
        f_rows, f_labels = span_rows(model, plans, None, label_all=True)
    elif fmt == "instruction":
        feats, feat_lengths = model.encoder.encode_speech(waveforms)
        projected, lengths = model.project(feats, feat_lengths)
        target_ids = model.target_ids(targets)
        lengths, _ = model.fit_to_context(lengths, target_ids)
        speech = model.flatten(projected, lengths)
        s_rows, s_labels = model.instruction_rows(lengths.tolist(), target_ids)
        t_rows, t_labels = model.instruction_rows(model.text_ids(texts), target_ids)
        f_rows, f_labels = [list(r) for r in t_rows], [list(lab) for lab in t_labels]
    else:
        raise ValueError(f"unknown distill.format {fmt!r} (interleaved | instruction)")
    s_rows, s_labels, speech, cut = fit_rows_to_context(model, s_rows, s_labels, speech)
    t_rows, t_labels, _, _ = fit_rows_to_context(model, t_rows, t_labels)
    f_rows, f_labels, _, _ = fit_rows_to_context(model, f_rows, f_labels)
    if cut:
        match_label_counts(s_labels, t_labels)
    return Views(s_rows, s_labels, speech, t_rows, t_labels, f_rows, f_labels, cut)


def text_views(model: SpeechLLM, texts: list[str]) -> Views:
    """Plain text in every view, every token labelled (SALAD's text share: no speech at all)."""
    rows, labels = span_rows(model, [[Span("text", 0, 1, text, None, None)] for text in texts], None, label_all=True)
    rows, labels, _, cut = fit_rows_to_context(model, rows, labels)
    copy = lambda xs: [list(x) for x in xs]  # noqa: E731
    return Views(rows, labels, None, copy(rows), copy(labels), copy(rows), copy(labels), cut)
