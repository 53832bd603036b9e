"""Joint CTC/LLM decoding: the CTC likelihood against a sum over every alignment written out, the
choice rule, and the model's joint path on a tiny model (which candidate wins, and why)."""

import itertools
import math

import pytest
import torch

from speechllm.config import GenerationConfig
from speechllm.joint_decoding import IMPOSSIBLE, ctc_log_likelihood, joint_best


def collapse(path: tuple[int, ...], blank: int) -> list[int]:
    out, prev = [], None
    for unit in path:
        if unit != prev and unit != blank:
            out.append(unit)
        prev = unit
    return out


def brute_force(log_probs: torch.Tensor, units: list[int], blank: int) -> float:
    """log of the sum, over every frame path that collapses to ``units``, of its probability."""
    frames, vocab = log_probs.shape
    total = sum(math.exp(sum(float(log_probs[t, u]) for t, u in enumerate(path)))
                for path in itertools.product(range(vocab), repeat=frames) if collapse(path, blank) == units)
    return math.log(total) if total > 0 else -math.inf


@pytest.mark.parametrize("units", [[1], [2, 1], [1, 1], [1, 2, 1], []])
def test_ctc_log_likelihood_is_the_sum_over_alignments(units):
    log_probs = torch.randn(5, 3, generator=torch.Generator().manual_seed(len(units))).log_softmax(-1)
    assert ctc_log_likelihood(log_probs, units, blank=0) == pytest.approx(brute_force(log_probs, units, 0), abs=1e-4)


def test_more_units_than_frames_allow_is_impossible():
    log_probs = torch.randn(3, 4).log_softmax(-1)
    assert ctc_log_likelihood(log_probs, [1, 1, 1], blank=0) == IMPOSSIBLE  # needs 5 frames
    assert ctc_log_likelihood(log_probs, [1, 2, 3, 1], blank=0) == IMPOSSIBLE


def test_joint_best_weighs_the_two_scores():
    llm, ctc = [-1.0, -5.0, -3.0], [-9.0, -1.0, -2.0]
    assert joint_best(llm, ctc, 0.0) == 0 and joint_best(llm, ctc, 1.0) == 1
    assert joint_best(llm, ctc, 0.5) == 2  # -5.5, -3.0, -2.5
    assert joint_best([-1.0, -1.0], [-2.0, -2.0], 0.5) == 0  # ties: the first (the head's own reading)


def test_an_impossible_candidate_never_wins_and_weight_zero_ignores_it():
    assert joint_best([-1.0, -4.0], [IMPOSSIBLE, -3.0], 0.3) == 1
    assert joint_best([-1.0, -4.0], [IMPOSSIBLE, -3.0], 0.0) == 0  # no nan from 0 * -inf


@pytest.mark.parametrize("weight", [-0.1, 1.5])
def test_a_weight_outside_zero_one_is_refused(weight):
    with pytest.raises(ValueError, match="ctc_weight"):
        GenerationConfig(ctc_weight=weight)
    with pytest.raises(ValueError, match="ctc_weight"):
        joint_best([0.0], [0.0], weight)


@pytest.fixture
def model(tiny_model):
    """The session's tiny model in eval mode, its mode restored after."""
    was_training = tiny_model.training
    yield tiny_model.eval()
    tiny_model.train(was_training)


def waves(n: int) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(3)
    return [0.1 * torch.randn(4000 + 1600 * i, generator=g) for i in range(n)]


def test_transcript_log_probs_equal_the_training_loss(model):
    m = model
    feats, lengths = m.encoder.encode_speech(waves(1))
    speech, speech_lengths = m.project(feats, lengths)
    text = "abc ab"
    n_tokens = len(m.target_ids([text])[0])
    ce = float(m(feats, lengths, m.target_ids([text]))["ce"])
    assert m.transcript_log_probs(speech, speech_lengths, [text])[0] == pytest.approx(-ce * n_tokens, rel=1e-4)


@pytest.mark.parametrize("weight", [1.0, 0.5])
def test_joint_decoding_picks_the_best_scored_candidate(model, weight):
    """The candidates are the head's greedy transcript and the LLM's own (beam 1); the winner has the best
    joint score, and its source says whose it is."""
    m = model
    clips = waves(3)
    greedy = m.encoder.greedy_transcribe(clips)
    llm = m.transcribe(clips, GenerationConfig(max_new_tokens=8))
    joint = m.transcribe_with_sources(clips, GenerationConfig(max_new_tokens=8, ctc_weight=weight))
    probs, frames = m.encoder.posteriors(clips)
    feats, lengths = m.encoder.compress(probs, frames)
    speech, speech_lengths = m.project(feats, lengths)
    for i, (text, source) in enumerate(joint):
        candidates = list(dict.fromkeys([greedy[i], llm[i]]))
        assert text in candidates and (source == "ctc") == (text == greedy[i])
        one = speech[i:i + 1, : speech_lengths[i]].expand(len(candidates), -1, -1)
        lp = m.transcript_log_probs(one, speech_lengths[i:i + 1].expand(len(candidates)), candidates)
        ctc = m.encoder.ctc_log_likelihoods(probs[i], int(frames[i]), candidates)
        scores = [(1 - weight) * a + weight * b for a, b in zip(lp, ctc)]
        assert scores[candidates.index(text)] == pytest.approx(max(scores))
    assert [t for t, _ in joint] == [m.transcribe_with_sources([c], GenerationConfig(max_new_tokens=8, ctc_weight=weight))[0][0]
                                     for c in clips]  # batched equals one by one


def test_all_blank_frames_keep_each_clip_its_least_blank_frame(model):
    """Silence leaves LSD nothing; compress (shared by encode_speech and joint decoding) keeps one frame."""
    probs = torch.zeros(2, 6, m_units := model.encoder.output_dim)
    probs[..., model.encoder.blank_id] = 1.0
    probs[1, 3] = 1.0 / m_units  # clip 1's least-blank frame
    threshold, model.encoder.blank_threshold = model.encoder.blank_threshold, 0.5  # (tiny.yaml keeps all)
    try:
        feats, lengths = model.encoder.compress(probs, torch.tensor([6, 6]))
    finally:
        model.encoder.blank_threshold = threshold
    assert lengths.tolist() == [1, 1]
    torch.testing.assert_close(feats[1, 0], probs[1, 3])
