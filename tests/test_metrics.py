"""WER against hand-counted alignments, and the normalisers."""

from speechllm.metrics import corpus_errors, normalize, word_errors


def test_hand_counted_alignment():
    # ref: the cat sat on the mat / hyp: the cat sit on mat  -> 1 substitution, 1 deletion
    c = word_errors("the cat sat on the mat", "the cat sit on mat")
    assert (c.substitutions, c.deletions, c.insertions, c.ref_words) == (1, 1, 0, 6)
    c = word_errors("a b", "x a b c")
    assert (c.substitutions, c.deletions, c.insertions) == (0, 0, 2)
    assert word_errors("a b c", "").deletions == 3
    assert word_errors("", "a").insertions == 1


def test_corpus_wer_sums_counts_not_rates():
    total, per = corpus_errors(["a b c d", "e"], ["a b c d", "x"], "none")
    assert [p.wer for p in per] == [0.0, 1.0]
    assert total.wer == 1 / 5  # not the mean of per-utterance rates (0.5)


def test_normalisers():
    assert normalize("Hello, World! It's", "tasu") == "hello world its"
    assert normalize("Mr. Smith's  car.", "whisper") == "mister smith is car"  # Whisper's rule expands 's
