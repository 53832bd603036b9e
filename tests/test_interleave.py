"""SALAD span plan: coverage, ranges, whole entries, uniform lengths; speech cuts; word validation."""

from collections import Counter

import pytest
import torch
from scipy.stats import chisquare

from speechllm.interleave import Span, cut_speech, plan_spans, validate_words


def entries(counts: list[int], seconds_per_word: float = 0.5) -> list[dict]:
    """Entries holding ``counts[i]`` words each, back to back in time."""
    out, t, n = [], 0.0, 0
    for c in counts:
        out.append({"w": " ".join(f"w{n + k}" for k in range(c)), "start": t, "end": t + c * seconds_per_word})
        t += c * seconds_per_word
        n += c
    return out


def n_words(words: list[dict], span: Span) -> int:
    return sum(len(e["w"].split()) for e in words[span.first : span.last])


def random_counts(g: torch.Generator, n: int, most: int) -> list[int]:
    return torch.randint(1, most + 1, (n,), generator=g).tolist()


def test_spans_cover_every_entry_in_order_and_alternate():
    g = torch.Generator().manual_seed(0)
    for _ in range(200):
        words = entries(random_counts(g, int(torch.randint(1, 60, (1,), generator=g)), most=4))
        spans = plan_spans(words, generator=g)
        assert spans[0].first == 0 and spans[-1].last == len(words)
        for a, b in zip(spans, spans[1:]):
            assert a.last == b.first and a.kind != b.kind
        for s in spans:
            assert s.first < s.last
            assert s.text.split() == [w for e in words[s.first : s.last] for w in e["w"].split()]
            if s.kind == "speech":
                assert (s.start, s.end) == (words[s.first]["start"], words[s.last - 1]["end"])
            else:
                assert s.start is None and s.end is None


def test_single_word_entries_give_spans_within_the_ranges_except_the_last():
    g = torch.Generator().manual_seed(1)
    for _ in range(100):
        words = entries([1] * int(torch.randint(1, 120, (1,), generator=g)))
        spans = plan_spans(words, generator=g)
        for s in spans[:-1]:
            low, high = (5, 15) if s.kind == "speech" else (10, 30)
            assert low <= s.last - s.first <= high
        low, high = (5, 15) if spans[-1].kind == "speech" else (10, 30)
        assert spans[-1].last - spans[-1].first <= high


def test_multi_word_entries_are_never_split_and_never_overflow_the_maximum():
    g = torch.Generator().manual_seed(2)
    for _ in range(200):
        words = entries(random_counts(g, 40, most=8))
        spans = plan_spans(words, generator=g)
        for s, following in zip(spans, spans[1:] + [None]):
            low, high = (5, 15) if s.kind == "speech" else (10, 30)
            count = n_words(words, s)
            assert count <= high or s.last - s.first == 1  # only a lone entry may exceed the maximum
            if following is not None and count < low:  # stopped short: the next entry did not fit
                assert count + len(words[s.last]["w"].split()) > high


def test_hand_worked_plans():
    # Two-word entries, text target 4 (reached by two entries), speech target 3 (a third entry would
    # make 4 > 3: the span stops at 2 words).
    words = entries([2] * 7)
    spans = plan_spans(words, text_words=(4, 4), speech_words=(3, 3), first_kind="text")
    assert [(s.kind, s.first, s.last) for s in spans] == [
        ("text", 0, 2), ("speech", 2, 3), ("text", 3, 5), ("speech", 5, 6), ("text", 6, 7)]
    assert spans[1].text == "w4 w5" and (spans[1].start, spans[1].end) == (2.0, 3.0)
    # An entry longer than the maximum is a span alone; an entry that overshoots the target within
    # the maximum is taken (a target of 10-15 words: 4 + 7 = 11 <= 15, 11 + 9 > 15).
    spans = plan_spans(entries([20, 4, 7, 9]), speech_words=(10, 10), text_words=(1, 1), first_kind="speech")
    assert [(s.kind, s.first, s.last) for s in spans] == [("speech", 0, 1), ("text", 1, 2), ("speech", 2, 3),
                                                          ("text", 3, 4)]
    spans = plan_spans(entries([4, 7, 9]), speech_words=(10, 15), first_kind="speech")
    assert [(s.first, s.last) for s in spans] == [(0, 2), (2, 3)]


def test_span_lengths_are_uniform_over_each_range():
    g = torch.Generator().manual_seed(3)
    lengths = {"text": Counter(), "speech": Counter()}
    for _ in range(300):
        spans = plan_spans(entries([1] * 200), generator=g)
        for s in spans[:-1]:
            lengths[s.kind][s.last - s.first] += 1
    for kind, (low, high) in (("text", (10, 30)), ("speech", (5, 15))):
        assert set(lengths[kind]) == set(range(low, high + 1))
        observed = [lengths[kind][n] for n in range(low, high + 1)]
        assert chisquare(observed).pvalue > 1e-3, (kind, observed)


def test_first_kind_is_a_fair_coin_unless_given():
    firsts = Counter(plan_spans(entries([1] * 20), generator=torch.Generator().manual_seed(s))[0].kind
                     for s in range(400))
    assert abs(firsts["text"] / 400 - 0.5) < 0.08
    assert plan_spans(entries([1] * 20), first_kind="speech")[0].kind == "speech"
    with pytest.raises(ValueError, match="first_kind"):
        plan_spans(entries([1] * 20), first_kind="audio")


def test_plans_are_deterministic_given_the_generator():
    words = entries([1, 2, 3] * 30)
    a = plan_spans(words, generator=torch.Generator().manual_seed(7))
    b = plan_spans(words, generator=torch.Generator().manual_seed(7))
    c = plan_spans(words, generator=torch.Generator().manual_seed(8))
    assert a == b and a != c


def test_cut_speech_takes_the_span_samples():
    wav = torch.arange(100, dtype=torch.float32)  # 10 s at 10 Hz
    span = Span("speech", 0, 2, "a b", 2.0, 3.5)
    assert cut_speech(wav, 10, span).tolist() == list(range(20, 35))
    assert cut_speech(wav, 10, Span("speech", 0, 1, "a", 9.5, 10.01)).tolist() == list(range(95, 100))
    for start, end in ((3.0, 3.0), (9.0, 10.5), (-1.0, 2.0)):
        with pytest.raises(ValueError, match=f"{start:.3f}-{end:.3f} s"):
            cut_speech(wav, 10, Span("speech", 0, 1, "a", start, end))
    with pytest.raises(ValueError, match="no times"):
        cut_speech(wav, 10, Span("text", 0, 1, "a", None, None))


def test_validate_words_names_the_place_and_the_entry():
    good = entries([1, 2, 1])
    validate_words(good, duration=2.0, where="m.jsonl:3")
    validate_words(good + [{"w": "x", "start": 2.0, "end": 2.0}], duration=None, where="m.jsonl:3")
    bad_cases = {
        "no words": [*good[:1], {"w": "  ", "start": 0.5, "end": 0.6}],
        "start <= end": [*good[:1], {"w": "x", "start": 0.9, "end": 0.7}],
        "before the previous": [*good[:1], {"w": "x", "start": 0.4, "end": 0.7}],
        "after the audio": [*good[:1], {"w": "x", "start": 0.5, "end": 2.5}],
        "numeric": [*good[:1], {"w": "x", "start": "0.5", "end": 0.7}],
    }
    for why, words in bad_cases.items():
        with pytest.raises(ValueError, match=rf"m\.jsonl:3: words\[1\] .*{why}"):
            validate_words(words, duration=2.0, where="m.jsonl:3")


def test_speech_spans_need_times():
    with pytest.raises(ValueError, match=r"words\[0\].*'start'/'end'"):
        plan_spans([{"w": "no times here"}], first_kind="speech")
    assert plan_spans([{"w": "no times here"}], first_kind="text")[0].text == "no times here"
