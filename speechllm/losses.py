"""Token-level LM and distillation losses over the LLM vocabulary, chunked over positions.

Stage 3 (SALAD stage I, cross-modal distillation) trains the speech LLM (student, sees speech) to match
the frozen text LLM (teacher, sees the transcript) at every position that predicts a text token:
``loss = alpha * KL + (1 - alpha) * NLL``. With a 152k vocabulary, (positions x vocab) logits of student
and teacher, plus their log-softmax copies, do not fit in memory, so :func:`lm_loss` takes the final hidden
states and the LM head(s) and computes the logits chunk by chunk. Each chunk runs under non-reentrant
activation checkpointing: its (chunk, V) tensors are freed after the forward and recomputed in backward,
so the extra memory is O(chunk x V) instead of O(N x V).
"""

from __future__ import annotations

import math
from functools import partial

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.utils.checkpoint import checkpoint

DIRECTIONS = ("forward", "reverse", "jsd")


def _kl_rows(log_p: Tensor, log_q: Tensor) -> Tensor:
    """Per row, sum_v p (log p - log q). Terms with p == 0 are 0 (as in xlogy), even where log q = -inf."""
    p = log_p.exp()
    log_ratio = (log_p - log_q).masked_fill_(p == 0, 0.0)  # in place: one (N, V) copy fewer
    return (p * log_ratio).sum(-1)


def _divergence_rows(teacher_log_probs: Tensor, student_log_probs: Tensor, direction: str) -> Tensor:
    if direction == "forward":
        return _kl_rows(teacher_log_probs, student_log_probs)
    if direction == "reverse":
        return _kl_rows(student_log_probs, teacher_log_probs)
    # log m = log((p_t + p_s) / 2) without leaving log space
    log_m = torch.logaddexp(teacher_log_probs, student_log_probs).sub_(math.log(2.0))
    return 0.5 * (_kl_rows(teacher_log_probs, log_m) + _kl_rows(student_log_probs, log_m))


def _log_softmax(logits: Tensor, temperature: float) -> Tensor:
    """float32 log_softmax(logits / temperature)."""
    logits = logits.float()
    return F.log_softmax(logits if temperature == 1.0 else logits / temperature, dim=-1)


def _check_divergence_args(direction: str, temperature: float) -> None:
    if direction not in DIRECTIONS:
        raise ValueError(f"unknown divergence direction {direction!r}; expected one of {DIRECTIONS}")
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")


def token_divergence(teacher_logits: Tensor, student_logits: Tensor, *, direction: str = "forward",
                     temperature: float = 1.0) -> Tensor:
    """(N, V) teacher and student logits -> (N,) divergence per position, in nats, at ``temperature``.

    ``forward`` = KL(p_teacher || p_student), ``reverse`` = KL(p_student || p_teacher),
    ``jsd`` = Jensen-Shannon divergence (bounded by log 2). Computed in float32 whatever the input dtype.
    """
    _check_divergence_args(direction, temperature)
    if teacher_logits.shape != student_logits.shape:
        raise ValueError(f"teacher logits {tuple(teacher_logits.shape)} and student logits "
                         f"{tuple(student_logits.shape)} differ in shape")
    return _divergence_rows(_log_softmax(teacher_logits, temperature), _log_softmax(student_logits, temperature),
                            direction)


def _chunk_sums(student_hidden: Tensor, targets: Tensor, teacher_hidden: Tensor | None, *,
                lm_head: torch.nn.Module, teacher_head: torch.nn.Module, direction: str,
                temperature: float) -> tuple[Tensor, Tensor]:
    """One chunk of positions -> (sum of student NLL at temperature 1, sum of divergences).

    No logits tensor is kept by name, so each (chunk, V) copy is freed as soon as it is used.
    """
    log_probs = _log_softmax(lm_head(student_hidden), 1.0)
    nll_sum = -log_probs.gather(-1, targets[:, None]).sum()
    if teacher_hidden is None:
        return nll_sum, log_probs.new_zeros(())
    with torch.no_grad():  # the teacher is a fixed target, even when it shares the student's head weights
        teacher_log_probs = _log_softmax(teacher_head(teacher_hidden), temperature)
    # log_softmax(log_softmax(z) / T) == log_softmax(z / T): the row constant log Z scales away
    student_log_probs = log_probs if temperature == 1.0 else _log_softmax(log_probs, temperature)
    return nll_sum, _divergence_rows(teacher_log_probs, student_log_probs, direction).sum()


def lm_loss(student_hidden: Tensor, lm_head: torch.nn.Module, targets: Tensor, *,
            teacher_hidden: Tensor | None = None, teacher_head: torch.nn.Module | None = None,
            alpha: float = 0.0, direction: str = "forward", temperature: float = 1.0,
            scale_by_t2: bool = False, chunk_size: int = 1024) -> dict[str, Tensor]:
    """Token-mean ``alpha * divergence + (1 - alpha) * NLL`` over N aligned positions.

    ``student_hidden`` and ``teacher_hidden`` are (N, d) final hidden states (after the LLM's final norm);
    row i of both predicts ``targets[i]``. ``teacher_head`` defaults to ``lm_head``. Returns ``loss``,
    ``ce`` (student NLL at temperature 1, always), ``kl`` (divergence at ``temperature``, times T^2 when
    ``scale_by_t2``; 0 without a teacher) and ``n_tokens``. ``chunk_size`` 0 computes all positions at
    once without checkpointing (the reference path); > 0 checkpoints each chunk of that many positions.
    """
    if student_hidden.dim() != 2:
        raise ValueError(f"student_hidden must be (N, d), got shape {tuple(student_hidden.shape)}")
    n = student_hidden.shape[0]
    if targets.shape != (n,) or targets.is_floating_point():
        raise ValueError(f"targets must be ({n},) integer token ids, got shape {tuple(targets.shape)} "
                         f"dtype {targets.dtype}")
    if teacher_hidden is not None and teacher_hidden.shape != student_hidden.shape:
        raise ValueError(f"teacher_hidden {tuple(teacher_hidden.shape)} must match student_hidden "
                         f"{tuple(student_hidden.shape)}")
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"alpha must be in [0, 1], got {alpha}")
    if alpha > 0 and teacher_hidden is None:
        raise ValueError(f"alpha={alpha} weights a distillation term but no teacher_hidden was given")
    _check_divergence_args(direction, temperature)
    if chunk_size < 0:
        raise ValueError(f"chunk_size must be >= 0 (0 = no chunking), got {chunk_size}")

    if teacher_hidden is not None:
        teacher_hidden = teacher_hidden.detach()
    sums = partial(_chunk_sums, lm_head=lm_head, teacher_head=lm_head if teacher_head is None else teacher_head, direction=direction,
                   temperature=temperature)
    if chunk_size == 0:
        nll_sum, div_sum = sums(student_hidden, targets, teacher_hidden)
    else:
        nll_sum = div_sum = 0.0
        # At least one (possibly empty) chunk, so N == 0 still yields a graph through the head.
        for start in range(0, max(n, 1), chunk_size):
            rows = slice(start, start + chunk_size)
            teacher_rows = None if teacher_hidden is None else teacher_hidden[rows]
            chunk_nll, chunk_div = checkpoint(sums, student_hidden[rows], targets[rows], teacher_rows,
                                              use_reentrant=False)
            nll_sum, div_sum = nll_sum + chunk_nll, div_sum + chunk_div

    count = max(n, 1)  # N == 0: the sums are graph-connected zeros, so the means are too
    ce = nll_sum / count
    kl = div_sum / count
    if scale_by_t2:
        kl = kl * temperature**2
    loss = alpha * kl + (1.0 - alpha) * ce
    return {"loss": loss, "ce": ce, "kl": kl, "n_tokens": torch.tensor(n, device=student_hidden.device)}
