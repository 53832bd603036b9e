"""The data module: bad clips are counted skips, sources mix by share, the position resumes."""

import json

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
    cfg = stage_cfg(tmp_path, {"speech": {"manifest": speech},
                               "simulated": {"manifest": text, "kind": "simulated",
                                             "share": {"kind": "linear", "start": 3.0, "end": 0.0, "end_step": 100}}})
    dm = SpeechTextDataModule(cfg, "speech")
    assert dm.shares(0) == {"speech": 1.0, "simulated": 3.0}
    assert dm.shares(50) == {"speech": 1.0, "simulated": 1.5} and dm.shares(200)["simulated"] == 0.0
    loader = dm.train_dataloader()
    batches = [b for b, _ in zip(loader, range(40))]
    first = [b["source"] for b in batches[:10]]
    assert first.count("simulated") >= 5 and all(b["kind"] in ("speech", "simulated") for b in batches)
    assert all("waveform" in b for b in batches if b["kind"] == "speech")


def test_resume_position_comes_from_the_checkpointed_batch_count(tiny_data, tmp_path):
    speech = str(tiny_data / "speech/train.jsonl")
    cfg = stage_cfg(tmp_path, {"speech": {"manifest": speech}})
    full = [b["id"] for b, _ in zip(SpeechTextDataModule(cfg, "speech").train_dataloader(), range(7))]
    resumed_dm = SpeechTextDataModule(cfg, "speech")
    resumed_dm.load_state_dict({"global_batches": 4})
    resumed = [b["id"] for b, _ in zip(resumed_dm.train_dataloader(), range(3))]
    assert resumed == full[4:]
