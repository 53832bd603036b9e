"""CTC forced alignment against brute force, word times, per-word units, and the word-times stage."""

import itertools
import json
import math

import pytest
import soundfile as sf
import torch

from speechllm.encoders.ctc import CTCVocabulary
from speechllm.forced_alignment import ctc_forced_align, units_per_word, word_times
from speechllm.interleave import validate_words
from speechllm.manifest import load_manifest


def collapse(path: list[int], blank: int) -> list[int]:
    return [u for i, u in enumerate(path) if u != blank and (i == 0 or u != path[i - 1])]


def path_of(spans: list[tuple[int, int]], targets: list[int], frames: int, blank: int) -> list[int]:
    """The frame labels an alignment stands for: each unit on its frames, blank elsewhere."""
    path = [blank] * frames
    for (first, last), unit in zip(spans, targets):
        path[first : last + 1] = [unit] * (last - first + 1)
    return path


def score(log_probs: torch.Tensor, path: list[int]) -> float:
    return sum(float(log_probs[t, u]) for t, u in enumerate(path))


def brute_force_best(log_probs: torch.Tensor, targets: list[int], blank: int) -> float:
    """The best score over every label sequence of T frames that collapses to the targets."""
    frames, vocab = log_probs.shape
    paths = [p for p in itertools.product(range(vocab), repeat=frames) if collapse(list(p), blank) == targets]
    scores = log_probs.double()[torch.arange(frames), torch.tensor(paths)].sum(-1)
    return float(scores.max())


@pytest.mark.parametrize("targets,vocab,blank", [
    ([1], 3, 0), ([1, 2], 3, 0), ([1, 1], 3, 0), ([2, 1, 2], 4, 0), ([1, 1, 2], 3, 0), ([0, 1, 0], 4, 3),
])
def test_viterbi_matches_brute_force_over_all_paths(targets, vocab, blank):
    g = torch.Generator().manual_seed(len(targets) * 10 + vocab)
    needed = len(targets) + sum(a == b for a, b in zip(targets, targets[1:]))
    for frames in range(needed, 8 if vocab == 3 else 7):
        for _ in range(3):
            log_probs = torch.randn(frames, vocab, generator=g).mul(2).log_softmax(-1)
            spans = ctc_forced_align(log_probs, targets, blank)
            path = path_of(spans, targets, frames, blank)
            assert collapse(path, blank) == targets  # a valid CTC path for the targets ...
            assert all(path[first] == u and path[last] == u for (first, last), u in zip(spans, targets))
            assert math.isclose(score(log_probs, path), brute_force_best(log_probs, targets, blank),
                                rel_tol=1e-6)  # ... and the best one


def peaked(path: list[int], vocab: int, peak: float = 0.9) -> torch.Tensor:
    probs = torch.full((len(path), vocab), (1 - peak) / (vocab - 1))
    probs[torch.arange(len(path)), torch.tensor(path)] = peak
    return probs.log()


def test_peaked_posteriors_give_back_their_frames():
    # frames: 0-1 blank, 2-4 unit 1, 5 blank, 6-7 unit 2, 8 blank, 9 unit 2, 10-11 unit 3, 12 blank
    path = [0, 0, 1, 1, 1, 0, 2, 2, 0, 2, 3, 3, 0]
    assert ctc_forced_align(peaked(path, 5), [1, 2, 2, 3], blank=0) == [(2, 4), (6, 7), (9, 9), (10, 11)]


def test_too_few_frames_raise_with_the_numbers():
    with pytest.raises(ValueError, match=r"5 frames \(T\).*at least 6 frames"):
        ctc_forced_align(torch.zeros(5, 3).log_softmax(-1), [1, 1, 2, 2], blank=0)  # 4 units + 2 repeats
    with pytest.raises(ValueError, match="blank"):
        ctc_forced_align(torch.zeros(4, 3).log_softmax(-1), [1, 0], blank=0)


def test_word_times_in_seconds():
    # word 1 = units 1,2 on frames 1-2 and 4-6; word 2 = "42", no units; word 3 = unit 3 on frames 8-9.
    path = [0, 1, 1, 0, 2, 2, 2, 0, 3, 3, 0]
    times = word_times(peaked(path, 4), [[1, 2], [], [3]], blank=0, frame_seconds=0.02)
    torch.testing.assert_close(torch.tensor(times), torch.tensor([[0.02, 0.14], [0.14, 0.14], [0.16, 0.20]]))
    leading = word_times(peaked(path, 4), [[], [1, 2, 3]], blank=0, frame_seconds=0.1)
    torch.testing.assert_close(torch.tensor(leading), torch.tensor([[0.1, 0.1], [0.1, 1.0]]))


CHARS = ["<blank>", " ", *"abcdefghijklmnopqrstuvwxyz'"]


@pytest.mark.parametrize("units", [
    CHARS,
    [*CHARS, "the", " the", " cat", "cat", " sat", "at", " on", "on"],  # LLM-like units with their spaces
])
def test_units_per_word_concatenate_to_the_text_encoding(units):
    vocab = CTCVocabulary(units, blank_id=0)
    text = "The cat sat on the mat, don't-stop 42 cats."
    per_word = units_per_word(vocab.encode, text.split())
    assert len(per_word) == len(text.split())
    assert [u for word in per_word for u in word] == vocab.encode(text)
    assert per_word[7] == []  # "42": the vocabulary cannot spell digits
    assert vocab.unit_string(per_word[1][0]).startswith(" ")  # "cat" follows a space ...
    assert not vocab.unit_string(per_word[0][0]).startswith(" ")  # ... "The" does not


def test_units_per_word_with_a_transformers_ctc_tokenizer(tmp_path):
    from transformers import Wav2Vec2CTCTokenizer

    ids = {"<pad>": 0, "|": 1, **{c: i + 2 for i, c in enumerate("abcdefghijklmnopqrstuvwxyz'")}}
    (tmp_path / "vocab.json").write_text(json.dumps(ids))
    vocab = CTCVocabulary.from_tokenizer(Wav2Vec2CTCTokenizer(str(tmp_path / "vocab.json")), 0, len(ids))
    text = "The cat's don't-stop 42 now."
    per_word = units_per_word(vocab.encode, text.split())
    assert [u for word in per_word for u in word] == vocab.encode(text)
    assert [len(w) for w in per_word] == [3, 6, 11, 0, 4]  # "|" leads every word after the first


def test_units_that_change_across_words_raise():
    with pytest.raises(ValueError, match="cannot be split by word"):
        units_per_word(lambda text: [len(text)], ["ab", "cd"])


def test_stage_writes_word_times_and_counts_the_clips_it_cannot_align(repo, tmp_path, capsys):
    from stages.prepare_tiny_data import prepare_tiny_data
    from stages.prepare_word_times import main

    manifest = prepare_tiny_data(tmp_path / "data", n_text=2, n_speech=3)["speech"]
    with open(manifest, encoding="utf-8") as f:
        rows = [json.loads(line) for line in f]
    first = rows[0]
    rows += [{**first, "id": "digits", "text": "42 17"},  # no unit spells it
             {**first, "id": "long", "text": " ".join(["abcdefghij"] * 20)},  # 219 units, <= 160 frames
             {**first, "id": "stale", "words": [{"w": "old", "start": 0.0, "end": 0.1}]}]
    rows[1]["speaker"] = "kept"
    with open(manifest, "w", encoding="utf-8") as f:
        f.writelines(json.dumps(r) + "\n" for r in rows)
    out = tmp_path / "aligned" / "words.jsonl"

    assert main(["--pipeline", str(repo / "configs/pipeline/tiny.yaml"), "--manifest", manifest, "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "word times for 4 of 6 clips" in printed and "no_units 1, too_short 1" in printed

    items = {u.id: u for u in load_manifest(out, require_audio=True)}  # audio paths valid from the new folder
    assert set(items) == {r["id"] for r in rows} and items["s001"].speaker == "kept"
    assert items["digits"].words is None and items["long"].words is None
    for utt in items.values():
        if utt.id in ("digits", "long"):
            continue
        assert [w["w"] for w in utt.words] == utt.text.split()
        validate_words(utt.words, sf.info(str(utt.audio)).duration, where=f"{out}:{utt.id}")
    assert items["stale"].words[0]["w"] != "old"
