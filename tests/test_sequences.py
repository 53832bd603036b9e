"""Interleaved rows: the student's and the teacher's views label the same tokens, one to one."""

import torch

from speechllm.interleave import Span
from speechllm.model import IGNORE_INDEX, SPEECH
from speechllm.sequences import bos_ids, fit_rows_to_context, match_label_counts, span_rows


def plans():
    return [
        [Span("text", 0, 2, "the cat", None, None), Span("speech", 2, 3, "sat on", 0.0, 1.0),
         Span("text", 3, 4, "the mat", None, None)],
        [Span("speech", 0, 1, "we go", 0.0, 1.0), Span("text", 1, 2, "home now", None, None)],
    ]


def labelled(row, labels):
    return [tok for tok, lab in zip(row, labels) if lab != IGNORE_INDEX]


def test_student_and_teacher_label_the_same_tokens(tiny_model):
    m = tiny_model
    speech_lengths = [3, 5]  # vectors of each speech span, in plan order
    s_rows, s_labels = span_rows(m, plans(), speech_lengths)
    t_rows, t_labels = span_rows(m, plans(), None)
    for s_row, s_lab, t_row, t_lab in zip(s_rows, s_labels, t_rows, t_labels):
        assert labelled(s_row, s_lab) == labelled(t_row, t_lab)  # the text-span tokens, in order
        assert s_lab[0] == t_lab[0] == IGNORE_INDEX  # nothing predicts a row's first token
        assert all(lab == IGNORE_INDEX for tok, lab in zip(s_row, s_lab) if tok == SPEECH)
    assert [sum(t == SPEECH for t in r) for r in s_rows] == speech_lengths
    # The teacher reads the speech spans' words, unlabelled.
    ids = m.tokenizer(" sat on", add_special_tokens=False).input_ids
    start = len(bos_ids(m)) + len(m.tokenizer("the cat", add_special_tokens=False).input_ids)
    assert t_rows[0][start:start + len(ids)] == ids and set(t_labels[0][start:start + len(ids)]) == {IGNORE_INDEX}


def test_label_all_labels_every_token_but_the_first(tiny_model):
    rows, labels = span_rows(tiny_model, plans(), None, label_all=True)
    for row, lab in zip(rows, labels):
        assert lab[0] == IGNORE_INDEX and lab[1:] == row[1:]


def test_rows_cut_to_the_context_drop_their_speech_vectors(tiny_model):
    m = tiny_model
    rows = [[1, SPEECH, SPEECH, 2, SPEECH], [SPEECH, 3]]
    labels = [[IGNORE_INDEX, IGNORE_INDEX, IGNORE_INDEX, 2, IGNORE_INDEX], [IGNORE_INDEX, 3]]
    speech = torch.arange(4.0)[:, None]
    limit, m.max_positions = m.max_positions, 3
    try:
        cut_rows, cut_labels, cut_speech, cut = fit_rows_to_context(m, rows, labels, speech)
    finally:
        m.max_positions = limit
    assert cut == 1 and cut_rows == [[1, SPEECH, SPEECH], [SPEECH, 3]]
    assert cut_speech.flatten().tolist() == [0.0, 1.0, 3.0]  # the third vector of row 0 is gone


def test_match_label_counts_keeps_pairs_one_to_one():
    a = [[IGNORE_INDEX, 5, 6, 7], [IGNORE_INDEX, 1]]
    b = [[IGNORE_INDEX, IGNORE_INDEX, 5, 6], [IGNORE_INDEX, 1]]
    match_label_counts(a, b)
    assert a == [[IGNORE_INDEX, 5, 6, IGNORE_INDEX], [IGNORE_INDEX, 1]]
    assert b == [[IGNORE_INDEX, IGNORE_INDEX, 5, 6], [IGNORE_INDEX, 1]]
