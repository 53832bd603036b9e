"""The TTS wrappers (real engines: skipped where not installed, failing under CI=true; tiny random
transformers models) and the resampler."""

import json
import math
import os
import subprocess
import sys
from pathlib import Path

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
def test_engine_synthesizes_16khz(spec, tmp_path, tts_voice):
    voice = tts_voice(spec)
    path = tmp_path / "out.wav"
    duration = synthesize_to_file(voice, "The quick brown fox jumps over the lazy dog.", path)
    info = sf.info(path)
    assert (info.samplerate, info.channels, info.subtype) == (16000, 1, "PCM_16")
    assert info.duration == pytest.approx(duration)
    assert 1.0 < duration < 6.0
    wav, _ = sf.read(path, dtype="float32")
    assert np.abs(wav).max() > 0.05  # not silence
    assert not list(tmp_path.glob(".*.tmp"))


def test_awkward_text_is_passed_safely(tts_voice):
    voice = tts_voice("espeak-ng:en-us")
    # a leading '-' must not be read as an option, and newlines/tabs must not split the utterance
    wav, sr = voice.synthesize("-v  hello\n\tworld")
    assert sr == 22050 and wav.dtype == np.float32 and wav.ndim == 1 and len(wav) > sr // 2
    with pytest.raises(ValueError, match="empty"):
        voice.synthesize(" \n ")


def test_festival_survives_punctuation_only_utterances(tts_voice):
    voice = tts_voice("festival:kal")
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


def test_spec_parsing_and_names(tts_voice):
    voice = tts_voice("espeak-ng:en-gb,speed=150,pitch=40")
    assert (voice.speed, voice.pitch) == (150, 40)
    assert voice.name == "espeak-ng:en-gb,speed=150,pitch=40"
    assert get_voice("espeak-ng:en-us,speed=175").name == "espeak-ng:en-us"  # defaults are dropped
    for bad, message in [
        ("nope:x", "ENGINE:VOICE"),
        ("flite", "ENGINE:VOICE"),
        ("flite:kal", "kal16"),
        ("festival:rab", "known: kal, slt-hts"),
        ("espeak-ng:en-us,speed", "key=VALUE"),
        ("espeak-ng:en-us,speed=fast", "speed must be an integer"),
        ("espeak-ng:en-us,volume=3", "no option 'volume'.*speed=<int>, pitch=<int>"),
        ("espeak-ng:xx-nope", "no voice"),
    ]:
        with pytest.raises(ValueError, match=message):
            get_voice(bad)
    tts_voice("flite:slt")
    with pytest.raises(ValueError, match="flite has no option 'speed'"):
        get_voice("flite:slt,speed=120")


def test_missing_program_names_the_apt_package(monkeypatch):
    monkeypatch.setattr(tts.shutil, "which", lambda program: None)
    with pytest.raises(TTSUnavailableError, match="apt-get install flite"):
        get_voice("flite:slt")
    with pytest.raises(TTSUnavailableError, match="apt-get install festival"):
        get_voice("festival:kal")
    assert "flite" not in tts.available_engines()


def test_missing_festival_voice_names_the_apt_package(monkeypatch, tmp_path, tts_voice):
    tts_voice("festival:kal")
    monkeypatch.setattr(tts.FestivalVoice, "voice_root", tmp_path)
    with pytest.raises(TTSUnavailableError, match="apt-get install festvox-us-slt-hts"):
        get_voice("festival:slt-hts")


PROGRAM_ENGINES = ("espeak-ng", "flite", "festival")


def on_path(program: str) -> bool:
    return any(os.access(os.path.join(d, program), os.X_OK) for d in os.environ.get("PATH", "").split(os.pathsep) if d)


def test_available_engines_match_installed_programs(monkeypatch, tmp_path):
    listed = tts.available_engines()
    assert set(listed) <= set(tts.ENGINES)
    assert "transformers" in listed  # a dependency of the project: never an empty list
    for engine in PROGRAM_ENGINES:
        assert (engine in listed) == on_path(engine), engine
    # Each listed program engine works (a voice builds), and a PATH without the programs lists none.
    for engine, spec in zip(PROGRAM_ENGINES, ("espeak-ng:en-us", "flite:slt", "festival:kal")):
        if engine in listed:
            get_voice(spec)
    bare = tmp_path / "bin"
    bare.mkdir()
    monkeypatch.setenv("PATH", str(bare))
    assert not set(tts.available_engines()) & set(PROGRAM_ENGINES)
    (bare / "flite").write_text("#!/bin/sh\n")
    (bare / "flite").chmod(0o755)
    assert set(tts.available_engines()) & set(PROGRAM_ENGINES) == {"flite"}


INNER_TEST = """
import sys

from speechllm import tts


def test_flite_missing(tts_voice, monkeypatch):
    monkeypatch.setattr(tts.shutil, "which", lambda program: None)
    tts_voice("flite:slt")


def test_piper_missing(tts_voice, monkeypatch):
    monkeypatch.setitem(sys.modules, "piper", None)  # import piper fails, installed or not
    tts_voice("piper:joe")


def test_package_missing_elsewhere():
    import pytest

    pytest.skip("package(s) not installed: some_asset_package")
"""


@pytest.mark.parametrize("ci", [False, True])
def test_a_missing_engine_skips_outside_ci_and_fails_under_ci(tmp_path, ci):
    inner = tmp_path / "inner"
    inner.mkdir()
    (inner / "conftest.py").write_text((Path(__file__).parent / "conftest.py").read_text())
    (inner / "test_inner.py").write_text(INNER_TEST)
    env = {k: v for k, v in os.environ.items() if k != "CI"} | ({"CI": "true"} if ci else {})
    proc = subprocess.run([sys.executable, "-m", "pytest", "-v", "-rA", "-p", "no:cacheprovider", "--rootdir", str(inner),
                           "-c", os.devnull, str(inner)], cwd=inner, env=env, capture_output=True, text=True, timeout=300)
    outcome = dict(line.split("::", 1)[1].split()[:2] for line in proc.stdout.splitlines()
                   if line.startswith("test_inner.py::"))
    want = "FAILED" if ci else "SKIPPED"
    assert outcome == {"test_flite_missing": want, "test_piper_missing": "SKIPPED",
                       "test_package_missing_elsewhere": want}, proc.stdout[-3000:]
    assert "apt-get install flite" in proc.stdout and "optional extra (piper)" in proc.stdout
    if ci:
        assert "CI=true: a required package or asset is missing" in proc.stdout
        assert proc.returncode == 1


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


def test_synthesize_spans_boundaries(tts_voice):
    voice = tts_voice("espeak-ng:en-us")
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


@pytest.mark.parametrize("spec, function", [("festival:kal", "voice_kal_diphone"),
                                            ("festival:slt-hts", "voice_cmu_us_slt_arctic_hts")])  # fmt: skip
def test_festival_many_texts_in_one_process_match_text2wave(spec, function, tmp_path, tts_voice):
    voice = tts_voice(spec)
    texts = ["The quick brown fox.", 'He said "hi" -- twice. Then left', "a back\\slash"]
    many = voice.synthesize_many(texts)
    assert len(many) == 3
    for text, (wav, sr) in zip(texts, many):
        # the reference: festival's own text2wave, one process per text
        words = " ".join(w for w in text.split() if any(c.isalnum() for c in w))
        ref = tmp_path / "ref.wav"
        subprocess.run(["text2wave", "-eval", f"({function})", "-o", str(ref)], input=words, text=True,
                       check=True, capture_output=True)  # fmt: skip
        expected, expected_sr = sf.read(ref, dtype="float32")
        assert sr == expected_sr and np.array_equal(wav, expected)
    with pytest.raises(ValueError, match="nothing festival can say in '!!!'"):
        voice.synthesize_many(["fine", "!!!"])


# -- the transformers engine, on tiny random models saved to disk --------------------------------

CHARS = ["<pad>", "<unk>", " ", *"abcdefghijklmnopqrstuvwxyz'"]


def save_char_tokenizer(folder):
    """A character tokenizer (VitsTokenizer reads a vocab json; no phonemizer, no sentencepiece)."""
    from transformers import VitsTokenizer

    folder.mkdir(parents=True, exist_ok=True)
    (folder / "vocab.json").write_text(json.dumps({c: i for i, c in enumerate(CHARS)}))
    VitsTokenizer(str(folder / "vocab.json"), phonemize=False).save_pretrained(folder)


@pytest.fixture(scope="module")
def tiny_tts(tmp_path_factory):
    """Folders of a tiny VITS (22.05 kHz, in a folder whose name holds ':') and a tiny SpeechT5 +
    HiFi-GAN vocoder."""
    from transformers import (
        BertConfig,
        SpeechT5Config,
        SpeechT5ForTextToSpeech,
        SpeechT5HifiGan,
        SpeechT5HifiGanConfig,
        VitsConfig,
        VitsModel,
    )

    root = tmp_path_factory.mktemp("tts")
    torch.manual_seed(0)
    vits = root / "org:models" / "vits"
    save_char_tokenizer(vits)
    VitsModel(VitsConfig(
        vocab_size=len(CHARS), hidden_size=16, num_hidden_layers=1, num_attention_heads=2, ffn_dim=16,
        flow_size=8, spectrogram_bins=9, upsample_initial_channel=16, upsample_rates=(4, 4),
        upsample_kernel_sizes=(8, 8), resblock_kernel_sizes=(3,), resblock_dilation_sizes=((1,),),
        duration_predictor_filter_channels=8, duration_predictor_num_flows=1, prior_encoder_num_flows=1,
        prior_encoder_num_wavenet_layers=1, posterior_encoder_num_wavenet_layers=1,
        depth_separable_num_layers=1, sampling_rate=22050,
    )).save_pretrained(vits)  # fmt: skip
    speecht5 = root / "speecht5"
    save_char_tokenizer(speecht5)
    SpeechT5ForTextToSpeech(SpeechT5Config(
        vocab_size=len(CHARS), hidden_size=16, encoder_layers=1, decoder_layers=1, encoder_attention_heads=2,
        decoder_attention_heads=2, encoder_ffn_dim=16, decoder_ffn_dim=16, speech_decoder_prenet_units=16,
        speech_decoder_postnet_units=16, speech_decoder_postnet_layers=1, num_mel_bins=8, pad_token_id=0,
        speaker_embedding_dim=512, max_text_positions=200, max_speech_positions=400, conv_dim=(8,),
        conv_stride=(5,), conv_kernel=(10,), num_conv_pos_embeddings=16, num_conv_pos_embedding_groups=2,
    )).save_pretrained(speecht5)  # fmt: skip
    vocoder = root / "hifigan"
    SpeechT5HifiGan(SpeechT5HifiGanConfig(
        model_in_dim=8, upsample_initial_channel=16, upsample_rates=(4, 4), upsample_kernel_sizes=(8, 8),
        resblock_kernel_sizes=(3,), resblock_dilation_sizes=((1,),),
    )).save_pretrained(vocoder)  # fmt: skip
    bert = root / "bert"
    BertConfig(hidden_size=8, num_hidden_layers=1, num_attention_heads=2, intermediate_size=8).save_pretrained(bert)
    return {"vits": vits, "speecht5": speecht5, "vocoder": vocoder, "bert": bert}


def test_transformers_vits_voice(tiny_tts, tmp_path):
    voice = get_voice(f"transformers:{tiny_tts['vits']}")  # the path holds '/' and ':'
    assert voice.name == f"transformers:{tiny_tts['vits']}" and voice.model_type == "vits"
    state = torch.get_rng_state()
    wav, sr = voice.synthesize("Hello, world!")
    assert torch.equal(torch.get_rng_state(), state)  # seeded in a forked RNG: the caller's is untouched
    assert sr == 22050 and wav.dtype == np.float32 and wav.ndim == 1 and len(wav) > 0
    assert np.isfinite(wav).all() and np.abs(wav).max() > 0
    # VITS samples noise: the seed makes it repeatable, another seed changes it
    assert np.array_equal(voice.synthesize("Hello, world!")[0], wav)
    other = get_voice(f"transformers:{tiny_tts['vits']},seed=3")
    assert other.name.endswith(",seed=3") and not np.array_equal(other.synthesize("Hello, world!")[0], wav)

    duration = synthesize_to_file(voice, "Hello, world!", tmp_path / "vits.wav")
    info = sf.info(tmp_path / "vits.wav")
    assert (info.samplerate, info.channels) == (16000, 1)
    assert info.frames == math.ceil(len(wav) * 16000 / 22050) and duration == pytest.approx(info.duration)
    with pytest.raises(ValueError, match="keeps nothing of '123'"):  # digits are not in the vocabulary
        voice.synthesize("123")


def test_transformers_speecht5_voice(tiny_tts, tmp_path):
    xvector = tmp_path / "speaker.npy"
    np.save(xvector, np.random.default_rng(0).standard_normal(512).astype(np.float32))
    spec = f"transformers:{tiny_tts['speecht5']},vocoder={tiny_tts['vocoder']},speaker={xvector}"
    voice = get_voice(spec)
    assert voice.name == spec and get_voice(voice.name).name == spec
    assert torch.equal(voice.xvector[0], torch.from_numpy(np.load(xvector)))
    wav, sr = voice.synthesize("hello world")
    assert sr == 16000 and wav.dtype == np.float32 and len(wav) > 0 and np.isfinite(wav).all()

    plain = get_voice(f"transformers:{tiny_tts['speecht5']},vocoder={tiny_tts['vocoder']}")
    assert torch.equal(plain.xvector, torch.zeros(1, 512))  # no speaker option: zeros
    duration = synthesize_to_file(plain, "hello world", tmp_path / "t5.wav")
    assert sf.info(tmp_path / "t5.wav").samplerate == 16000 and duration > 0

    torch.save(torch.ones(2, 256), tmp_path / "speaker.pt")  # 512 numbers in another shape: accepted
    pt = get_voice(f"transformers:{tiny_tts['speecht5']},vocoder={tiny_tts['vocoder']},speaker={tmp_path}/speaker.pt")
    assert torch.equal(pt.xvector, torch.ones(1, 512))


def test_transformers_voice_errors(tiny_tts, tmp_path):
    speecht5, vocoder = tiny_tts["speecht5"], tiny_tts["vocoder"]
    np.save(tmp_path / "short.npy", np.zeros(100, dtype=np.float32))
    for spec, message in [
        (f"transformers:{tiny_tts['bert']}", "'bert' model; TTS model types handled: vits, speecht5"),
        (f"transformers:{speecht5}", "add vocoder="),
        (f"transformers:{tiny_tts['vits']},vocoder={vocoder}", "vocoder and speaker are SpeechT5 options"),
        (f"transformers:{speecht5},vocoder={vocoder},speaker={tmp_path}/short.npy",
         r"short.npy'.*expected 512 numbers, got \(100,\)"),
        (f"transformers:{speecht5},vocoder={vocoder},speaker=x.txt", "expected a .npy or .pt file"),
        (f"transformers:{speecht5},vocoder={vocoder},pitch=3", "no option 'pitch'"),
    ]:  # fmt: skip
        with pytest.raises(ValueError, match=message):
            get_voice(spec)
    with pytest.raises(TTSUnavailableError, match="cannot load AutoConfig from '.*missing'"):
        get_voice(f"transformers:{tmp_path}/missing")
