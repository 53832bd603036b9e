"""SALAD's interleaved speech/text sequences: which words of an utterance are read as text and which
are heard as speech.

An utterance's ``words`` (``[{"w", "start", "end"}]``, see ``speechllm/manifest.py``) are split into
spans that alternate text (10-30 words) and speech (5-15 words), lengths drawn at random. An entry's
``"w"`` may hold several words (speech synthesised chunk by chunk has exact boundaries only between
chunks), so a span is always a run of whole entries and speech is only ever cut between entries.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

SPAN_KINDS = ("text", "speech")
# Word times may end this far past the audio (times rounded to ms, durations rounded in manifests).
TIME_TOLERANCE = 0.02


@dataclass(frozen=True)
class Span:
    kind: str  # "text" | "speech"
    first: int  # index of the first `words` entry in the span
    last: int  # one past the last entry
    text: str  # the span's words joined by single spaces
    start: float | None  # seconds (speech spans only)
    end: float | None


def _word_count(entry: dict[str, Any]) -> int:
    return len(entry["w"].split())


def _draw(bounds: tuple[int, int], generator: torch.Generator | None) -> int:
    low, high = bounds
    return int(torch.randint(low, high + 1, (1,), generator=generator))


def _span_end(counts: list[int], first: int, target: int, most: int) -> int:
    """One past the last entry of a span starting at ``first``: whole entries until ``target`` words,
    never more than ``most`` words unless the first entry alone has more."""
    total, end = counts[first], first + 1
    while end < len(counts) and total < target and total + counts[end] <= most:
        total += counts[end]
        end += 1
    return end


def _speech_times(words: list[dict[str, Any]], first: int, end: int) -> tuple[float, float]:
    try:
        return float(words[first]["start"]), float(words[end - 1]["end"])
    except (KeyError, TypeError, ValueError):
        raise ValueError(f"plan_spans: a speech span needs times, but words[{first}] {words[first]!r} or "
                         f"words[{end - 1}] {words[end - 1]!r} has no numeric 'start'/'end'") from None


def plan_spans(
    words: list[dict[str, Any]],
    *,
    text_words: tuple[int, int] = (10, 30),
    speech_words: tuple[int, int] = (5, 15),
    generator: torch.Generator | None = None,
    first_kind: str | None = None,
) -> list[Span]:
    """Alternating text/speech spans covering every entry of ``words`` once, in order.

    The first span's kind is random (p = 0.5) unless ``first_kind`` is given; each span's word count
    is drawn uniformly from its kind's range; the last span takes what is left.
    """
    for name, (low, high) in (("text_words", text_words), ("speech_words", speech_words)):
        if not 1 <= low <= high:
            raise ValueError(f"plan_spans: {name} must be (min, max) with 1 <= min <= max, got {(low, high)}")
    if first_kind is None:
        first_kind = SPAN_KINDS[int(torch.rand((), generator=generator) < 0.5)]
    elif first_kind not in SPAN_KINDS:
        raise ValueError(f"plan_spans: first_kind must be one of {SPAN_KINDS}, got {first_kind!r}")
    bounds = {"text": text_words, "speech": speech_words}
    counts = [_word_count(entry) for entry in words]
    spans, first, kind = [], 0, first_kind
    while first < len(words):
        end = _span_end(counts, first, _draw(bounds[kind], generator), bounds[kind][1])
        text = " ".join(word for entry in words[first:end] for word in entry["w"].split())
        times = _speech_times(words, first, end) if kind == "speech" else (None, None)
        spans.append(Span(kind, first, end, text, *times))
        first, kind = end, ("speech" if kind == "text" else "text")
    return spans


def cut_speech(waveform: torch.Tensor, sample_rate: int, span: Span) -> torch.Tensor:
    """The samples of a speech span (1-D). A cut ending up to ``TIME_TOLERANCE`` past the audio is
    clipped to its end; an empty cut or one outside the audio raises."""
    if waveform.dim() != 1:
        raise ValueError(f"cut_speech: waveform must be 1-D, got shape {tuple(waveform.shape)}")
    if span.start is None or span.end is None:
        raise ValueError(f"cut_speech: span of words {span.first}:{span.last} ({span.kind}) has no times")
    seconds = waveform.numel() / sample_rate
    first, last = round(span.start * sample_rate), min(round(span.end * sample_rate), waveform.numel())
    if span.start < 0 or span.end > seconds + TIME_TOLERANCE or last <= first:
        raise ValueError(f"cut_speech: span {span.start:.3f}-{span.end:.3f} s of words {span.first}:{span.last} "
                         f"is empty or outside the {seconds:.3f} s of audio")
    return waveform[first:last]


def _entry_problem(entry: Any, previous_end: float, duration: float | None) -> str | None:
    """Why a ``words`` entry is unusable, or None."""
    if not isinstance(entry, dict):
        return 'is not a {"w", "start", "end"} object'
    if not isinstance(entry.get("w"), str) or not entry["w"].strip():
        return 'has no words in "w"'
    start, end = entry.get("start"), entry.get("end")
    if any(not isinstance(t, (int, float)) or isinstance(t, bool) for t in (start, end)):
        return 'needs numeric "start" and "end" (seconds)'
    if not 0 <= start <= end:
        return "must have 0 <= start <= end"
    if start < previous_end:
        return f"starts before the previous entry ends ({previous_end} s)"
    if duration is not None and end > duration + TIME_TOLERANCE:
        return f"ends after the audio ({duration} s)"
    return None


def validate_words(words: list[dict[str, Any]], duration: float | None, where: str) -> None:
    """Raise ValueError (naming ``where`` and the entry) unless every entry has a non-empty ``"w"`` and
    0 <= start <= end, entries do not overlap (each starts at or after the previous one's end, so speech
    can be cut between them), and none ends past ``duration`` (+ ``TIME_TOLERANCE``)."""
    previous_end = 0.0
    for i, entry in enumerate(words):
        problem = _entry_problem(entry, previous_end, duration)
        if problem:
            raise ValueError(f"{where}: words[{i}] {entry!r} {problem}")
        previous_end = entry["end"]
