"""Waveform augmentation of the training speech (``data.augment``, ``data.sources.<name>.augment``):
off by default with batches as before, the same augmentation for the same draw in any fresh data
module, never on validation sets, exact after SIGKILL and resume, and bad values named at load."""

from __future__ import annotations

import itertools
import os
import signal
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from safetensors.torch import load_file

from datamodules.sampling import sample_seed
from datamodules.speech_text import SourceItems, SpeechTextDataModule
from lightning_modules.base import SpeechLLMModule
from speechllm.augment import AugmentConfig
from speechllm.config import ConfigError, SourceKind, load_pipeline, load_stage_config, stage_layers
from speechllm.manifest import load_audio
from stages.faults import wait_for_checkpoint
from stages.tensorboard import scalar_series
from stages.validation import validate_stage

REPO = Path(__file__).resolve().parents[1]
RATE = 16000
# Every clip augmented, noise always: an augmented clip never equals its source.
ON = ["data.augment.prob=1.0", "data.augment.noise_prob=1.0"]


def pipeline_for(tmp_path: Path, data: Path) -> Path:
    """configs/pipeline/tiny.yaml pointed at this test's data."""
    text = (REPO / "configs/pipeline/tiny.yaml").read_text().replace("data/tiny/", f"{data}/")
    text = text.replace("../model/", f"{REPO}/configs/model/").replace("../stage/", f"{REPO}/configs/stage/")
    path = tmp_path / "tiny.yaml"
    path.write_text(text)
    return path


def stage_config(tmp_path: Path, data: Path, *overrides: str, stage: str = "asr"):
    """One stage of the tiny pipeline, loaded and validated as the runner does: (config, layers)."""
    pipeline = pipeline_for(tmp_path, data)
    layers = stage_layers(pipeline, load_pipeline(pipeline), stage)
    cfg = load_stage_config(layers, list(overrides))
    validate_stage(stage, cfg, layers, list(overrides))
    return cfg


def batches(cfg, n: int, start: int = 0) -> list[dict]:
    """The first ``n`` training batches of a fresh data module (from global batch ``start``)."""
    dm = SpeechTextDataModule(cfg, SourceKind.speech)
    dm.load_state_dict({"global_batches": start})
    return list(itertools.islice(iter(dm.train_dataloader()), n))


def speech(batch_list: list[dict]) -> list[dict]:
    found = [b for b in batch_list if b["kind"] == "speech"]
    assert found, "no speech batch among them"
    return found


def clean_waves(cfg) -> dict[str, torch.Tensor]:
    from speechllm.sources import open_source

    return {u.id: load_audio(u.audio, RATE) for u in open_source(cfg.data.sources.speech.manifest).items()}


def test_off_by_default_the_batches_are_those_of_before(tmp_path, tiny_data):
    cfg = stage_config(tmp_path, tiny_data)
    assert cfg.data.augment.prob == 0.0 and cfg.data.sources.speech.augment is None
    got = batches(cfg, 8)
    clean = clean_waves(cfg)
    for batch in speech(got):
        assert set(batch) == {"source", "kind", "id", "text", "seed", "target", "words", "waveform"}
        for utt, wave in zip(batch["id"], batch["waveform"]):
            assert torch.equal(wave, clean[utt])
    # The loader's dataset is the one of before: no augmentation configured, none applied.
    dm = SpeechTextDataModule(cfg, SourceKind.speech)
    assert dm.augment_configs() == {} and dm.train_dataloader().dataset.augment == {}
    # A source's own prob 0 switches it off under a stage-wide augmentation.
    off = stage_config(tmp_path, tiny_data, *ON, "data.sources.speech.augment.prob=0")
    for a, b in zip(speech(got), speech(batches(off, 8))):
        assert a["id"] == b["id"] and all(torch.equal(x, y) for x, y in zip(a["waveform"], b["waveform"]))


def test_the_same_draw_is_augmented_the_same_in_fresh_data_modules(tmp_path, tiny_data):
    cfg = stage_config(tmp_path, tiny_data, *ON)
    first, second = speech(batches(cfg, 6)), speech(batches(cfg, 6))
    clean = clean_waves(cfg)
    for a, b in zip(first, second):
        assert a["id"] == b["id"] and a["seed"] == b["seed"] and a["augmented"] == [True] * len(a["id"])
        for utt, x, y in zip(a["id"], a["waveform"], b["waveform"]):
            assert torch.equal(x, y) and not torch.equal(x, clean[utt])
            assert x.dtype == torch.float32 and x.dim() == 1 and float(x.abs().max()) <= 1.0
    # Resumed at global batch 3: the batches (and their augmentation) of an uninterrupted run.
    resumed, uninterrupted = batches(cfg, 3, start=3), batches(cfg, 6)[3:]
    for a, b in zip(resumed, uninterrupted):
        assert a["id"] == b["id"] and all(torch.equal(x, y) for x, y in zip(a.get("waveform", []), b.get("waveform", [])))
    # The same clip at another draw (a later epoch), or under another run seed, is augmented otherwise.
    items = SpeechTextDataModule(cfg, SourceKind.speech).train_dataloader().dataset
    again = SourceItems(items.sources, RATE, "tasu", items.augment, seed=1)
    wave = items[("speech", 0, 0)]["waveform"]
    assert torch.equal(wave, items[("speech", 0, 0)]["waveform"])
    assert not torch.equal(wave, items[("speech", 0, 24)]["waveform"])
    assert not torch.equal(wave, again[("speech", 0, 0)]["waveform"])


def test_the_augmentation_seed_is_the_sample_seed_of_its_own_stream():
    # sample_generators is unchanged by the refactor: the formula of before, through sample_seed.
    module = SimpleNamespace(cfg=SimpleNamespace(seed=3))
    gens = SpeechLLMModule.sample_generators(module, {"source": "speech", "seed": [0, 7]})
    import zlib

    before = [(3 * 1_000_003 + zlib.crc32(b"speech")) * 1_000_003 + s for s in (0, 7)]
    assert [g.initial_seed() for g in gens] == before == [sample_seed(3, "speech", s) for s in (0, 7)]
    assert sample_seed(3, "speech/augment", 0) not in before  # independent of the span plan's numbers


def test_validation_sets_are_never_augmented(tmp_path, tiny_data):
    cfg = stage_config(tmp_path, tiny_data, *ON, stage="distill")
    dm = SpeechTextDataModule(cfg, SourceKind.speech)
    dm.setup()
    assert dm.augment_configs() == {"speech": AugmentConfig(prob=1.0, noise_prob=1.0)}  # the text source: none
    assert dm.val_sets
    for loader in dm.val_dataloader():
        waves = []
        for batch in loader:
            assert "augmented" not in batch
            waves += batch["waveform"]
        assert len(waves) == len(loader.dataset.items)
        for wave, item in zip(waves, loader.dataset.items):
            assert torch.equal(wave, load_audio(item.audio, RATE))


def test_speed_perturbation_stretches_word_times_and_respects_the_length_limit(tmp_path, tiny_data):
    cfg = stage_config(tmp_path, tiny_data)
    items = SpeechTextDataModule(cfg, SourceKind.speech).train_dataloader().dataset
    _, utts = items.sources["speech"]
    utt = utts[0]
    wave = load_audio(utt.audio, RATE)
    slower = AugmentConfig(prob=1.0, speed_prob=1.0, speed_range=[0.8, 0.8], reverb_prob=0.0, noise_prob=1.0,
                           telephone_prob=0.0, gain_prob=0.0)
    stretched = SourceItems(items.sources, RATE, "tasu", {"speech": slower})
    out, words, augmented = stretched.augmented("speech", 5, wave, utt.words)
    assert augmented and out.numel() == round(wave.numel() / 0.8)
    ratio = out.numel() / wave.numel()
    for new, old in zip(words, utt.words):
        assert new["w"] == old["w"] and new["start"] == pytest.approx(old["start"] * ratio)
        assert new["end"] == pytest.approx(old["end"] * ratio)
    # Past data.max_audio_seconds: the same draws without the speed change, the length kept.
    limited = SourceItems(items.sources, RATE, "tasu", {"speech": slower}, max_seconds=wave.numel() / RATE)
    short, kept_words, augmented = limited.augmented("speech", 5, wave, utt.words)
    assert augmented and short.numel() == wave.numel() and kept_words == utt.words
    assert not torch.equal(short, wave)  # the noise is still there


@pytest.mark.parametrize("override, key", [
    ("data.augment.prob=1.5", "data.augment.prob"),
    ("data.augment.snr_db=[30,5]", "data.augment.snr_db"),
    ("data.sources.speech.augment.speed_range=[0,1.1]", "data.sources.speech.augment.speed_range"),
    ("data.sources.simulated.augment.prob=0.5", "data.sources.simulated.augment"),
    ("data.augment.prob=often", "data.augment.prob"),  # a wrong type: the schema, at merge
    ("data.augment.nosie_prob=0.5", "data.augment.nosie_prob"),  # a misspelled key: the schema
])
def test_a_bad_augment_value_fails_at_load_naming_the_key(override, key, tmp_path, tiny_data):
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        stage_config(tmp_path, tiny_data, override)


def test_a_resumed_augmented_asr_run_gives_the_weights_of_an_uninterrupted_one(tmp_path, tiny_data):
    steps = 6
    pipeline = tmp_path / "augment.yaml"
    pipeline.write_text(f"""
name: aug
include: ["{REPO / 'configs/model/tiny.yaml'}"]
defaults:
  data: {{batch_size: 2}}
  trainer: {{accelerator: cpu, precision: 32-true, max_steps: {steps}, val_check_interval: {steps},
             checkpoint_every_n_steps: 2, log_every_n_steps: 1, num_threads: 1, evaluate_before_training: false}}
stages:
  - name: asr
    include: ["{REPO / 'configs/stage/asr.yaml'}"]
    config:
      data:
        augment: {{prob: 1.0, speed_prob: 0.5, noise_prob: 1.0, reverb_prob: 0.5}}
        sources:
          speech: {{manifest: "{tiny_data / 'speech/train.jsonl'}"}}
          simulated: {{manifest: "{tiny_data / 'text/train.jsonl'}"}}
      optim: {{lr: 1.0e-3, warmup_steps: 1}}
""")
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1"}

    def command(run_dir: Path) -> list[str]:
        return [sys.executable, "-m", "stages", "run", str(pipeline), "--run-dir", str(run_dir)]

    killed = tmp_path / "killed"
    stage = killed / "aug" / "asr"
    proc = subprocess.Popen(command(killed), cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                            text=True)
    wait_for_checkpoint(proc, stage, 2, timeout=300)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    saved = torch.load(stage / "checkpoints/last.ckpt", weights_only=True, map_location="cpu")["global_step"]
    assert 2 <= saved < steps and not (stage / "DONE").exists()

    rerun = subprocess.run(command(killed), cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    assert "resuming" in rerun.stdout and (stage / "DONE").is_file()
    clean = subprocess.run(command(tmp_path / "clean"), cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert clean.returncode == 0, clean.stderr[-3000:]
    clean_stage = tmp_path / "clean" / "aug" / "asr"

    augmented = scalar_series(clean_stage / "tb", "train/augmented_clips")
    assert any(step >= saved for step in augmented), augmented  # augmented speech trained on after the resume
    assert set(augmented.values()) == {2.0}
    resumed, uninterrupted = scalar_series(stage / "tb"), scalar_series(clean_stage / "tb")
    assert [resumed[s] for s in range(steps)] == [uninterrupted[s] for s in range(steps)]
    ours, theirs = load_file(stage / "model/trainable.safetensors"), load_file(clean_stage / "model/trainable.safetensors")
    assert ours.keys() == theirs.keys() and all(torch.equal(ours[k], theirs[k]) for k in ours)
