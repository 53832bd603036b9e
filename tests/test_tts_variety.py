"""Voice variety: the voice pools, per-utterance pitch and rate (seeded, in range, audible), and
``prepare demo-data --voices varied`` (held-out voices never drawn; ``--voices demo`` unchanged).

Engine tests skip where an engine is missing, and fail under CI=true (``tts_voice``, conftest)."""

import hashlib
import json
import math
import random
from pathlib import Path

import numpy as np
import pytest

from speechllm import tts
from speechllm.tts import (
    ESPEAK_ENGLISH,
    ESPEAK_VARIANTS,
    PITCH_SEMITONES,
    RATE_FACTORS,
    draw_voice,
    get_voice,
    voice_pool,
    with_prosody,
)
from stages import prepare_demo_data as prep

POOLS = {  # names only: drawing needs no engine
    "espeak-ng": [f"espeak-ng:{a}{v}" for a in ("en-us", "en-gb-x-rp") for v in ("", "+m3", "+f2")],
    "flite": ["flite:kal16", "flite:awb", "flite:rms"],
    "festival": ["festival:kal", "festival:ked"],
}
TEXT = "Please remember to close the window before the storm arrives tonight."


def median_f0(wav: np.ndarray, sr: int, lo: float = 60.0, hi: float = 400.0) -> float:
    """Median F0 (Hz) of the loud, clearly periodic 40 ms frames: autocorrelation peak."""
    frame, hop = int(0.04 * sr), int(0.01 * sr)
    loud = 0.3 * np.sqrt(np.mean(wav**2))
    f0 = []
    for start in range(0, len(wav) - frame, hop):
        x = wav[start : start + frame] - wav[start : start + frame].mean()
        if np.sqrt(np.mean(x**2)) < loud:
            continue
        ac = np.correlate(x, x, "full")[frame - 1 :]
        a, b = int(sr / hi), int(sr / lo)
        lag = a + int(np.argmax(ac[a:b]))
        if ac[lag] > 0.5 * ac[0]:
            f0.append(sr / lag)
    return float(np.median(f0))


# -- drawing: pure, no engine ---------------------------------------------------------------------


def test_same_key_same_draw_and_keys_spread():
    first = [draw_voice(POOLS, f"train-{i}") for i in range(300)]
    assert first == [draw_voice(POOLS, f"train-{i}") for i in range(300)]  # seeded by the key alone
    random.seed(123)  # the caller's random state plays no part
    assert draw_voice(POOLS, "train-7") == first[7]
    voices = {d.voice for d in first}
    assert len(voices) == sum(map(len, POOLS.values()))  # every voice drawn
    by_engine = {e: sum(d.voice.startswith(e + ":") for d in first) for e in POOLS}
    assert all(60 <= n <= 140 for n in by_engine.values()), by_engine  # engines uniformly, not voices
    assert len({d.pitch for d in first}) > 20 and len({d.rate for d in first}) > 20
    for d in first:
        assert d.spec.split(",")[0] == d.voice and d.voice in POOLS[d.voice.split(":")[0]]


def test_pitch_and_rate_land_in_their_ranges():
    for i in range(500):
        d = draw_voice(POOLS, f"k{i}")
        assert PITCH_SEMITONES[0] <= d.pitch <= PITCH_SEMITONES[1]
        assert RATE_FACTORS[0] <= d.rate <= RATE_FACTORS[1]
        if d.voice == "flite:rms":  # flite's rms ignores f0_shift: its pitch stays its own
            assert d.pitch == 0.0 and "f0_shift" not in d.spec
    narrow = [draw_voice(POOLS, f"k{i}", (-1.0, 0.5), (0.9, 1.0)) for i in range(200)]
    assert all(-1.0 <= d.pitch <= 0.5 and 0.9 <= d.rate <= 1.0 for d in narrow)
    with pytest.raises(ValueError, match="must hold 0"):
        draw_voice(POOLS, "k", (1.0, 2.0))
    with pytest.raises(ValueError, match="every pool is empty"):
        draw_voice({"flite": []}, "k")


def test_with_prosody_in_each_engines_own_settings():
    # the voice's own pitch and rate: the plain spec, so such a clip is the clip without variety
    for voice in ("espeak-ng:en-us+m3", "flite:awb", "festival:kal", "festival:slt-hts", "piper:joe"):
        assert with_prosody(voice) == tts.VoiceDraw(voice, voice, 0.0, 1.0)
    # espeak-ng: -p about 6.5 steps a semitone, -s words per minute; rounded towards the default
    assert with_prosody("espeak-ng:en-us", 3.0, 1.2) == tts.VoiceDraw(
        "espeak-ng:en-us,speed=210,pitch=69", "espeak-ng:en-us", 2.92, 1.2
    )
    assert with_prosody("espeak-ng:en-gb", -3.0, 0.85).spec == "espeak-ng:en-gb,speed=149,pitch=31"
    # flite and festival: a duration stretch (1 / rate) and an F0 factor (2 ** (semitones / 12))
    d = with_prosody("flite:awb", 2.0, 1.1)  # stretch 0.90909... -> 0.91, towards 1
    assert d.spec == "flite:awb,stretch=0.91,f0_shift=1.122" and (d.pitch, d.rate) == (1.99, 1.0989)
    assert with_prosody("flite:rms", 2.0, 1.1).spec == "flite:rms,stretch=0.91"
    assert with_prosody("festival:ked", -2.0, 0.9).spec == "festival:ked,stretch=1.111,f0_shift=0.891"
    assert with_prosody("festival:slt-hts", 2.0, 1.1).spec == "festival:slt-hts"  # HTS ignores both
    # what a voice gets never passes what was asked (but for the recorded values' own rounding, to
    # 0.01 semitone and 1e-4): towards the voice's own, so a range's bounds are never passed
    for pitch, rate in ((2.999, 1.1999), (-2.999, 0.8501), (0.01, 1.0001), (3.0, 1.2), (-3.0, 0.85)):
        for voice in ("espeak-ng:en-us", "flite:kal16", "festival:kal"):
            got = with_prosody(voice, pitch, rate)
            assert abs(got.pitch) <= abs(pitch) + 0.005
            assert abs(math.log(got.rate)) <= abs(math.log(rate)) + 1e-4
            assert -3.0 <= got.pitch <= 3.0 and 0.85 <= got.rate <= 1.2


def test_the_whole_pools_whatever_is_installed():
    espeak = voice_pool("espeak-ng", installed=False)
    assert len(espeak) == len(set(espeak)) == 8 * (1 + 76) == len(ESPEAK_ENGLISH) * (1 + len(ESPEAK_VARIANTS))
    assert espeak[:2] == ["espeak-ng:en-us", "espeak-ng:en-us+Alex"]
    assert espeak[-1] == "espeak-ng:en-us-nyc+victor"
    assert voice_pool("flite", installed=False) == ["flite:kal16", "flite:awb", "flite:rms", "flite:slt"]
    assert voice_pool("festival", installed=False) == ["festival:kal", "festival:slt-hts", "festival:ked"]
    assert voice_pool("piper", installed=False) == ["piper:joe"]


def test_a_missing_voice_is_named(monkeypatch, caplog):
    def pool(engine, installed=True):
        whole = voice_pool(engine, installed=False)
        return [v for v in whole if v != "festival:ked"] if installed else whole

    monkeypatch.setattr(prep, "voice_pool", pool)
    with caplog.at_level("WARNING"):
        pools = prep.varied_pools(prep.HELDOUT_VOICES)
    assert pools["festival"] == ["festival:kal"] and len(pools["espeak-ng"]) == 616
    assert "1 festival voice(s) not installed here" in caplog.text and "festival:ked" in caplog.text
    assert "espeak-ng voice(s)" not in caplog.text and "flite voice(s)" not in caplog.text  # held-out slt


def test_bad_settings_are_refused():
    for spec, message in (
        ("flite:awb,stretch=slow", "stretch must be a number"),
        ("flite:awb,stretch=0", "must be a positive number"),
        ("flite:rms,f0_shift=1.1", "ignores f0_shift"),
        ("festival:slt-hts,stretch=1.1", "ignores stretch and f0_shift"),
        ("festival:kal,speed=150", "festival has no option 'speed'.*stretch=<float>, f0_shift=<float>"),
    ):
        with pytest.raises(ValueError, match=message):
            get_voice(spec)


def test_cli_takes_the_voice_set():
    import argparse

    parser = argparse.ArgumentParser()
    prep.add_arguments(parser)
    assert parser.parse_args(["out"]).voices == "demo"
    assert parser.parse_args(["out", "--voices", "varied"]).voices == "varied"
    with pytest.raises(SystemExit):
        parser.parse_args(["out", "--voices", "many"])


def test_demo_voice_assignment_is_unchanged():
    """The demo plan (ids, voices, texts, chunks, extra fields) is the one made before --voices
    existed: this digest was computed with that code. ids hash the voice, so every cached wav stays."""
    entries = [
        prep.Entry(f"Sentence number {i} is about the {w} river.", t)
        for i, (w, t) in enumerate(
            (w, t) for t in ("alpha", "beta") for w in "red green blue big small old new wide deep calm".split()
        )
    ]
    docs = prep.build_documents(
        [prep.Entry(" ".join(["word"] * 8) + f" {i}.", "t") for i in range(40)], "0/documents/train"
    )
    sets = [
        prep._plan_speech("train", entries, 12, list(prep.TRAIN_VOICES), 0),
        prep._plan_speech("dev", entries, 4, list(prep.HELDOUT_VOICES), 0),
        prep._plan_docs("train", docs, 3, list(prep.TRAIN_VOICES), 0),
    ]
    plan = [[it.id, it.voice, it.text, it.chunks, it.audio, s.extra[it.id]] for s in sets for it in s.items]
    assert plan[1][:2] == ["train-42589e5698c1", "espeak-ng:en-us+m3"]
    digest = hashlib.sha256(json.dumps(plan).encode()).hexdigest()
    assert digest == "5a21e9aeed62e244f07cd34bec30d1ec95498a098896ebef81fb2982ec884e61"


# -- the engines ----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def engines(tts_voice):
    """One voice of each engine `make system-deps` installs: a skip (a failure under CI=true) if missing."""
    for spec in ("espeak-ng:en-us", "flite:awb", "festival:kal"):
        tts_voice(spec)


def test_festival_ked_is_installed(tts_voice):
    """festvox-kdlpc16k is one of the Makefile's SYSTEM_PKGS: under CI=true it must be there."""
    assert tts_voice("festival:ked").name == "festival:ked"


def test_voice_pools_list_installed_english_voices(engines):
    espeak = voice_pool("espeak-ng")
    everything = set(voice_pool("espeak-ng", installed=False))
    assert set(espeak) <= everything and len(espeak) == len(set(espeak)) >= 8 * 40
    assert {"espeak-ng:en-us", "espeak-ng:en-gb-x-rp+m3", "espeak-ng:en-gb-scotland+f2"} <= set(espeak)
    assert voice_pool("flite") == ["flite:kal16", "flite:awb", "flite:rms", "flite:slt"]
    assert {"festival:kal", "festival:slt-hts"} <= set(voice_pool("festival"))
    assert voice_pool("transformers") == []
    for spec in espeak[::97] + voice_pool("flite") + voice_pool("festival"):
        assert get_voice(spec).name == spec  # each listed voice builds (espeak-ng probes it)
    with pytest.raises(ValueError, match="unknown TTS engine"):
        voice_pool("sapi")


@pytest.mark.parametrize("voice", ["espeak-ng:en-gb-x-rp+f2", "flite:awb", "flite:rms", "festival:kal"])
def test_same_spec_same_audio_and_settings_are_heard(voice, engines):
    slow_low, fast_high = with_prosody(voice, -3.0, 0.85), with_prosody(voice, 3.0, 1.2)
    assert get_voice(slow_low.spec).name == slow_low.spec  # the spec round-trips
    audio = {}
    for d in (slow_low, fast_high):
        wav, sr = get_voice(d.spec).synthesize(TEXT)
        again, _ = get_voice(d.spec).synthesize(TEXT)  # a fresh voice: a re-run
        assert np.array_equal(wav, again)
        audio[d.spec] = (wav, sr)
    (slow, sr), (fast, _) = audio[slow_low.spec], audio[fast_high.spec]
    # 0.85 against 1.2 times the rate: about 0.71 times the length (pauses and edges stretch less)
    assert len(fast) < 0.85 * len(slow)
    high, low = median_f0(fast, sr), median_f0(slow, sr)
    if voice == "flite:rms":
        assert fast_high.pitch == 0.0 and high == pytest.approx(low, rel=0.08)
    else:  # 6 semitones apart: 1.41 times the F0, as measured on the loud voiced frames
        assert high > 1.2 * low, (high, low)


def test_varied_pools_leave_the_heldout_voices_out(engines):
    pools = prep.varied_pools(prep.HELDOUT_VOICES)
    assert set(pools) == set(tts.VARIED_ENGINES)
    every = {v for pool in pools.values() for v in pool}
    assert "flite:slt" not in every and "festival:slt-hts" not in every
    assert {"flite:kal16", "flite:awb", "flite:rms", "festival:kal"} <= every
    drawn = {draw_voice(pools, f"0/train-{i}").voice for i in range(500)}
    assert not drawn & set(prep.HELDOUT_VOICES) and len(drawn) > 100


# -- prepare demo-data --voices varied on a tiny scale ---------------------------------------------

WORDS = "the a cat dog sees runs over under big small red blue house tree river stone quickly slowly".split()
TINY = dict(n_train=8, n_dev=2, n_test=2, n_docs=(2, 1, 0), n_mc=0, heldout_voices=["flite:slt"], workers=1,
            progress=False)  # fmt: skip


@pytest.fixture
def fortunes(tmp_path) -> Path:
    folder = tmp_path / "fortunes"
    folder.mkdir()
    rng = random.Random(0)
    for topic in ("alpha", "beta"):
        entries = [" ".join(rng.choices(WORDS, k=rng.randint(5, 12))).capitalize() + "." for _ in range(150)]
        (folder / topic).write_text("\n%\n".join(entries) + "\n%\n", encoding="utf-8")
    return folder


def rows(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_varied_preparation(fortunes, tmp_path, engines):
    demo, varied = tmp_path / "demo", tmp_path / "varied"
    two = ["espeak-ng:en-us", "flite:kal16"]
    prep.prepare_demo_data(demo, fortunes_dir=fortunes, train_voices=two, **TINY)
    summary = prep.prepare_demo_data(varied, fortunes_dir=fortunes, voices="varied", **TINY)
    assert summary["voices"]["set"] == "varied" and summary["voices"]["heldout"] == ["flite:slt"]
    assert "flite:slt" not in summary["voices"]["pools"]["flite"]

    for name in ("speech/train.jsonl", "docs/train.jsonl"):
        assert all({"voice", "pitch", "rate"}.isdisjoint(r) for r in rows(demo / name))
        trained = rows(varied / name)
        assert trained and all({"voice", "pitch", "rate", "speaker", "topic"} <= set(r) for r in trained)
        for r in trained:
            # the speaker is the spec that made the clip: the voice with its own pitch and rate settings
            assert tts.base_spec(r["speaker"]) == r["voice"] != "flite:slt"
            assert get_voice(r["speaker"]).name == r["speaker"]
            assert PITCH_SEMITONES[0] <= r["pitch"] <= PITCH_SEMITONES[1]
            assert RATE_FACTORS[0] <= r["rate"] <= RATE_FACTORS[1]
    assert len({r["voice"] for r in rows(varied / "speech/train.jsonl")}) >= 4  # 8 clips, 1 voice each
    # dev/test are the demo's, byte for byte (their wavs too: the same ids)
    for name in ("speech/dev.jsonl", "speech/test.jsonl", "docs/dev.jsonl"):
        assert (varied / name).read_bytes() == (demo / name).read_bytes()
    dev_wav = rows(demo / "speech/dev.jsonl")[0]["audio"]
    assert (varied / "speech" / dev_wav).read_bytes() == (demo / "speech" / dev_wav).read_bytes()

    # a re-run draws the same voices, pitches and rates: every wav is found, none made again
    before = {p: p.read_bytes() for p in sorted(varied.rglob("*.jsonl"))}
    assert prep.prepare_demo_data(varied, fortunes_dir=fortunes, voices="varied", **TINY)["synthesized"] == 0
    assert before == {p: p.read_bytes() for p in sorted(varied.rglob("*.jsonl"))}


def test_heldout_voice_never_trains(fortunes, tmp_path, monkeypatch, engines):
    with pytest.raises(ValueError, match="held-out voices must never be used for training"):
        prep.prepare_demo_data(tmp_path / "a", fortunes_dir=fortunes, **TINY,
                               train_voices=["espeak-ng:en-us", "flite:slt,stretch=1.1"])  # fmt: skip
    with pytest.raises(ValueError, match="--train-voices is for --voices demo"):
        prep.prepare_demo_data(tmp_path / "b", fortunes_dir=fortunes, voices="varied", **TINY,
                               train_voices=["espeak-ng:en-us"])  # fmt: skip
    # a pool that let a held-out voice in is caught before anything is synthesised
    monkeypatch.setattr(prep, "varied_pools", lambda heldout: {"flite": ["flite:slt", "flite:awb"]})
    with pytest.raises(RuntimeError, match=r"held-out voices drawn for training: \['flite:slt'\]"):
        prep.prepare_demo_data(tmp_path / "c", fortunes_dir=fortunes, voices="varied", **TINY)
    assert not list((tmp_path / "c").rglob("*.wav"))
