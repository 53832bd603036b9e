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
from speechllm.manifest import write_manifest
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
