"""CTC forced alignment (Viterbi) and word times from it.

Natural speech has no word boundaries; SALAD's interleaving needs them to cut speech spans. The CTC
encoder's frame posteriors already say when each unit is spoken: the single best CTC path that spells
the transcript gives every unit its frames, and a word spans the frames of its units. Pure torch
(torchaudio's ``forced_align`` does not exist for this torch).
"""

from __future__ import annotations

from collections.abc import Callable

import torch


def _required_frames(targets: list[int]) -> int:
    """Frames the shortest CTC path needs: one per unit plus a blank between repeated units."""
    return len(targets) + sum(a == b for a, b in zip(targets, targets[1:]))


def ctc_forced_align(log_probs: torch.Tensor, targets: list[int], blank: int) -> list[tuple[int, int]]:
    """Each target unit's (first frame, last frame), inclusive, on the best CTC path of (T, V) log-probs.

    CTC topology: states blank, u1, blank, u2, ..., uL, blank (2L + 1); a state is entered from itself,
    the state before, or (for a unit differing from the unit two states back) skipping a blank.
    """
    if log_probs.dim() != 2:
        raise ValueError(f"ctc_forced_align: log_probs must be (T, V), got shape {tuple(log_probs.shape)}")
    frames, vocab = log_probs.shape
    bad = [u for u in targets if not 0 <= u < vocab or u == blank]
    if bad:
        raise ValueError(f"ctc_forced_align: targets {bad} are the blank ({blank}) or outside the vocabulary of {vocab}")
    needed = _required_frames(targets)
    if frames < needed:
        raise ValueError(f"ctc_forced_align: {frames} frames (T) cannot hold {len(targets)} units, "
                         f"which need at least {needed} frames")
    if not targets:
        return []

    states = torch.tensor([blank if s % 2 == 0 else targets[s // 2] for s in range(2 * len(targets) + 1)])
    emit = log_probs.detach().cpu().double()[:, states]  # (T, S); a loop over frames is no work for a GPU
    # Skipping the blank in between is allowed into a unit state unless it repeats the unit before.
    can_skip = torch.zeros(len(states), dtype=torch.bool)
    can_skip[2:] = (states[2:] != blank) & (states[2:] != states[:-2])
    minus_inf = torch.tensor(float("-inf"), dtype=torch.float64)

    score = torch.full((len(states),), float("-inf"), dtype=torch.float64)
    score[:2] = emit[0, :2]
    # back[t, s]: 0, 1 or 2 states back is where the best path into s at frame t came from.
    back = torch.zeros(frames, len(states), dtype=torch.uint8)
    for t in range(1, frames):
        stay = score
        advance = torch.cat([minus_inf.view(1), score[:-1]])
        skip = torch.where(can_skip, torch.cat([minus_inf.expand(2), score[:-2]]), minus_inf)
        best, back[t] = torch.stack([stay, advance, skip]).max(0)
        score = best + emit[t]

    state = len(states) - 1 if score[-1] >= score[-2] else len(states) - 2  # end on the last blank or unit
    if score[state] == float("-inf"):
        raise ValueError("ctc_forced_align: no CTC path with non-zero probability spells the targets")
    spans: list[list[int]] = [[-1, -1] for _ in targets]
    steps = back.numpy()
    for t in range(frames - 1, -1, -1):
        if state % 2:
            unit = spans[state // 2]
            unit[0] = t
            if unit[1] < 0:
                unit[1] = t
        state -= int(steps[t, state])
    return [(first, last) for first, last in spans]


def word_times(log_probs: torch.Tensor, word_units: list[list[int]], blank: int,
               frame_seconds: float) -> list[tuple[float, float]]:
    """(start, end) seconds of each word, aligning all words' units at once.

    A word starts at its first unit's first frame and ends after its last unit's last frame. A word
    without units (digits the vocabulary cannot spell) gets a zero-length time where the previous word
    ends (before any word with units: where the first one starts; no units at all: 0).
    """
    spans = ctc_forced_align(log_probs, [u for units in word_units for u in units], blank)
    frame_times: list[tuple[int, int] | None] = []
    offset = 0
    for units in word_units:
        if units:
            frame_times.append((spans[offset][0], spans[offset + len(units) - 1][1] + 1))
            offset += len(units)
        else:
            frame_times.append(None)
    boundary = next((t[0] for t in frame_times if t is not None), 0)
    times = []
    for frame_time in frame_times:
        if frame_time is not None:
            boundary = frame_time[1]
        start, end = frame_time or (boundary, boundary)
        times.append((start * frame_seconds, end * frame_seconds))
    return times


def units_per_word(encode: Callable[[str], list[int]], words: list[str]) -> list[list[int]]:
    """Each word's units such that, concatenated, they are exactly ``encode(" ".join(words))``.

    A word's units are what it adds to the encoding of the text so far, so a word after the first
    carries its leading space where the units spell spaces (" ", wav2vec2's "|", LLM units like " the"):
    a word alone encodes differently ("the" vs " the"), and ``encode`` drops a leading space.
    """
    out, done = [], []
    for i in range(len(words)):
        ids = encode(" ".join(words[: i + 1]))
        if ids[: len(done)] != done:
            raise ValueError(f"units_per_word: the units of {' '.join(words[:i])!r} change when {words[i]!r} "
                             "follows, so they cannot be split by word")
        out.append(ids[len(done) :])
        done = ids
    return out
