"""Token-level LM and distillation losses over the LLM vocabulary, chunked over positions.

Stage 3 (SALAD stage I, cross-modal distillation) trains the speech LLM (student, sees speech) to match
the frozen text LLM (teacher, sees the transcript) at every position that predicts a text token:
``loss = alpha * KL + (1 - alpha) * NLL``. With a 152k vocabulary, (positions x vocab) logits of student
and teacher, plus their log-softmax copies, do not fit in memory, so :func:`lm_loss` takes the final hidden
states and the LM head(s) and computes the logits chunk by chunk. Each chunk runs under non-reentrant
activation checkpointing: its (chunk, V) tensors are freed after the forward and recomputed in backward,
so the extra memory is O(chunk x V) instead of O(N x V).

The computation is one of :data:`KERNELS`: ``torch`` (the above, everywhere) or ``liger`` (Liger-Kernel's fused
linear cross-entropy, and its chunked fused linear JSD for a teacher, on CUDA). Inputs a kernel cannot compute
(CPU tensors, liger-kernel missing, a quantised head, no positions) fall back to ``torch``, warning once per reason.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from functools import cache, partial

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


@dataclass(frozen=True)
class LossInputs:
    """What :func:`lm_loss` was asked, validated; the teacher's hidden states detached, its head resolved."""

    student_hidden: Tensor
    lm_head: torch.nn.Module
    targets: Tensor
    teacher_hidden: Tensor | None
    teacher_head: torch.nn.Module
    alpha: float
    direction: str
    temperature: float
    scale_by_t2: bool
    chunk_size: int

    @property
    def n(self) -> int:
        return self.student_hidden.shape[0]

    @property
    def t2(self) -> float:
        """The factor on the divergence: T^2 with ``scale_by_t2``, else 1."""
        return self.temperature**2 if self.scale_by_t2 else 1.0


def _torch_terms(inputs: LossInputs) -> tuple[Tensor, Tensor, Tensor]:
    """(loss, ce, kl) by our chunked, checkpointed path (or all at once with chunk_size 0)."""
    sums = partial(_chunk_sums, lm_head=inputs.lm_head, teacher_head=inputs.teacher_head,
                   direction=inputs.direction, temperature=inputs.temperature)
    if inputs.chunk_size == 0:
        nll_sum, div_sum = sums(inputs.student_hidden, inputs.targets, inputs.teacher_hidden)
    else:
        nll_sum = div_sum = 0.0
        # At least one (possibly empty) chunk, so N == 0 still yields a graph through the head.
        for start in range(0, max(inputs.n, 1), inputs.chunk_size):
            rows = slice(start, start + inputs.chunk_size)
            teacher_rows = None if inputs.teacher_hidden is None else inputs.teacher_hidden[rows]
            chunk_nll, chunk_div = checkpoint(sums, inputs.student_hidden[rows], inputs.targets[rows], teacher_rows,
                                              use_reentrant=False)
            nll_sum, div_sum = nll_sum + chunk_nll, div_sum + chunk_div
    count = max(inputs.n, 1)  # N == 0: the sums are graph-connected zeros, so the means are too
    ce = nll_sum / count
    kl = div_sum / count * inputs.t2
    return inputs.alpha * kl + (1.0 - inputs.alpha) * ce, ce, kl


# Liger's generalised JSD: beta 0 is KL(teacher || student), beta 1 KL(student || teacher), 0.5 the JSD.
_LIGER_JSD_BETA = {"forward": 0.0, "reverse": 1.0, "jsd": 0.5}
_LIGER_IGNORE_INDEX = -100  # no target of ours is negative: every row counts


def _is_dense_linear(head: torch.nn.Module) -> bool:
    """A plain float ``nn.Linear`` whose weight is the whole (out, in) matrix: not quantised, sharded or adapted."""
    return (isinstance(head, torch.nn.Linear) and head.weight.is_floating_point()
            and tuple(head.weight.shape) == (head.out_features, head.in_features))


@cache
def _liger_import_error() -> str | None:
    try:
        import liger_kernel.chunked_loss  # noqa: F401
        import liger_kernel.transformers  # noqa: F401  (needs triton)
    except ImportError as err:
        return f"liger-kernel not installed ({err}): pip install liger-kernel"
    return None


def _liger_unavailable(inputs: LossInputs) -> str | None:
    """Why Liger cannot compute these inputs (None: it can)."""
    if inputs.student_hidden.device.type != "cuda":
        return "no CUDA device"
    if inputs.n == 0:
        return "no positions (Liger's kernels divide by the row count)"
    heads = {"lm_head": inputs.lm_head}
    if inputs.teacher_hidden is not None:
        heads["teacher_head"] = inputs.teacher_head
    for role, head in heads.items():
        if not _is_dense_linear(head):
            return f"{role} is a {type(head).__name__}, not a dense torch.nn.Linear"
    return _liger_import_error()


def _liger_ce_terms(inputs: LossInputs) -> tuple[Tensor, Tensor, Tensor]:
    """No teacher: Liger's fused linear cross-entropy (Triton), never holding a (chunk, V) logits tensor."""
    from liger_kernel.transformers import LigerFusedLinearCrossEntropyLoss

    head = inputs.lm_head
    ce = LigerFusedLinearCrossEntropyLoss(ignore_index=_LIGER_IGNORE_INDEX)(
        head.weight, inputs.student_hidden, inputs.targets, head.bias)
    return ce, ce, ce.new_zeros(())


def _liger_distillation_terms(inputs: LossInputs, compiled: bool = True) -> tuple[Tensor, Tensor, Tensor]:
    """A teacher: Liger's chunked fused linear JSD, whose generalised JSD covers all three directions.

    It returns the weighted loss and, detached, its CE and divergence terms; gradients flow through the loss
    only (Liger computes them chunk by chunk in the forward). ``compiled``: Liger's torch.compile of a chunk.
    """
    from liger_kernel.chunked_loss.jsd_loss import LigerFusedLinearJSDFunction

    student, teacher = inputs.lm_head, inputs.teacher_head
    loss, divergence, ce = LigerFusedLinearJSDFunction.apply(
        inputs.student_hidden, student.weight, inputs.teacher_hidden, teacher.weight, inputs.targets,
        student.bias, teacher.bias, 1.0 - inputs.alpha, inputs.alpha * inputs.t2, _LIGER_JSD_BETA[inputs.direction],
        _LIGER_IGNORE_INDEX, inputs.temperature, compiled, inputs.chunk_size or inputs.n, True)
    return loss, ce.detach(), divergence.detach() * inputs.t2


def _liger_terms(inputs: LossInputs) -> tuple[Tensor, Tensor, Tensor]:
    if inputs.teacher_hidden is None:
        return _liger_ce_terms(inputs)
    return _liger_distillation_terms(inputs)


@dataclass(frozen=True)
class LossKernelImpl:
    """One way to compute (loss, ce, kl): ``unavailable`` says why it cannot for some inputs (None: it can)."""

    terms: Callable[[LossInputs], tuple[Tensor, Tensor, Tensor]]
    unavailable: Callable[[LossInputs], str | None] = lambda inputs: None


KERNELS = {"torch": LossKernelImpl(_torch_terms), "liger": LossKernelImpl(_liger_terms, _liger_unavailable)}
_warned_fallbacks: set[tuple[str, str]] = set()


def _kernel_for(name: str, inputs: LossInputs) -> LossKernelImpl:
    """The kernel ``name`` where it can compute ``inputs``, else the torch one (warning once per reason)."""
    kernel = KERNELS[name]
    reason = kernel.unavailable(inputs)
    if reason is None:
        return kernel
    if (name, reason) not in _warned_fallbacks:
        _warned_fallbacks.add((name, reason))
        warnings.warn(f"loss kernel {name!r} unavailable: {reason}; using the torch chunked loss",
                      RuntimeWarning, stacklevel=3)
    return KERNELS["torch"]


def lm_loss(student_hidden: Tensor, lm_head: torch.nn.Module, targets: Tensor, *,
            teacher_hidden: Tensor | None = None, teacher_head: torch.nn.Module | None = None,
            alpha: float = 0.0, direction: str = "forward", temperature: float = 1.0,
            scale_by_t2: bool = False, chunk_size: int = 1024, kernel: str = "torch") -> dict[str, Tensor]:
    """Token-mean ``alpha * divergence + (1 - alpha) * NLL`` over N aligned positions.

    ``student_hidden`` and ``teacher_hidden`` are (N, d) final hidden states (after the LLM's final norm);
    row i of both predicts ``targets[i]``. ``teacher_head`` defaults to ``lm_head``. Returns ``loss``,
    ``ce`` (student NLL at temperature 1, always), ``kl`` (divergence at ``temperature``, times T^2 when
    ``scale_by_t2``; 0 without a teacher) and ``n_tokens``. ``chunk_size`` 0 computes all positions at
    once without checkpointing (the reference path); > 0 checkpoints each chunk of that many positions.
    ``kernel`` (:data:`KERNELS`): ``torch``, or ``liger`` (Liger-Kernel's fused linear losses on CUDA, where
    only ``loss`` carries gradient); inputs a kernel cannot compute fall back to ``torch`` with a warning.
    """
    if str(kernel) not in KERNELS:
        raise ValueError(f"unknown loss kernel {kernel!r}; expected one of {tuple(KERNELS)}")
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

    inputs = LossInputs(student_hidden, lm_head, targets,
                        None if teacher_hidden is None else teacher_hidden.detach(),
                        lm_head if teacher_head is None else teacher_head,
                        alpha, direction, temperature, scale_by_t2, chunk_size)
    loss, ce, kl = _kernel_for(str(kernel), inputs).terms(inputs)
    return {"loss": loss, "ce": ce, "kl": kl, "n_tokens": torch.tensor(n, device=student_hidden.device)}
