"""Held-out measures of a speech LLM (docs/methods.md#measures), computed without gradients.

- Misalignment M: the *same* model with a text context vs with the speech context, ``KL(P(.|w) ||
  P(.|c))`` at the positions that predict text tokens.
- Forgetting F: the original text LLM vs the adapted model, both reading text, ``KL(Q(.|w) || P(.|w))``
  at every position.
- Multiple choice: each option scored by its length-normalised (per-token mean) log-likelihood as a
  continuation of the context, read as text or heard as speech; accuracy and the text-speech gap.

Both KLs are reported as token means (SALAD sums per sequence; a mean is comparable across lengths).
Per-item sums are returned so callers can aggregate over ranks, sets and clusters exactly.
"""

from __future__ import annotations

import torch

from speechllm.losses import token_divergence
from speechllm.model import SpeechLLM
from speechllm.sequences import Views, continuation_plans, fit_rows_to_context, span_rows


def _chunks(n: int, size: int):
    size = size or max(n, 1)
    for start in range(0, n, size):
        yield slice(start, start + size)


@torch.no_grad()
def positionwise_kl(model: SpeechLLM, teacher_hidden: torch.Tensor, student_hidden: torch.Tensor, *,
                    teacher_is_original: bool) -> torch.Tensor:
    """(N,) forward KL(teacher || student) per position; the teacher's logits come from the original
    LLM's head when ``teacher_is_original``."""
    out = []
    for rows in _chunks(student_hidden.shape[0], model.cfg.loss_chunk_size):
        if teacher_is_original:
            with model.original_llm() as original:
                teacher_logits = original.get_output_embeddings()(teacher_hidden[rows])
        else:
            teacher_logits = model.lm_head(teacher_hidden[rows])
        out.append(token_divergence(teacher_logits, model.lm_head(student_hidden[rows])))
    # KL is never negative; float round-off can make a near-zero one so by ~1e-9.
    return torch.cat(out).clamp_min(0.0) if out else student_hidden.new_zeros(0)


@torch.no_grad()
def positionwise_logprob(model: SpeechLLM, hidden: torch.Tensor, targets: torch.Tensor, llm=None) -> torch.Tensor:
    head = (llm or model.llm).get_output_embeddings()
    out = [head(hidden[rows]).float().log_softmax(-1).gather(-1, targets[rows, None]).squeeze(-1)
           for rows in _chunks(hidden.shape[0], model.cfg.loss_chunk_size)]
    return torch.cat(out) if out else hidden.new_zeros(0)


def _split(values: torch.Tensor, labels: list[list[int]]) -> list[torch.Tensor]:
    """Flat per-position values -> one tensor per row (labelled positions in row order)."""
    counts = [sum(1 for t in lab[1:] if t >= 0) for lab in labels]
    return list(values.split(counts))


@torch.no_grad()
def misalignment_forgetting(model: SpeechLLM, views: Views) -> list[dict[str, float]]:
    """Per item of a batch's views: ``m_sum``/``m_count`` (misalignment) and ``f_sum``/``f_count``
    (forgetting) in nats. Build the views with a fixed seed per item so every evaluation plans the
    same spans."""
    h_speech, _ = model.labelled_hidden(views.student_rows, views.student_labels, views.speech)
    h_text, _ = model.labelled_hidden(views.teacher_rows, views.teacher_labels)
    m = positionwise_kl(model, h_text, h_speech, teacher_is_original=False)
    h_adapted, _ = model.labelled_hidden(views.text_rows, views.text_labels)
    with model.original_llm() as original:
        h_original, _ = model.labelled_hidden(views.text_rows, views.text_labels, llm=original)
    f = positionwise_kl(model, h_original, h_adapted, teacher_is_original=True)
    return [{"m_sum": float(mi.sum()), "m_count": mi.numel(), "f_sum": float(fi.sum()), "f_count": fi.numel()}
            for mi, fi in zip(_split(m, views.student_labels), _split(f, views.text_labels))]


@torch.no_grad()
def multiple_choice(model: SpeechLLM, waveforms: list[torch.Tensor], contexts: list[str],
                    options: list[list[str]], *, fmt: str) -> list[dict[str, int]]:
    """Per item, the option chosen when the context is heard (``speech``), read by the adapted model
    (``text``) and read by the original LLM (``text_original``)."""
    n_options = [len(o) for o in options]
    feats, feat_lengths = model.encoder.encode_speech(waveforms)
    projected, proj_lengths = model.project(feats, feat_lengths)
    # Every option row repeats its item's speech vectors.
    repeat = torch.repeat_interleave(torch.arange(len(waveforms), device=proj_lengths.device),
                                     torch.tensor(n_options, device=proj_lengths.device))
    speech = model.flatten(projected[repeat], proj_lengths[repeat])
    option_ids = [model.text_ids([" " + o])[0] for opts in options for o in opts]
    if fmt == "interleaved":
        s_rows, s_labels = span_rows(model, continuation_plans(contexts, options, "speech"), proj_lengths[repeat].tolist())
        t_rows, t_labels = span_rows(model, continuation_plans(contexts, options, "text"), None)
    elif fmt == "instruction":
        s_rows, s_labels = model.instruction_rows(proj_lengths[repeat].tolist(), option_ids)
        context_ids = [ids for ids, k in zip(model.text_ids(contexts), n_options) for _ in range(k)]
        t_rows, t_labels = model.instruction_rows(context_ids, option_ids)
    else:
        raise ValueError(f"unknown distill.format {fmt!r} (interleaved | instruction)")

    def choices(rows, labels, speech_vectors, original: bool) -> list[int]:
        rows, labels, speech_vectors, _ = fit_rows_to_context(model, rows, labels, speech_vectors)
        if original:
            with model.original_llm() as llm:
                hidden, targets = model.labelled_hidden(rows, labels, speech_vectors, llm=llm)
                logprob = positionwise_logprob(model, hidden, targets, llm)
        else:
            hidden, targets = model.labelled_hidden(rows, labels, speech_vectors)
            logprob = positionwise_logprob(model, hidden, targets)
        scores = torch.stack([row.mean() if row.numel() else row.new_tensor(float("-inf")) for row in _split(logprob, labels)])
        return [int(s.argmax()) for s in scores.split(n_options)]

    speech_pick = choices(s_rows, s_labels, speech, original=False)
    text_pick = choices(t_rows, t_labels, None, original=False)
    original_pick = choices(t_rows, t_labels, None, original=True)
    return [{"speech": s, "text": t, "text_original": o} for s, t, o in zip(speech_pick, text_pick, original_pick)]
