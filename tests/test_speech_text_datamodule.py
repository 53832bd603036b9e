"""The data module: bad clips are counted skips, sources mix by share, the position resumes."""

import json
import math

import numpy as np
import soundfile as sf
from omegaconf import OmegaConf

from datamodules.speech_text import SpeechTextDataModule, check_audio
from speechllm.config import StageConfig
from speechllm.manifest import load_manifest


def test_bad_clips_are_skipped_and_counted_by_reason(tmp_path):
    rate = 16000
    wav = tmp_path / "wav"
    wav.mkdir()
    sf.write(wav / "good.wav", np.zeros(rate, np.float32), rate)
    sf.write(wav / "rate.wav", np.zeros(8000, np.float32), 8000)
    sf.write(wav / "long.wav", np.zeros(rate * 3, np.float32), rate)
    (wav / "garbage.wav").write_bytes(b"not a sound file" * 20)
    rows = [("good", "good"), ("gone", "missing"), ("garbage", "garbage"), ("rate", "rate"), ("long", "long")]
    manifest = tmp_path / "m.jsonl"
    manifest.write_text("".join(json.dumps({"id": i, "audio": f"wav/{f}.wav", "text": "words"}) + "\n" for i, f in rows))
    kept, skipped = check_audio(load_manifest(manifest, require_audio=True), rate, max_seconds=2.0)
    assert [u.id for u in kept] == ["good"] and kept[0].duration == 1.0
    assert skipped == {"missing_audio": 1, "unreadable_audio": 1, "wrong_sample_rate": 1, "too_long": 1}


def stage_cfg(tmp_path, sources):
    return OmegaConf.merge(OmegaConf.structured(StageConfig),
                           {"kind": "asr", "data": {"batch_size": 2, "sources": sources}})


def test_a_source_with_share_zero_is_switched_off(tiny_data, tmp_path):
    speech = str(tiny_data / "speech/train.jsonl")
    cfg = stage_cfg(tmp_path, {"speech": {"manifest": speech}, "simulated": {"kind": "simulated", "share": {"start": 0.0}}})
    dm = SpeechTextDataModule(cfg, "speech")
    assert list(dm.source_configs()) == ["speech"]  # the unused preset source needs no manifest


def test_mixture_shares_follow_the_ramp(tiny_data, tmp_path):
    speech, text = str(tiny_data / "speech/train.jsonl"), str(tiny_data / "text/train.jsonl")
    end = 400
    cfg = stage_cfg(tmp_path, {"speech": {"manifest": speech},
                               "simulated": {"manifest": text, "kind": "simulated",
                                             "share": {"kind": "linear", "start": 3.0, "end": 0.0, "end_step": end}}})
    dm = SpeechTextDataModule(cfg, "speech")
    assert dm.shares(0) == {"speech": 1.0, "simulated": 3.0}
    assert dm.shares(end // 2) == {"speech": 1.0, "simulated": 1.5} and dm.shares(end + 50)["simulated"] == 0.0
    batches = [b for b, _ in zip(dm.train_dataloader(), range(end + 40))]
    assert all(b["kind"] == ("simulated" if b["source"] == "simulated" else "speech") for b in batches)
    assert all("waveform" in b for b in batches if b["kind"] == "speech")
    # Over the whole ramp, not only its start: each half's count of simulated batches against the
    # expected sum of 3(1 - t/400) / (1 + 3(1 - t/400)) (about 137 and 78), within 4 standard
    # deviations of the binomial sum; a share stuck at its start gives 150 in the second half.
    for half in (range(0, end // 2), range(end // 2, end)):
        p = [3 * (1 - t / end) / (1 + 3 * (1 - t / end)) for t in half]
        mean, sd = sum(p), math.sqrt(sum(q * (1 - q) for q in p))
        got = sum(batches[t]["source"] == "simulated" for t in half)
        assert abs(got - mean) < 4 * sd, (half, got, mean, sd)
    assert all(b["source"] == "speech" for b in batches[end:])  # share 0 after the ramp: never drawn


def test_resume_position_comes_from_the_checkpointed_batch_count(tiny_data, tmp_path):
    speech = str(tiny_data / "speech/train.jsonl")
    cfg = stage_cfg(tmp_path, {"speech": {"manifest": speech}})
    full = [b["id"] for b, _ in zip(SpeechTextDataModule(cfg, "speech").train_dataloader(), range(7))]
    resumed_dm = SpeechTextDataModule(cfg, "speech")
    resumed_dm.load_state_dict({"global_batches": 4})
    resumed = [b["id"] for b, _ in zip(resumed_dm.train_dataloader(), range(3))]
    assert resumed == full[4:]
