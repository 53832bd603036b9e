"""The bootstrap intervals next to every held-out measure (``summarise``: gathered per-item rows -> metrics)."""

import pytest

from lightning_modules.evaluation import summarise


def doc(m_sum, m_count, f_sum=0.2, f_count=10):
    return {"m_sum": m_sum, "m_count": m_count, "f_sum": f_sum, "f_count": f_count}


def test_equal_items_give_a_point_interval():
    got = summarise("measure", [doc(3.0, 10) for _ in range(6)])
    for name, value in (("M", 0.3), ("F", 0.02)):
        assert got[f"{name}_low"] == pytest.approx(value) == got[f"{name}_high"] == pytest.approx(got[name])
    mc = summarise("mc", [{"answer": 1, "speech": 1, "text": 1, "text_original": 1}] * 5)
    assert (mc["acc_speech_low"], mc["acc_speech_high"], mc["gap_low"], mc["gap_high"]) == (1.0, 1.0, 0.0, 0.0)
    wer = summarise("wer", [{"ref": "a b", "hyp": "a c"}] * 4, "none")  # one error in two words each
    assert (wer["wer_low"], wer["wer"], wer["wer_high"]) == pytest.approx((0.5, 0.5, 0.5))


def test_the_interval_is_a_ratio_of_sums_over_documents_and_contains_the_value():
    # Per-document M 0.1 .. 0.8 with different lengths: M is the token mean 12 / 36 (not 0.45, the mean
    # of document means); every resample's ratio is a weighted mean of document means: within [0.1, 0.8].
    rows = [doc(0.1 * k * (9 - k), 9 - k) for k in range(1, 9)]
    got = summarise("measure", rows)
    assert got["M"] == pytest.approx(sum(r["m_sum"] for r in rows) / sum(r["m_count"] for r in rows))
    assert 0.1 < got["M_low"] < got["M"] < got["M_high"] < 0.8
    assert got["F_low"] == pytest.approx(0.02) == got["F_high"]  # F equal in every document
    assert summarise("measure", rows) == got  # seeded: every rank, holding the same rows, the same bounds


def test_accuracy_intervals_and_the_paired_gap():
    # Speech right on half the questions, the original LLM on text on exactly the same ones: the
    # accuracies are uncertain, their gap is exactly 0 in every resample.
    rows = [{"answer": 0, "speech": k % 2, "text": 0, "text_original": k % 2} for k in range(20)]
    got = summarise("mc", rows)
    assert got["acc_speech_low"] < got["acc_speech"] == 0.5 < got["acc_speech_high"]
    assert (got["gap_low"], got["gap"], got["gap_high"]) == (0.0, 0.0, 0.0)
    assert (got["acc_text_low"], got["acc_text_high"]) == (1.0, 1.0)


def test_no_items_no_bounds():
    assert set(summarise("measure", [])) == {"M", "F", "M_positions"}
    assert "acc_speech_low" not in summarise("mc", [])
