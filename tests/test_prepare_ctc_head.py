"""CTC-head preparation on a tiny random Whisper, synthetic clips and a tiny byte-level BPE tokenizer."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
import torch
from transformers import WhisperConfig, WhisperFeatureExtractor, WhisperForConditionalGeneration

from speechllm.encoders.ctc import CTCHead, CTCVocabulary
from speechllm.manifest import load_manifest, write_manifest
from stages import prepare_ctc_head as prep

SR = 16000
TRAIN_TEXTS = ["the cat sat", "a dog ran home", "the red cat", "we saw the dog"]
EVAL_TEXTS = ["the dog sat", "a red cat"]


@pytest.fixture(scope="module")
def whisper_dir(tmp_path_factory) -> Path:
    """A tiny random WhisperForConditionalGeneration saved like the real one (weights + feature extractor)."""
    out = tmp_path_factory.mktemp("whisper")
    config = WhisperConfig(vocab_size=64, d_model=32, encoder_layers=2, encoder_attention_heads=2, encoder_ffn_dim=64,
                           decoder_layers=1, decoder_attention_heads=2, decoder_ffn_dim=64, max_target_positions=32,
                           pad_token_id=0, bos_token_id=1, eos_token_id=1, decoder_start_token_id=2)
    torch.manual_seed(0)
    WhisperForConditionalGeneration(config).save_pretrained(out)
    WhisperFeatureExtractor(feature_size=config.num_mel_bins).save_pretrained(out)
    return out


def _tone(seconds: float, freq: float, seed: int) -> np.ndarray:
    t = np.arange(int(SR * seconds)) / SR
    noise = np.random.default_rng(seed).standard_normal(t.shape)
    return (0.3 * np.sin(2 * np.pi * freq * t) + 0.02 * noise).astype(np.float32)


def _manifest(folder: Path, name: str, texts: list[tuple[str, float]]) -> Path:
    rows = []
    for i, (text, seconds) in enumerate(texts):
        rel = f"wav/{name}-{i}.wav"
        (folder / "wav").mkdir(parents=True, exist_ok=True)
        sf.write(folder / rel, _tone(seconds, 200 + 50 * i, i), SR, subtype="PCM_16")
        rows.append({"id": f"{name}-{i}", "audio": rel, "duration": seconds, "text": text})
    write_manifest(folder / f"{name}.jsonl", rows)
    return folder / f"{name}.jsonl"


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> dict[str, Path]:
    folder = tmp_path_factory.mktemp("speech")
    train = [(t, 1.5) for t in TRAIN_TEXTS]
    # Skipped: a number the units cannot spell, and 0.1 s (5 frames) for 13 characters.
    train += [("room 101 is red", 1.5), ("the cat sat down", 0.1)]
    return {"train": _manifest(folder, "train", train), "eval": _manifest(folder, "dev", [(t, 1.5) for t in EVAL_TEXTS])}


@pytest.fixture(scope="module")
def llm_dir(tmp_path_factory) -> Path:
    """A byte-level BPE tokenizer (SmolLM2's kind) trained on a few sentences."""
    from tokenizers import ByteLevelBPETokenizer
    from transformers import PreTrainedTokenizerFast

    out = tmp_path_factory.mktemp("llm")
    bpe = ByteLevelBPETokenizer()
    bpe.train_from_iterator(TRAIN_TEXTS * 20 + ["The dog's house, by the river."] * 20, vocab_size=300, min_frequency=2)
    PreTrainedTokenizerFast(tokenizer_object=bpe).save_pretrained(out)
    return out


def test_normalize_ctc_text():
    assert prep.normalize_ctc_text("\"It's rock-and-roll, 'mate'!\"  Room 101.") == "it's rock and roll mate room"
    assert prep.normalize_ctc_text("Don\u2019t") == "don't"


def test_llm_units_are_decoded_tokens_after_the_characters(llm_dir):
    texts = ["The dog's house, by the river."] * 3 + TRAIN_TEXTS
    units, token_ids = prep.build_units("llm", texts, llm_dir, max_units=10)
    assert units[: 1 + len(prep.CHARS)] == [prep.BLANK, *prep.CHARS]
    subwords = units[1 + len(prep.CHARS) :]
    assert len(subwords) == 10 and " the" in subwords and len(set(units)) == len(units)
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(llm_dir))
    for unit, token_id in zip(subwords, token_ids[1 + len(prep.CHARS) :]):
        assert tokenizer.decode([token_id]) == unit
    # Greedy longest match spells any normalised text exactly, with subwords where they fit.
    vocab = CTCVocabulary(units, blank_id=0)
    text = prep.normalize_ctc_text("The dog's zebra-house")
    ids = vocab.encode(text)
    assert "".join(units[i] for i in ids) == text and len(ids) < len(text)
    hybrid, _ = prep.build_units("hybrid", texts, llm_dir, max_units=3)
    assert len(hybrid) == 1 + len(prep.CHARS) + 3


def test_feature_cache_is_reused_until_the_manifest_content_changes(data, whisper_dir, tmp_path, monkeypatch):
    first = prep.encode_manifest(data["eval"], whisper_dir, tmp_path)
    assert first.ids == ["dev-0", "dev-1"] and first.lengths.tolist() == [75, 75]
    assert first.feats.shape == (150, 32) and len(list(tmp_path.glob("*.safetensors"))) == 1

    def no_encoder(*args, **kwargs):
        raise AssertionError("re-encoded although the cache is valid")

    with monkeypatch.context() as m:
        m.setattr(prep.WhisperSpeechEncoder, "from_pretrained", no_encoder)
        again = prep.encode_manifest(data["eval"], whisper_dir, tmp_path)
    torch.testing.assert_close(again.feats, first.feats)
    stat = data["eval"].stat()
    data["eval"].write_text(data["eval"].read_text())  # rewritten unchanged, as data preparation does
    os.utime(data["eval"], ns=(stat.st_atime_ns, stat.st_mtime_ns + 10**9))
    with monkeypatch.context() as m:
        m.setattr(prep.WhisperSpeechEncoder, "from_pretrained", no_encoder)
        prep.encode_manifest(data["eval"], whisper_dir, tmp_path)  # same content: the cache holds
    data["eval"].write_text(data["eval"].read_text().replace('"dev-1"', '"dev-1b"'))  # edited
    with monkeypatch.context() as m:
        m.setattr(prep.WhisperSpeechEncoder, "from_pretrained", no_encoder)
        with pytest.raises(AssertionError, match="re-encoded"):
            prep.encode_manifest(data["eval"], whisper_dir, tmp_path)


@pytest.mark.parametrize("units", ["chars", "llm"])
def test_prepare_writes_head_and_report_then_reuses_them(units, data, whisper_dir, llm_dir, tmp_path):
    out = tmp_path / "head"
    kwargs = dict(whisper_dir=whisper_dir, units=units, hidden=16, epochs=2, batch_size=2, llm_dir=llm_dir,
                  max_units=8, cache_dir=tmp_path / "cache")
    report = prep.prepare_ctc_head(data["train"], data["eval"], out, **kwargs)
    assert not report["reused"]
    assert {p.name for p in out.iterdir()} == {"head.json", "head.safetensors", "report.json"}
    assert not list(tmp_path.glob(".head.tmp-*"))
    saved = json.loads((out / "report.json").read_text())
    for field in ("units", "vocab_size", "epochs", "train_seconds", "train_clips", "skipped", "examples", "history"):
        assert field in saved
    assert saved["train_clips"] == 4 and saved["skipped"] == {"digits": 1, "too_short": 1}
    assert saved["vocab_size"] == (29 if units == "chars" else 37) and len(saved["history"]) == 2
    assert {"cer", "wer"} <= saved["eval"].keys() and saved["examples"][0]["ref"] == EVAL_TEXTS[0]

    head = CTCHead.load(out)
    assert head.meta["vocab"][0] == "<blank>" and len(head.meta["vocab"]) == saved["vocab_size"]

    mtime = (out / "head.safetensors").stat().st_mtime_ns
    again = prep.prepare_ctc_head(data["train"], data["eval"], out, **kwargs)
    assert again["reused"] and (out / "head.safetensors").stat().st_mtime_ns == mtime
    assert {k: v for k, v in again.items() if k != "reused"} == saved

    changed = prep.prepare_ctc_head(data["train"], data["eval"], out, **{**kwargs, "epochs": 1})
    assert not changed["reused"] and len(changed["history"]) == 1


def test_head_overfits_a_repeated_tiny_batch():
    """CTC loss falls on one repeated batch and greedy decoding recovers both transcripts."""
    torch.manual_seed(0)
    texts = ["the cat", "a dog"]
    vocab = CTCVocabulary([prep.BLANK, *prep.CHARS], blank_id=0)
    targets = [vocab.encode(t) for t in texts]
    feats = prep.Features(["a", "b"], torch.randn(70, 24).half(), torch.tensor([40, 30]))
    head = CTCHead(24, vocab.units, kind="bilstm", hidden=32)
    optimizer = torch.optim.AdamW(head.parameters(), lr=1e-2)
    x, lengths = feats.batch([0, 1])
    losses = []
    for _ in range(100):
        loss = prep.ctc_loss(head, x, lengths, targets)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < 0.05 * losses[0]
    assert prep.transcribe(head, vocab, feats) == texts


# ---------------------------------------------------------------------------------------------------
# Waveform-augmented copies and extra training speech
# ---------------------------------------------------------------------------------------------------

# The settings of a head trained without --augment-copies / --extra-train: unchanged, so such heads are reused.
PLAIN_SETTINGS = {"units", "max_units", "kind", "hidden", "epochs", "batch_size", "lr", "seed", "augment",
                  "whisper", "train", "eval", "text", "llm"}


def _no_encoder(*args, **kwargs):
    raise AssertionError("re-encoded although the cache is valid")


def test_augmented_copies_are_seeded_cached_and_differ_from_the_clean_clips(data, whisper_dir, tmp_path,
                                                                            monkeypatch):
    clean = prep.encode_manifest(data["train"], whisper_dir, tmp_path)
    first = prep.encode_manifest(data["train"], whisper_dir, tmp_path, copy=1, seed=3)
    second = prep.encode_manifest(data["train"], whisper_dir, tmp_path, copy=2, seed=3)
    assert first.ids == clean.ids == second.ids
    def changed(a: prep.Features, b: prep.Features) -> int:  # clips whose length (speed) or states differ
        return sum(x.shape != y.shape or not torch.equal(x, y) for x, y in zip(map(a.clip, range(len(a))),
                                                                                  map(b.clip, range(len(b)))))

    # prob=1.0 augments every clip, though ~7 % draw no transform at all: most clips change.
    assert changed(clean, first) >= 4 and changed(clean, second) >= 4 and changed(first, second) >= 4
    files = sorted(p.name for p in tmp_path.glob("*.safetensors"))
    assert len(files) == 3 and sum("-aug1-" in f for f in files) == sum("-aug2-" in f for f in files) == 1
    mtimes = {p: p.stat().st_mtime_ns for p in tmp_path.glob("*.safetensors")}

    with monkeypatch.context() as m:
        m.setattr(prep.WhisperSpeechEncoder, "from_pretrained", _no_encoder)
        again = prep.encode_manifest(data["train"], whisper_dir, tmp_path, copy=1, seed=3)
        with pytest.raises(AssertionError, match="re-encoded"):  # another seed is another copy
            prep.encode_manifest(data["train"], whisper_dir, tmp_path, copy=1, seed=4)
    torch.testing.assert_close(again.feats, first.feats)
    assert {p: p.stat().st_mtime_ns for p in tmp_path.glob("*.safetensors")} == mtimes
    # The seed fixes the copy: encoded afresh elsewhere, it is the same.
    fresh = prep.encode_manifest(data["train"], whisper_dir, tmp_path / "elsewhere", copy=1, seed=3)
    torch.testing.assert_close(fresh.feats, first.feats)
    assert torch.equal(fresh.lengths, first.lengths)


def _head_kwargs(whisper_dir, tmp_path, **overrides) -> dict:
    return {"whisper_dir": whisper_dir, "units": "chars", "hidden": 16, "epochs": 1, "batch_size": 2,
            "cache_dir": tmp_path / "cache", **overrides}


def test_augment_copies_double_the_training_set_and_reuse_their_cache(data, whisper_dir, tmp_path, monkeypatch):
    out = tmp_path / "head"
    report = prep.prepare_ctc_head(data["train"], data["eval"], out,
                                   **_head_kwargs(whisper_dir, tmp_path, augment_copies=1))
    assert not report["reused"] and report["augment_copies"] == 1
    assert report["train_clips"] == 8 and report["skipped"] == {"digits": 2, "too_short": 2}
    assert report["train_sources"] == [{"manifest": str(data["train"]), "clips": 6, "copies": 2, "train_clips": 8,
                                        "skipped": {"digits": 2, "too_short": 2}}]
    assert report["settings"]["augment_copies"] == 1
    assert report["settings"]["augment_settings"] == prep.augment_settings()
    assert report["settings"]["augment_settings"]["prob"] == 1.0
    cached = {p: p.stat().st_mtime_ns for p in (tmp_path / "cache").glob("*.safetensors")}
    assert len(cached) == 3 and sum("-aug1-" in p.name for p in cached) == 1  # train, its copy, eval

    with monkeypatch.context() as m:  # another head from the same features: nothing is encoded again
        m.setattr(prep.WhisperSpeechEncoder, "from_pretrained", _no_encoder)
        again = prep.prepare_ctc_head(data["train"], data["eval"], out,
                                      **_head_kwargs(whisper_dir, tmp_path, augment_copies=1, hidden=8))
    assert not again["reused"] and again["train_clips"] == 8
    assert {p: p.stat().st_mtime_ns for p in (tmp_path / "cache").glob("*.safetensors")} == cached


def test_no_augment_copies_keeps_the_settings_of_before(data, whisper_dir, tmp_path):
    out = tmp_path / "head"
    report = prep.prepare_ctc_head(data["train"], data["eval"], out, **_head_kwargs(whisper_dir, tmp_path))
    assert set(report["settings"]) == PLAIN_SETTINGS
    assert report["augment_copies"] == 0 and report["train_clips"] == 4
    assert not any("-aug" in p.name for p in (tmp_path / "cache").iterdir())
    again = prep.prepare_ctc_head(data["train"], data["eval"], out,
                                  **_head_kwargs(whisper_dir, tmp_path, augment_copies=0, extra_train=[]))
    assert again["reused"]
    # A head saved before these options existed (no such report fields) is reused too.
    saved = json.loads((out / "report.json").read_text())
    for field in ("augment_copies", "train_sources"):
        del saved[field]
    (out / "report.json").write_text(json.dumps(saved))
    assert prep.prepare_ctc_head(data["train"], data["eval"], out, **_head_kwargs(whisper_dir, tmp_path))["reused"]


def test_extra_train_adds_its_clips_clean_and_augmented(data, whisper_dir, tmp_path):
    extra = _manifest(tmp_path / "real", "real", [("the dog ran", 1.5), ("we saw a cat", 1.5)])
    out = tmp_path / "head"
    report = prep.prepare_ctc_head(data["train"], data["eval"], out,
                                   **_head_kwargs(whisper_dir, tmp_path, extra_train=[extra]))
    assert report["train_clips"] == 4 + 2
    assert [s["manifest"] for s in report["train_sources"]] == [str(data["train"]), str(extra)]
    assert report["train_sources"][1] == {"manifest": str(extra), "clips": 2, "copies": 1, "train_clips": 2,
                                          "skipped": {}}
    assert report["settings"]["extra_train"] == [prep._file_key(extra)] and "augment_copies" not in report["settings"]
    both = prep.prepare_ctc_head(data["train"], data["eval"], out,
                                 **_head_kwargs(whisper_dir, tmp_path, extra_train=[extra], augment_copies=1))
    assert not both["reused"] and both["train_clips"] == 2 * (4 + 2)
    assert [s["copies"] for s in both["train_sources"]] == [2, 2] and both["train_sources"][1]["train_clips"] == 4


def test_feature_set_batches_clips_of_several_parts():
    a = prep.Features(["a0", "a1"], torch.arange(10.0).repeat(2, 1).T.half(), torch.tensor([3, 7]))
    b = prep.Features(["b0"], torch.full((4, 2), -1.0).half(), torch.tensor([4]))
    both = prep.FeatureSet([a.subset([1]), b])
    assert len(both) == 2 and both.ids == ["a1", "b0"] and both.lengths.tolist() == [7, 4]
    feats, lengths = both.batch([1, 0])
    assert lengths.tolist() == [4, 7] and feats.shape == (2, 7, 2)
    torch.testing.assert_close(feats[0, :4], torch.full((4, 2), -1.0))
    torch.testing.assert_close(feats[1, :, 0], torch.arange(3.0, 10.0))


def test_an_augmented_copy_past_whispers_window_is_skipped(data, whisper_dir, tmp_path, monkeypatch):
    """Slowing a clip down can take it past 30 s: that copy gets no frames and is not trained on."""
    augment = prep.augment_seeded

    def slowed(wave, sample_rate, cfg, seed):
        if seed == prep.augment_seed(0, 0, 1):  # the first clip's copy: longer than 30 s
            return torch.zeros(31 * sample_rate)
        return augment(wave, sample_rate, cfg, seed)

    monkeypatch.setattr(prep, "augment_seeded", slowed)
    copy = prep.encode_manifest(data["train"], whisper_dir, tmp_path, copy=1)
    assert copy.lengths[0] == 0 and (copy.lengths[1:] > 0).all()
    vocab = CTCVocabulary([prep.BLANK, *prep.CHARS], blank_id=0)
    keep, _, skipped = prep.ctc_targets(vocab, load_manifest(data["train"]), copy.lengths)
    assert keep == [1, 2, 3] and skipped == {"too_long": 1, "digits": 1, "too_short": 1}


def test_a_recording_past_whispers_window_is_skipped_not_fatal(data, whisper_dir, tmp_path):
    """A real-speech prompt can be longer than 30 s as recorded: it gets no frames, like a slowed copy."""

    rows = [json.loads(line) for line in Path(data["train"]).read_text().splitlines()]
    for row in rows:
        row["audio"] = str((Path(data["train"]).parent / row["audio"]).resolve())
    sf.write(tmp_path / "long.wav", np.zeros(31 * 16000, dtype=np.float32), 16000)
    rows.append({"id": "long", "audio": str(tmp_path / "long.wav"), "text": "a long message", "duration": 31.0})
    manifest = tmp_path / "with-long.jsonl"
    manifest.write_text("".join(json.dumps(r) + "\n" for r in rows))
    clean = prep.encode_manifest(manifest, whisper_dir, tmp_path / "cache")
    assert clean.lengths[-1] == 0 and (clean.lengths[:-1] > 0).all()
