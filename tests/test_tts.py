"""The TTS wrappers (real engines, skipped where not installed) and the resampler."""

import math

import numpy as np
import pytest
import soundfile as sf
import torch

from speechllm import tts
from speechllm.tts import (
    TTSUnavailableError,
    get_voice,
    normalize_text,
    resample,
    synthesize_spans,
    synthesize_to_file,
)


def voice_or_skip(spec: str) -> tts.TTSVoice:
    try:
        return get_voice(spec)
    except TTSUnavailableError as err:
        pytest.skip(str(err))


@pytest.mark.parametrize(
    "spec",
    [
        "espeak-ng:en-us+m3",
        "flite:kal16",
        "flite:slt",
        "festival:kal",
        "festival:slt-hts",
        "piper:joe",
    ],
)
def test_engine_synthesizes_16khz(spec, tmp_path):
    voice = voice_or_skip(spec)
    path = tmp_path / "out.wav"
    duration = synthesize_to_file(voice, "The quick brown fox jumps over the lazy dog.", path)
    info = sf.info(path)
    assert (info.samplerate, info.channels, info.subtype) == (16000, 1, "PCM_16")
    assert info.duration == pytest.approx(duration)
    assert 1.0 < duration < 6.0
    wav, _ = sf.read(path, dtype="float32")
    assert np.abs(wav).max() > 0.05  # not silence
    assert not list(tmp_path.glob("*.part"))


def test_awkward_text_is_passed_safely():
    voice = voice_or_skip("espeak-ng:en-us")
    # a leading '-' must not be read as an option, and newlines/tabs must not split the utterance
    wav, sr = voice.synthesize("-v  hello\n\tworld")
    assert sr == 22050 and wav.dtype == np.float32 and wav.ndim == 1 and len(wav) > sr // 2
    with pytest.raises(ValueError, match="empty"):
        voice.synthesize(" \n ")


def test_festival_survives_punctuation_only_utterances():
    voice = voice_or_skip("festival:kal")
    for text in [
        "... Had this been an emergency",
        "Hello! ... world",
        "-- hello",
    ]:  # used to segfault
        wav, sr = voice.synthesize(text)
        assert sr == 16000 and len(wav) > sr // 2
    with pytest.raises(ValueError, match="nothing"):
        voice.synthesize("!!!")


def test_normalize_text():
    assert normalize_text("  a\nb\t\tc  \r\n d ") == "a b c d"


def test_spec_parsing_and_names():
    voice = voice_or_skip("espeak-ng:en-gb,speed=150,pitch=40")
    assert (voice.speed, voice.pitch) == (150, 40)
    assert voice.name == "espeak-ng:en-gb,speed=150,pitch=40"
    assert get_voice("espeak-ng:en-us,speed=175").name == "espeak-ng:en-us"  # defaults are dropped
    for bad, message in [
        ("nope:x", "ENGINE:VOICE"),
        ("flite", "ENGINE:VOICE"),
        ("flite:kal", "kal16"),
        ("festival:rab", "known: kal, slt-hts"),
        ("espeak-ng:en-us,speed", "key=INTEGER"),
        ("espeak-ng:xx-nope", "no voice"),
    ]:
        with pytest.raises(ValueError, match=message):
            get_voice(bad)
    voice_or_skip("flite:slt")
    with pytest.raises(ValueError, match="speed"):
        get_voice("flite:slt,speed=120")


def test_missing_program_names_the_apt_package(monkeypatch):
    monkeypatch.setattr(tts.shutil, "which", lambda program: None)
    with pytest.raises(TTSUnavailableError, match="apt-get install flite"):
        get_voice("flite:slt")
    with pytest.raises(TTSUnavailableError, match="apt-get install festival"):
        get_voice("festival:kal")
    assert "flite" not in tts.available_engines()


def test_missing_festival_voice_names_the_apt_package(monkeypatch, tmp_path):
    voice_or_skip("festival:kal")
    monkeypatch.setattr(tts.FestivalVoice, "voice_root", tmp_path)
    with pytest.raises(TTSUnavailableError, match="apt-get install festvox-us-slt-hts"):
        get_voice("festival:slt-hts")


def test_available_engines_match_installed_programs():
    for engine in tts.available_engines():
        assert engine in tts.ENGINES


def _sine(freq: float, sr: int, seconds: float = 0.5) -> np.ndarray:
    return np.sin(2 * math.pi * freq * np.arange(int(sr * seconds)) / sr).astype(np.float32)


@pytest.mark.parametrize(
    "sr_in, sr_out", [(22050, 16000), (32000, 16000), (8000, 16000), (16000, 16000)]
)
def test_resample_keeps_a_sine(sr_in, sr_out):
    freq = 440.0
    out = resample(_sine(freq, sr_in), sr_in, sr_out)
    assert isinstance(out, np.ndarray) and out.dtype == np.float32
    assert len(out) == math.ceil(len(_sine(freq, sr_in)) * sr_out / sr_in)
    # away from the edges (where the filter sees zero padding) it is the same sine at the new rate
    expected = _sine(freq, sr_out)[: len(out)]
    middle = slice(sr_out // 50, -sr_out // 50)
    assert np.abs(out[middle] - expected[middle]).max() < 2e-3
    spectrum = np.abs(np.fft.rfft(out))
    assert np.fft.rfftfreq(len(out), 1 / sr_out)[spectrum.argmax()] == pytest.approx(freq, abs=3)


def test_resample_removes_what_the_new_rate_cannot_hold():
    # 10 kHz is above 16 kHz's Nyquist rate: it must be filtered out, not folded back to 6 kHz
    out = resample(_sine(10000.0, 32000), 32000, 16000)
    assert np.sqrt(np.mean(out[400:-400] ** 2)) < 1e-2


def test_resample_torch_batched():
    x = torch.from_numpy(np.stack([_sine(300.0, 22050), _sine(500.0, 22050)]))
    out = resample(x, 22050, 16000)
    assert isinstance(out, torch.Tensor) and out.shape == (2, 8000)
    assert torch.allclose(out[1], torch.from_numpy(resample(x[1].numpy(), 22050, 16000)), atol=1e-6)


def test_synthesize_spans_boundaries():
    voice = voice_or_skip("espeak-ng:en-us")
    spans = ["the quick brown fox", "jumps over\nthe lazy dog", "and runs away"]
    wav, sr, segments = synthesize_spans(voice, spans)
    assert sr == 16000 and wav.dtype == np.float32
    assert [s["w"] for s in segments] == [
        "the quick brown fox",
        "jumps over the lazy dog",
        "and runs away",
    ]
    assert segments[0]["start"] == 0
    for a, b in zip(segments, segments[1:]):
        assert a["start"] < a["end"] == b["start"]
    assert segments[-1]["end"] == pytest.approx(len(wav) / sr)
    # each span is exactly its own utterance: cutting at a boundary gives that span's audio back
    alone = resample(*voice.synthesize(spans[1]), 16000)
    cut = wav[round(segments[1]["start"] * sr) : round(segments[1]["end"] * sr)]
    assert np.array_equal(cut, alone)
