"""CTCVocabulary: text normalisation and unit splitting, checked by hand."""

from __future__ import annotations

from speechllm.encoders.ctc import CTCVocabulary

WAV2VEC2_UNITS = ["<pad>", "<s>", "</s>", "<unk>", "|", "E", "T", "'", "A", "S", "I"]


def test_wav2vec2_style_vocabulary_spells_spaces_with_its_delimiter():
    vocab = CTCVocabulary(WAV2VEC2_UNITS, blank_id=0)
    assert vocab.case == "upper"
    assert vocab.alphabet == {" ", "E", "T", "'", "A", "S", "I"}  # special tokens spell nothing
    # "eat tea" -> E A T | T E A, by hand
    assert vocab.encode("eat tea") == [5, 8, 6, 4, 6, 5, 8]


def test_normalize_turns_what_the_units_cannot_spell_into_word_breaks():
    vocab = CTCVocabulary(WAV2VEC2_UNITS, blank_id=0)
    assert vocab.normalize("Eat-a \u201ctea\u201d, it\u2019s 12 'seats'!") == "EAT A TEA IT'S SEATS"
    assert vocab.encode("tea!") == vocab.encode("TEA")


def test_subword_units_match_longest_first_and_keep_their_leading_space():
    units = ["<blank>", " ", *"abcdefghijklmnopqrstuvwxyz", "'", " the", "the", " cat", "at"]
    vocab = CTCVocabulary(units, blank_id=0)
    ids = vocab.encode("The cat, the hat.")
    assert [vocab.unit_string(i) for i in ids] == ["the", " cat", " the", " ", "h", "at"]
