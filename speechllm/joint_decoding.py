"""Joint CTC/LLM decoding: the LLM proposes transcripts, the CTC head's frame posteriors judge them.

Rescoring in the manner of hybrid CTC/attention ASR (Watanabe et al., 2017): a clip's candidates are
the LLM's ``num_beams`` best transcripts and the CTC head's own greedy one, each scored

    (1 - w) * log p_LLM(text | speech) + w * log p_CTC(text | frames)

and the best is the transcript. A fluent sentence the frames do not support loses to the head's own
reading; a correction the frames allow wins. ``w`` is ``generation.ctc_weight`` (0: the LLM alone).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

# A candidate the frames cannot produce at all (more units than frames allow) scores this.
IMPOSSIBLE = -math.inf


def ctc_log_likelihood(log_probs: torch.Tensor, units: list[int], blank: int) -> float:
    """log p(units | frames) under CTC, for (T, V) log-posteriors; ``IMPOSSIBLE`` where too few frames
    for the units (no units: every frame blank)."""
    if not units:
        return float(log_probs[:, blank].float().sum())
    nll = F.ctc_loss(log_probs.float()[:, None], torch.tensor([units]), torch.tensor([log_probs.shape[0]]),
                     torch.tensor([len(units)]), blank=blank, reduction="sum", zero_infinity=False)
    return IMPOSSIBLE if not torch.isfinite(nll) else -float(nll)


def joint_best(llm_scores: list[float], ctc_scores: list[float], weight: float) -> int:
    """Index of the candidate with the best ``(1 - weight) * llm + weight * ctc`` (the first on ties)."""
    if not 0.0 <= weight <= 1.0:
        raise ValueError(f"ctc_weight must be in [0, 1], got {weight}")
    # (a term of weight 0 is left out: 0 * -inf would be nan)
    scores = [(0.0 if weight == 1 else (1 - weight) * a) + (0.0 if weight == 0 else weight * b)
              for a, b in zip(llm_scores, ctc_scores, strict=True)]
    return max(range(len(scores)), key=lambda i: (scores[i], -i))
